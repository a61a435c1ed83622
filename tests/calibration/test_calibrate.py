"""``calibrate``: the file round trip and its validation, sensitivities, running out of memory."""

import pytest
import torch

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.calibration import Calibration, CalibrationError
from kvquant.calibration.calibrate import calibrate
from kvquant.models import tiny_llama
from tests.hf_tiny import greedy_generate, padded_batch


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def test_calibration_roundtrip_and_validation(model, tmp_path, seed):
    seqs = torch.randint(0, model.config.vocab_size, (4, 64))
    cal = calibrate(model, seqs, QuantConfig(), bits=(2, 3), sensitivity="fisher", model_id="tiny", progress=False)
    path = cal.save(tmp_path / "cal.safetensors")
    loaded = Calibration.load(path)
    assert loaded.model_id == cal.model_id and loaded.model_id.startswith("tiny@weights:")
    assert loaded.num_layers == model.config.num_hidden_layers
    torch.testing.assert_close(loaded.layers[1].key_hi, cal.layers[1].key_hi)
    assert torch.equal(loaded.layers[0].value_codebooks[3].levels, cal.layers[0].value_codebooks[3].levels)
    cache = KVQuantCache(model, QuantConfig(datatype="nuq3"), calibration=str(path))
    ids, mask = padded_batch(seed, model.config.vocab_size)
    greedy_generate(model, ids, mask, cache)
    with pytest.raises(CalibrationError, match="outlier_fraction"):
        KVQuantCache(model, QuantConfig(outlier_fraction=0.05), calibration=loaded)
    with pytest.raises(ValueError, match="no 4-bit codebooks"):
        KVQuantCache(model, QuantConfig(datatype="nuq4"), calibration=loaded).quantizer_for(0)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CalibrationError, match="not a readable"):
        Calibration.load(bad)
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "missing.safetensors")
    with pytest.raises(CalibrationError, match="shape"):
        loaded.check_compatible(3, 2, 16, 0.01, True)


def test_magnitude_sensitivity_spreads_key_levels_and_leaves_values(model, seed):
    seqs = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    plain = calibrate(model, seqs, QuantConfig(), bits=(3,), sensitivity="none", progress=False)
    mag = calibrate(model, seqs, QuantConfig(), bits=(3,), sensitivity="magnitude", progress=False)
    assert mag.sensitivity == "magnitude"
    for p, m in zip(plain.layers, mag.layers):
        # weighting by |k| moves mass to the tails: the outer key levels move outwards, the range is unchanged
        pl, ml = p.key_codebooks[3].levels, m.key_codebooks[3].levels
        assert ml[-1] - ml[0] > pl[-1] - pl[0]
        assert torch.equal(p.key_lo, m.key_lo) and torch.equal(p.key_hi, m.key_hi)
        assert torch.equal(p.value_codebooks[3].levels, m.value_codebooks[3].levels)
    with pytest.raises(ValueError, match="sensitivity must be one of"):
        calibrate(model, seqs, QuantConfig(), sensitivity="entropy", progress=False)


