"""Small padded caches, RoPE tables and the error measure the kernel tests share."""

from __future__ import annotations

import pytest
import torch

from kvquant.config import QuantConfig
from kvquant.quant.quantizer import BatchedKVQuantizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rope_tables(max_pos: int, D: int, half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's cos/sin tables ``[max_pos, D]`` (``rotate_half`` layout), or their first halves ``[max_pos, D/2]``."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    e = f if half else torch.cat([f, f], -1)
    return e.cos().to(DEVICE), e.sin().to(DEVICE)


def build_caches(gen: torch.Generator, B: int, H: int, D: int, S: int, cfg: QuantConfig, dtype: torch.dtype,
                 n_decode: int = 2, pad: bool = True):
    """Prefill a padded batch (different lengths per row), then ``n_decode`` decode appends."""
    def rnd(*shape):
        x = torch.randn(*shape, generator=gen) * (0.5 + torch.rand(1, H, 1, D, generator=gen))
        return x.to(DEVICE, dtype)

    k, v = rnd(B, H, S, D), rnd(B, H, S, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    if pad:
        for b in range(1, B):
            cut = int(torch.randint(1, S // 2, (1,), generator=gen))
            if b % 2:
                mask[b, :cut] = False  # left padding
            else:
                mask[b, S - cut:] = False  # right padding
    mask = mask.to(DEVICE)
    qz = BatchedKVQuantizer(cfg)
    kc, vc = qz.quantize_keys(k, mask), qz.quantize_values(v, mask)
    for _ in range(n_decode):
        kc.append(rnd(B, H, 1, D))
        vc.append(rnd(B, H, 1, D))
    return kc, vc


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())
