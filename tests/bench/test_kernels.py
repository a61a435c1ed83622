"""Pieces of ``kvquant bench kernels`` that run without a GPU."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("name", ["quanto4", "hqq4"])
def test_hf_quantized_cache_step_attends_over_every_token(name: str, seed: int) -> None:
    """The benchmark's transformers-QuantizedCache row really runs that cache: each step appends a token and
    attends over the whole dequantized context (close to exact attention at 4 bits)."""
    from kvquant.bench.kernels import hf_quantized_step
    from kvquant.eval.baselines import baseline_available

    ok, why = baseline_available(name)
    if not ok:
        pytest.skip(why)
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, D = 2, 4, 2, 300, 64
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    step, cache = hf_quantized_step(name, q, k, v)
    for n in range(1, 4):
        out = step()
        kk = torch.cat([k] + [k[:, :, -1:]] * n, 2)
        vv = torch.cat([v] + [v[:, :, -1:]] * n, 2)
        want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
        assert out.shape == want.shape and cache.get_seq_length() == L + n
        assert float((out - want).norm() / want.norm()) < 0.25
