"""PrefillQuantizedAttention against exact attention over the dequantized cache."""

import pytest
import torch

from kvquant import (
    BatchedKVQuantizer,
    PrefillQuantizedAttention,
    QuantConfig,
)
from kvquant.attention import masked_attention
from kvquant.bench.synthetic import heavy_tailed_kv


@pytest.mark.parametrize("dt", ["fp16", "nuq4"])
def test_prefill_and_decode_attention_match_reference(dt, seed):
    B, Hq, Hkv, S, D = 3, 4, 2, 37, 16
    q = torch.randn(B, Hq, S, D)
    k, v = heavy_tailed_kv((B, Hkv, S, D), seed), heavy_tailed_kv((B, Hkv, S, D), seed + 1)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :9] = False
    mask[2, :30] = False
    att = PrefillQuantizedAttention(QuantConfig(datatype=dt, page_size=32))
    out = att(q, k, v, mask)
    for b in range(B):  # each sequence alone, exact causal attention
        r = mask[b].nonzero().flatten()
        L = r.numel()
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None]
        ref = masked_attention(q[b:b + 1, :, r], k[b:b + 1, :, r], v[b:b + 1, :, r], allowed)
        # fp32 with another summation order: errors scale with the values (heavy-tailed, channels up to x15)
        scale = float(v[b:b + 1, :, r].abs().max())
        torch.testing.assert_close(out[b:b + 1, :, r], ref, rtol=1e-5, atol=2e-6 * scale)
        assert out[b, :, ~mask[b]].abs().sum() == 0
    # decode: attends over the (de)quantized cache plus the new token
    qd, kd, vd = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
    outd = att(qd, kd, vd)
    q2 = BatchedKVQuantizer(QuantConfig(datatype=dt, page_size=32))
    kc = q2.quantize_keys(torch.cat([k, kd], 2), torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], 1))
    vc = q2.quantize_values(torch.cat([v, vd], 2), torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], 1))
    kk, m = kc.dequantize()
    vv, _ = vc.dequantize()
    if dt == "fp16":
        torch.testing.assert_close(outd, masked_attention(qd, kk, vv, m[:, None, :]), rtol=1e-5, atol=1e-5)
    assert outd.shape == (B, Hq, 1, D) and torch.isfinite(outd).all()
    assert torch.equal(att.keys.lengths, mask.sum(1) + 1)
    with pytest.raises(ValueError, match="one query token"):
        att.decode(torch.randn(B, Hq, 2, D), kd, vd)
