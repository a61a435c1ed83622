"""Channel rotations before quantization (``QuantConfig.rotation``): the matrices, the stores that hold rotated
tokens, the decode path, calibration in the rotated basis, and what a rotation is for (outlier channels)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvquant import BatchedKVQuantizer, QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.calibration import Calibration, CalibrationError
from kvquant.calibration.calibrate import calibrate
from kvquant.kernels.decode_attention import unsupported_reason
from kvquant.kernels.ops import TORCH
from kvquant.kernels.reference import apply_rope
from kvquant.models import tiny_llama
from kvquant.quant.rotation import hadamard_matrix, rotate, rotation_matrix, unrotate
from kvquant.quant.stats import channel_ranges
from tests.hf_tiny import greedy_generate, padded_batch


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind,dims", [("hadamard", (1, 8, 16, 64, 128)), ("random", (8, 48, 64))])
def test_rotation_matrices_are_orthogonal_and_seeded(kind, dims, seed):
    for d in dims:
        R = rotation_matrix(kind, d, seed)
        assert R.shape == (d, d) and R.dtype == torch.float32
        torch.testing.assert_close(R.double() @ R.double().T, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
        assert torch.equal(rotation_matrix(kind, d, seed).cpu(), R)  # deterministic
        if d >= 8:
            assert not torch.equal(rotation_matrix(kind, d, seed + 1), R)
        x = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(unrotate(rotate(x, R), R), x, atol=1e-5, rtol=1e-5)
    H = hadamard_matrix(16)
    assert torch.equal(H, H.T) and torch.equal(H.abs(), torch.full((16, 16), 0.25, dtype=torch.float64))
    # randomized Hadamard: signs in front of the Walsh-Hadamard matrix
    R = rotation_matrix("hadamard", 16, seed).double()
    s = (R @ H.T).diagonal()
    assert torch.equal(s.abs(), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(R, s[:, None] * H)
    assert rotation_matrix("none", 16) is None
    with pytest.raises(ValueError, match="power-of-two head size, got 48"):
        rotation_matrix("hadamard", 48)
    with pytest.raises(ValueError, match="rotation must be one of"):
        QuantConfig(rotation="givens")


def _kv(seed: int, B: int = 2, H: int = 3, S: int = 150, D: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)


@pytest.mark.parametrize("datatype,rotation", [("nuq3", "hadamard"), ("int4", "random"), ("k4v2", "hadamard")])
def test_rotated_store_is_the_unrotated_store_of_rotated_tokens(datatype, rotation, seed):
    """A rotated store holds exactly what an unrotated store holds for ``x R`` (same codes, bit for bit) and reads
    back ``x_hat R^T``; its round trip error is that of a quantizer on fresh random data."""
    keys, values = _kv(seed)
    D = keys.shape[-1]
    mask = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
    mask[1, :17] = False  # left padding
    cfg = QuantConfig(datatype=datatype, rotation=rotation, rotation_seed=seed, residual_length=8)
    R = rotation_matrix(rotation, D, seed)
    kr, vr = rotate(keys, R), rotate(values, R)
    lo, hi = channel_ranges(kr, mask, cfg.outlier_fraction)  # ranges in the rotated basis, [B, H, D]
    ranges = (lo[0], hi[0])
    rot_q = BatchedKVQuantizer(cfg, key_ranges=ranges)
    ref_q = BatchedKVQuantizer(dataclasses.replace(cfg, rotation="none"), key_ranges=ranges)
    k_rot, v_rot = rot_q.quantize_keys(keys, mask), rot_q.quantize_values(values, mask)
    k_ref, v_ref = ref_q.quantize_keys(kr, mask), ref_q.quantize_values(vr, mask)
    assert k_ref.rotation is None and torch.equal(k_rot.rotation, R)
    # a decode step more (the steady path)
    g = torch.Generator().manual_seed(seed + 1)
    step_k, step_v = torch.randn(2, 3, 1, D, generator=g), torch.randn(2, 3, 1, D, generator=g)
    k_rot.append(step_k), v_rot.append(step_v)
    k_ref.append(rotate(step_k, R)), v_ref.append(rotate(step_v, R))
    for rot, ref, x, step in ((k_rot, k_ref, keys, step_k), (v_rot, v_ref, values, step_v)):
        assert torch.equal(rot.codes(), ref.codes())
        assert rot.memory_report()["total"] == ref.memory_report()["total"]  # the bytes held are unchanged
        got, m = rot.dequantize()
        want, m_ref = ref.dequantize()
        assert torch.equal(m, m_ref)
        torch.testing.assert_close(got, unrotate(want, R), atol=1e-5, rtol=1e-5)
        # a group of heads read on its own (multi-token steps) rotates back the same
        torch.testing.assert_close(rot.dequantize((1, 3))[0], got[:, 1:3], atol=1e-6, rtol=1e-6)
        exact = torch.zeros_like(got)
        for b in range(x.shape[0]):
            real = torch.cat([x[b][:, mask[b]], step[b]], 1)
            exact[b, :, : real.shape[1]] = real
        assert _rel_err(got, exact) < {2: 0.4, 3: 0.22, 4: 0.12}[rot.bits]


def test_rotation_none_and_identity_write_the_same_bytes(seed):
    """``rotation="none"`` is the unrotated store; an identity rotation goes through the rotation code and must
    write exactly the same codes, scales and outliers."""
    keys, values = _kv(seed, S=96)
    assert QuantConfig().rotation == "none" and not QuantConfig(rotation="hadamard", datatype="fp16").rotated
    plain = BatchedKVQuantizer(QuantConfig(datatype="nuq3"), min_range_tokens=1)
    k0, v0 = plain.quantize_keys(keys), plain.quantize_values(values)
    assert k0.rotation is None and v0.rotation is None
    eye = torch.eye(keys.shape[-1])
    from kvquant.quant.store import QuantizedKVCache

    for x, ref in ((keys, k0), (values, v0)):
        store = QuantizedKVCache(ref.kind, ref.config, *x.shape[:2], x.shape[-1], x.dtype, "cpu", ref.codebook,
                                 hold_tokens=ref.hold_tokens, rotation=eye)
        store.append(x)
        assert torch.equal(store.codes(), ref.codes())
        for pool in ref.pages.pools:
            assert torch.equal(store.pages.pools[pool], ref.pages.pools[pool])
        assert torch.equal(store.dequantize()[0], ref.dequantize()[0])  # (the outliers included)
        assert store.memory_report() == ref.memory_report()
        if ref.kind == "key":
            assert torch.equal(store.channel_scale, ref.channel_scale)


def _outlier_channel_data(seed: int, S: int = 256, D: int = 64) -> torch.Tensor:
    """``[1, 2, S, D]`` Gaussian tokens with three heavy channels per head (scale 25), as real keys and values have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, S, D, generator=g)
    heavy = torch.randperm(D, generator=g)[:3]
    x[..., heavy] *= 25.0
    return x