def test_query_sensitivity_weights_keys_by_query_energy(model, seed):
    from kvquant.calibration.calibrate import _QueryEnergy

    seqs = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    plain = calibrate(model, seqs, QuantConfig(), bits=(3,), sensitivity="none", progress=False)
    qcal = calibrate(model, seqs, QuantConfig(), bits=(3,), sensitivity="query", progress=False)
    assert qcal.sensitivity == "query"
    assert not any(layer.self_attn.q_proj._forward_hooks for layer in model.model.layers)  # no query hook left
    moved = 0
    for p, q in zip(plain.layers, qcal.layers):
        assert torch.equal(p.key_lo, q.key_lo) and torch.equal(p.value_codebooks[3].levels, q.value_codebooks[3].levels)
        moved += not torch.equal(p.key_codebooks[3].levels, q.key_codebooks[3].levels)
    assert moved > 0
    # the recorded energies: sum of squared q_proj outputs per query head and channel, summed over the query heads
    # that read each KV head (head j reads KV head j // G, as repeat_kv does) and over each rotary pair
    energy = _QueryEnergy(model, model.config.num_hidden_layers)
    seen = {}
    attn0 = model.model.layers[0].self_attn
    handle = attn0.q_proj.register_forward_hook(lambda m, a, out: seen.setdefault("q", out.detach().float()))
    with torch.no_grad():
        model(input_ids=seqs[:2])
    handle.remove()
    energy.remove()
    cfg = model.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // Hq
    q2 = seen["q"].reshape(-1, Hq, D).pow(2).sum(0)
    want = torch.zeros(Hkv, D)
    for j in range(Hq):
        want[j // (Hq // Hkv)] += q2[j]
    want = want[:, : D // 2] + want[:, D // 2:]
    want = torch.cat([want, want], 1) / want.mean()
    torch.testing.assert_close(energy.per_key_channel(0, Hkv, D), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="q_proj"):
        _QueryEnergy(torch.nn.Linear(2, 2), 2)


def _calibrate_recording(model, seqs, monkeypatch, **kw):
    """Calibrate, returning the result, its saved tensors and the statistics every layer was fitted on."""
    import kvquant.calibration.calibrate as calmod

    fitted = []
    real_fit = calmod._fit_layer

    def fit(keys, values, kw_, vw, *args, query_energy=None, **kwargs):
        fitted.append([None if t is None else t.clone() for t in (keys, values, kw_, vw, query_energy)])
        return real_fit(keys, values, kw_, vw, *args, query_energy=query_energy, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(calmod, "_fit_layer", fit)
        cal = calibrate(model, seqs, QuantConfig(), bits=(2, 3), model_id="tiny", progress=False, **kw)
    return cal, fitted


def _saved_tensors(cal, path):
    from safetensors.torch import load_file

    return load_file(str(cal.save(path)))


@pytest.mark.parametrize("sensitivity,where,fits", [
    ("none", "lm_head", 1), ("none", "lm_head", 2), ("query", "lm_head", 1), ("query", "lm_head", 2),
    ("fisher", "lm_head", 1), ("fisher", "lm_head", 2), ("fisher", "collect_grads", 1),
    ("fisher", "collect_grads", 2),
])
def test_calibrate_oom_halves_the_batch_and_matches_a_smaller_batch_run(model, tmp_path, monkeypatch, capsys, seed,
                                                                        sensitivity, where, fits):
    """A forward that runs out of memory is undone (recorded keys/values, gradients, query energies) and retried
    with half the batch: the calibration equals a run at that batch size from the start, bit for bit."""
    from kvquant.calibration.calibrate import _RecordingLayer

    seqs = torch.randint(0, model.config.vocab_size, (7, 24), generator=torch.Generator().manual_seed(seed))
    ref, ref_fitted = _calibrate_recording(model, seqs, monkeypatch, sensitivity=sensitivity, batch_size=fits)
    capsys.readouterr()

    fails = []
    if where == "lm_head":  # after every decoder layer recorded its K/V (and the query hooks ran)
        def hook(module, args, out):
            if out.shape[0] > fits:
                fails.append(out.shape[0])
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        handle = model.lm_head.register_forward_hook(hook)
    else:  # in the backward bookkeeping, after layer 0 already handed over its gradients
        real_collect = _RecordingLayer.collect_grads

        def collect(self):
            if self.layer_idx == 1 and self.live and self.live[0][0].shape[0] > fits:
                fails.append(self.live[0][0].shape[0])
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_collect(self)
        monkeypatch.setattr(_RecordingLayer, "collect_grads", collect)
        handle = None
    try:
        cal, fitted = _calibrate_recording(model, seqs, monkeypatch, sensitivity=sensitivity, batch_size=4)
    finally:
        if handle is not None:
            handle.remove()
    assert fails == ([4, 2] if fits == 1 else [4])  # the size is kept after a reduction: no repeated failures
    err = capsys.readouterr().err
    assert err.count("out of memory with a batch of") == len(fails)
    assert "retrying with batch size 2" in err and ("retrying with batch size 1" in err) == (fits == 1)
    assert len(fitted) == len(ref_fitted) == model.config.num_hidden_layers
    for got, want in zip(fitted, ref_fitted):
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                assert torch.equal(g, w)
    a, b = _saved_tensors(cal, tmp_path / "a.safetensors"), _saved_tensors(ref, tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cal.n_tokens == ref.n_tokens == seqs.numel()
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients left behind
    assert not any(layer.self_attn.q_proj._forward_hooks for layer in model.model.layers)


@pytest.mark.parametrize("sensitivity", ["none", "fisher", "query"])
def test_calibrate_oom_at_batch_one_says_what_to_change(model, monkeypatch, capsys, sensitivity):
    seqs = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))

    def hook(module, args, out):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    handle = model.lm_head.register_forward_hook(hook)
    try:
        with pytest.raises(torch.OutOfMemoryError) as info:
            calibrate(model, seqs, QuantConfig(), bits=(2,), sensitivity=sensitivity, batch_size=2,
                      model_id="tiny-llama", progress=False)
    finally:
        handle.remove()
    msg = str(info.value)
    for part in ("single sequence", "model tiny-llama", "seq_len 24", "dtype float32", "--seq-len", "--dtype"):
        assert part in msg, (part, msg)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert "retrying with batch size 1" in capsys.readouterr().err
    assert all(p.grad is None for p in model.parameters())
    assert not any(layer.self_attn.q_proj._forward_hooks for layer in model.model.layers)
    with pytest.raises(ValueError, match="batch_size"):
        calibrate(model, seqs, QuantConfig(), batch_size=0, progress=False)


def test_separate_widths_take_each_sides_codebook(model, tmp_path, seed):
    """A k4v2 cache stores keys with the calibrated 4-bit key codebooks and values with the 2-bit value codebooks;
    a file calibrated without one of those widths is refused up front, naming the width and the side."""
    seqs = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    cal = calibrate(model, seqs, QuantConfig(), bits=(2, 4), progress=False)
    loaded = Calibration.load(cal.save(tmp_path / "cal.safetensors"))
    assert loaded.widths == [2, 4]
    cache = KVQuantCache(model, QuantConfig(datatype="k4v2"), calibration=loaded)
    for i, lc in enumerate(loaded.layers):
        q = cache.quantizer_for(i)
        assert torch.equal(q.key_codebook.levels, lc.key_codebooks[4].levels)
        assert torch.equal(q.value_codebook.levels, lc.value_codebooks[2].levels)
    ids, mask = padded_batch(seed, model.config.vocab_size)
    greedy_generate(model, ids, mask, cache)
    assert (cache.layers[0].qkeys.bits, cache.layers[0].qvalues.bits) == (4, 2)
    with pytest.raises(CalibrationError, match=r"no 3-bit codebooks for the keys .*\[2, 4\]-bit codes.*k3v2"):
        KVQuantCache(model, QuantConfig(datatype="k3v2"), calibration=loaded)
    with pytest.raises(CalibrationError, match=r"no 3-bit codebooks for the values .*k4v3"):
        KVQuantCache(model, QuantConfig(datatype="k4v3"), calibration=loaded)
    KVQuantCache(model, QuantConfig(datatype="int-k3v2"), calibration=loaded)  # uniform codes need no codebook
