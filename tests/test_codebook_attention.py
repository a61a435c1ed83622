import pytest
import torch

from kvquant import (
    BatchedKVQuantizer,
    Codebook,
    PrefillQuantizedAttention,
    QuantConfig,
    compute_nuq_codebook,
    create_heuristic_codebook,
    create_uniform_codebook,
)
from kvquant.attention import masked_attention
from kvquant.bench.synthetic import heavy_tailed_kv


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebooks_sorted_symmetric_and_roundtrip(bits, tmp_path, seed):
    h = create_heuristic_codebook(f"nuq{bits}")
    u = create_uniform_codebook(bits)
    assert h.levels.numel() == 2**bits and (h.levels.diff() > 0).all()
    torch.testing.assert_close(h.levels, -h.levels.flip(0), rtol=0, atol=1e-4)
    x = torch.randn(5000).clamp(-1, 1)
    codes = h.encode(x)
    brute = (x[:, None] - h.levels[None]).abs().argmin(1)  # midpoint search == nearest level
    assert torch.equal(codes.long(), brute)
    assert torch.equal(u.levels, torch.linspace(-1, 1, 2**bits))
    h.save(tmp_path / "cb.safetensors")
    assert torch.equal(Codebook.load(tmp_path / "cb.safetensors").levels, h.levels)


def test_kmeans_deterministic_weighted_and_better_than_heuristic(seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.distributions.Laplace(0.0, 0.2).sample((20000,)).clamp(-1, 1)
    a = compute_nuq_codebook(data, 3, seed=1, max_samples=5000)
    b = compute_nuq_codebook(data, 3, seed=1, max_samples=5000)
    assert torch.equal(a.levels, b.levels)
    full = compute_nuq_codebook(data, 3)

    def mse(cb):
        return float(((cb.decode(cb.encode(data)) - data) ** 2).mean())

    assert mse(full) < mse(create_heuristic_codebook("nuq3")) and mse(full) < mse(create_uniform_codebook(3))
    w = torch.ones_like(data)
    w[data > 0] = 50.0  # weight the positive side: more levels go there
    wcb = compute_nuq_codebook(data, 3, weights=w)
    assert int((wcb.levels > 0).sum()) > int((full.levels > 0).sum())
    del g


def test_codebook_bad_input(tmp_path):
    with pytest.raises(ValueError, match="strictly increasing"):
        Codebook(torch.tensor([0.0, 0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="4, 8 or 16"):
        Codebook(torch.linspace(-1, 1, 5))
    with pytest.raises(ValueError, match="NaN"):
        compute_nuq_codebook(torch.tensor([float("nan")] * 20), 2)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read codebook"):
        Codebook.load(bad)


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
        torch.testing.assert_close(out[b:b + 1, :, r], ref, rtol=1e-5, atol=1e-5)
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


def test_public_api_importable_from_package():
    import kvquant

    for name in ("BatchedKVQuantizer", "QuantizedKVCache", "BlockedCSCMatrix", "BlockedCSRMatrix",
                 "PrefillQuantizedAttention", "create_heuristic_codebook", "compute_nuq_codebook", "EnergyMonitor",
                 "DetailedEnergyProfiler", "KVQuantCache", "Calibration", "QuantConfig"):
        assert getattr(kvquant, name) is not None, name
    with pytest.raises(AttributeError):
        kvquant.does_not_exist  # noqa: B018