@pytest.mark.parametrize("outlier_fraction,at_most", [(0.0, 0.5), (0.01, 0.8)])
def test_hadamard_int_beats_int_on_outlier_channels(outlier_fraction, at_most, seed):
    """Per-token integer quantization (values) of tokens with a few heavy channels: the range is set by the heavy
    channels and the bulk of the channels lands on a few levels. A randomized Hadamard spreads the heavy channels
    over all 64, and the error at the same bits is far lower (about 0.39x without sparse outliers, 0.65x with 1 %
    of them kept exactly, which catch part of the heavy entries). (Per-channel keys give each heavy channel its
    own range: there a rotation gains nothing on this data.)"""
    x = _outlier_channel_data(seed)
    errs = {}
    for rotation in ("none", "hadamard"):
        cfg = QuantConfig(datatype="int3", rotation=rotation, rotation_seed=seed, outlier_fraction=outlier_fraction)
        store = BatchedKVQuantizer(cfg).quantize_values(x)
        store.settle()
        errs[rotation] = _rel_err(store.dequantize()[0], x)
        bits = store.memory_report()["total"]
        errs[rotation + "_bytes"] = bits
    assert errs["hadamard_bytes"] == errs["none_bytes"]
    assert errs["hadamard"] < at_most * errs["none"], errs


