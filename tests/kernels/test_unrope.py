"""The Triton RoPE inversion is bit-identical to the torch one."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,S,D", [(1, 1, 32), (3, 5, 64), (8, 2, 128)])
def test_unrope_kernel_is_bit_identical_to_torch(seed: int, dtype: torch.dtype, H: int, S: int, D: int) -> None:
    """The Triton inverse rotary embedding of incoming keys equals ``invert_rope(...).to(dtype)`` bit for bit,
    also for scaled tables (``cos^2 + sin^2 != 1``, e.g. YaRN attention scaling) and strided input."""
    from kvquant.kernels.unrope import invert_rope_triton
    from kvquant.quant.rope import invert_rope

    gen = torch.Generator().manual_seed(seed)
    B = 2
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.randint(0, 40000, (B, S), generator=gen).float()
    f = pos[..., None] * inv
    emb = torch.cat([f, f], -1)
    scale = 1.0 + 0.3 * torch.rand(B, S, 1, generator=gen)
    cos, sin = (emb.cos() * scale).to(DEVICE), (emb.sin() * scale).to(DEVICE)
    k = (torch.randn(B, S, H, D, generator=gen) * 3).to(DEVICE, dtype).transpose(1, 2)  # [B, H, S, D], strided
    want = invert_rope(k, cos, sin).to(dtype)
    got = invert_rope_triton(k, cos, sin)
    assert got.dtype == dtype and got.shape == k.shape
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    with pytest.raises(ValueError, match="cos/sin"):
        invert_rope_triton(k, cos[..., : D // 2], sin)
