"""The rotary embedding's math: the inverse undoes it (plain and scaled RoPE)."""

import torch

from kvquant.quant.rope import apply_rope, invert_rope


def test_rope_inverse_roundtrip(seed):
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    ang = torch.rand(2, 7, 8, dtype=torch.float64) * 10
    emb = torch.cat([ang, ang], -1)
    for a in (1.0, 1.7):  # plain and scaled RoPE
        cos, sin = emb.cos() * a, emb.sin() * a
        torch.testing.assert_close(invert_rope(apply_rope(x, cos, sin), cos, sin).double(), x, rtol=1e-6, atol=1e-6)