def test_decode_with_rotation_equals_dequantize_then_attend(seed):
    """The decode attention of rotated stores (the torch path: the Triton kernel refuses them, saying why) equals
    attention over the tokens an unrotated store keeps of ``x R``, rotated back, with RoPE applied."""
    keys, values = _kv(seed, S=80, D=64)
    B, H, S, D = keys.shape
    cfg = QuantConfig(datatype="nuq3", rotation="hadamard", rotation_seed=seed, min_range_tokens=1)
    kq, vq = BatchedKVQuantizer(cfg).quantize_keys(keys), BatchedKVQuantizer(cfg).quantize_values(values)
    R = kq.rotation
    ref_cfg = dataclasses.replace(cfg, rotation="none")
    kr = BatchedKVQuantizer(ref_cfg).quantize_keys(rotate(keys, R))
    vr = BatchedKVQuantizer(ref_cfg).quantize_values(rotate(values, R))
    g = torch.Generator().manual_seed(seed + 7)
    q = torch.randn(B, 2 * H, D, generator=g)
    pos = torch.arange(4096, dtype=torch.float32)[:, None] / (10000.0 ** (torch.arange(0, D, 2) / D))[None, :]
    cos, sin = torch.cat([pos.cos(), pos.cos()], 1), torch.cat([pos.sin(), pos.sin()], 1)
    offset = torch.tensor([0, 5])
    extra = (torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g))
    got = TORCH.decode_attention(q, kq, vq, rope=(cos, sin, offset), extra_kv=extra)
    k_hat = apply_rope(unrotate(kr.dequantize()[0], R), cos, sin, offset)
    k_all = torch.cat([k_hat, extra[0][:, :, None]], 2).repeat_interleave(2, 1)
    v_all = torch.cat([unrotate(vr.dequantize()[0], R), extra[1][:, :, None]], 2).repeat_interleave(2, 1)
    p = torch.softmax(torch.einsum("bhd,bhsd->bhs", q, k_all) / D**0.5, -1)
    torch.testing.assert_close(got, torch.einsum("bhs,bhsd->bhd", p, v_all), atol=1e-4, rtol=1e-4)
    why = unsupported_reason(q, kq, vq, rope=(cos[:, : D // 2], sin[:, : D // 2], offset))
    assert why is not None and "rotat" in why
    assert unsupported_reason(q, kr, vr, rope=(cos[:, : D // 2], sin[:, : D // 2], offset)) is None


@pytest.fixture(scope="module")
def model():
    """A tiny Llama whose keys have two heavy channels per head (pre-RoPE), as trained models' keys do."""
    m = tiny_llama(seed=0)
    D = m.config.head_dim
    with torch.no_grad():
        for layer in m.model.layers:
            w = layer.self_attn.k_proj.weight.view(-1, D, m.config.hidden_size)
            w[:, [1, D // 2 + 3]] *= 8.0
    return m


def test_calibration_records_rotation_and_refuses_another(model, tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, model.config.vocab_size, (4, 96), generator=g)
    cfg = QuantConfig(datatype="nuq3", rotation="hadamard", rotation_seed=seed % 1000)
    cal = calibrate(model, seqs, cfg, bits=(3,), sensitivity="fisher", model_id="tiny", progress=False)
    assert (cal.rotation, cal.rotation_seed) == ("hadamard", seed % 1000)
    path = cal.save(tmp_path / "rot.safetensors")
    loaded = Calibration.load(path)
    assert (loaded.rotation, loaded.rotation_seed) == ("hadamard", seed % 1000)
    assert loaded.metadata()["format_version"] == 2  # kvquant without rotations refuses it
    torch.testing.assert_close(loaded.layers[1].key_lo, cal.layers[1].key_lo)
    for other, match in ((QuantConfig(datatype="nuq3"), "rotation 'hadamard'"),
                         (dataclasses.replace(cfg, rotation="random"), "rotation 'hadamard'"),
                         (dataclasses.replace(cfg, rotation_seed=cfg.rotation_seed + 1), "seed")):
        with pytest.raises(CalibrationError, match=match):
            KVQuantCache(model, other, calibration=loaded)
    plain = calibrate(model, seqs, QuantConfig(datatype="nuq3"), bits=(3,), progress=False)
    assert plain.rotation == "none" and "rotation" not in plain.metadata()
    assert plain.metadata()["format_version"] == 1
    with pytest.raises(CalibrationError, match="rotation 'none'"):
        KVQuantCache(model, cfg, calibration=plain)
    with pytest.raises(ValueError, match="sensitivity 'query'"):
        calibrate(model, seqs, cfg, bits=(3,), sensitivity="query", progress=False)

    # the ranges are fitted in the rotated basis: on its own calibration tokens a cache keeps about the outlier
    # fraction of its keys in sparse storage; the same ranges used on unrotated keys would miss most of them
    def key_outliers(c: QuantConfig, calib: Calibration) -> float:
        cache = KVQuantCache(model, c, calibration=calib, backend="torch")
        with torch.no_grad():
            model(input_ids=seqs, past_key_values=cache, use_cache=True)
        return sum(layer.qkeys.memory_report()["outlier_fraction"] for layer in cache.layers) / len(cache.layers)

    right = key_outliers(cfg, loaded)
    wrong = key_outliers(QuantConfig(datatype="nuq3"), dataclasses.replace(loaded, rotation="none"))  # (no check)
    assert right < 0.015 and wrong > 3 * right, (right, wrong)

    # a rotated cache runs end to end, on the torch path, and counts its rotation once
    cache = KVQuantCache(model, cfg, calibration=loaded)
    assert cache.backend == "torch"
    ids, mask = padded_batch(seed, model.config.vocab_size)
    out = greedy_generate(model, ids, mask, cache)
    assert torch.isfinite(torch.stack(out.scores)).all()
    plain_cache = KVQuantCache(model, QuantConfig(datatype="nuq3"), calibration=plain)
    greedy_generate(model, ids, mask, plain_cache)
    rep, plain_rep = cache.memory_report(), plain_cache.memory_report()
    head_dim = model.config.head_dim
    # one [D, D] float32 matrix shared by every layer, counted once; the stores hold the same bytes
    assert rep["layer_buffers"] == plain_rep["layer_buffers"] + head_dim * head_dim * 4
    assert rep["key_total"] == plain_rep["key_total"] and rep["value_total"] == plain_rep["value_total"]
    with pytest.raises(ValueError, match="rotation 'hadamard'"):
        KVQuantCache(model, dataclasses.replace(cfg, backend="triton"), calibration=loaded)
