import hashlib
import json
import re

import pytest
import torch
from transformers import DynamicCache

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.rope import apply_rope, invert_rope
from kvquant.calibration import Calibration
from kvquant.calibration.calibrate import calibrate
from kvquant.calibration.format import CalibrationError
from kvquant.eval.perplexity import evaluate_perplexity
from kvquant.models import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def _batch(seed, vocab, B=3, S=21):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :6] = 0
    mask[-1, :13] = 0
    return ids, mask


def _generate(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              past_key_values=cache, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=0)


def test_fp16_matches_dynamic_cache_with_left_padding_and_gqa(model, seed):
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids, mask = _batch(seed, model.config.vocab_size)
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    got = _generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="fp16", page_size=32)))
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quantized_generate_runs_and_stays_close(model, seed):
    ids, mask = _batch(seed, model.config.vocab_size)
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    errs = {}
    for dt in ("nuq4", "nuq2"):
        cache = KVQuantCache(model, QuantConfig(datatype=dt, page_size=32))
        got = _generate(model, ids, mask, cache)
        assert got.sequences.shape == ref.sequences.shape
        # teacher-forced: prefill, then 8 more tokens reading the quantized cache (no divergence between runs)
        full = torch.cat([ids, torch.randint(0, model.config.vocab_size, (ids.shape[0], 8))], 1)
        fmask = torch.cat([mask, torch.ones(ids.shape[0], 8, dtype=mask.dtype)], 1)
        with torch.no_grad():
            exact = model(input_ids=full, attention_mask=fmask).logits[:, -8:]
            qc = KVQuantCache(model, QuantConfig(datatype=dt, page_size=32))
            model(input_ids=ids, attention_mask=mask, past_key_values=qc)
            quant = model(input_ids=full[:, -8:], attention_mask=fmask, past_key_values=qc).logits
        errs[dt] = float((quant - exact).abs().mean())
        rep = cache.memory_report()
        assert rep["total_bytes"] > 0 and rep["key_elements"] == rep["value_elements"]
        layer = cache.layers[0]
        assert torch.equal(layer.qkeys.lengths, mask.sum(1) + 5)  # prompt + 5 appended decode tokens
    assert 0 < errs["nuq4"] < errs["nuq2"]


def test_rope_inverse_roundtrip(seed):
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    ang = torch.rand(2, 7, 8, dtype=torch.float64) * 10
    emb = torch.cat([ang, ang], -1)
    for a in (1.0, 1.7):  # plain and scaled RoPE
        cos, sin = emb.cos() * a, emb.sin() * a
        torch.testing.assert_close(invert_rope(apply_rope(x, cos, sin), cos, sin).double(), x, rtol=1e-6, atol=1e-6)


def test_pre_rope_beats_post_rope_on_real_keys(shared_dir):
    """On a trained model's keys, pre-RoPE quantization reconstructs the keys attention sees (post-RoPE)
    better than quantizing after RoPE at the same bit width (summed over layers)."""
    from kvquant.models import load_model

    path = shared_dir / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    model, tok, _ = load_model(str(path))
    text = (shared_dir / "data" / "tinystories" / "sample.txt").read_text()
    ids = torch.tensor([[1] + tok(text)["input_ids"][:255]])
    S = ids.shape[1]
    errs = {}
    for pre in (True, False):
        cache = KVQuantCache(model, QuantConfig(datatype="nuq2", pre_rope=pre, outlier_fraction=0.0, n_sink=0))
        ref = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
            model(input_ids=ids, past_key_values=ref)
        num = den = 0.0
        for layer, rlayer in zip(cache.layers, ref.layers):
            kd = layer.qkeys.dequantize()[0]
            if pre:
                kd = apply_rope(kd, *cache.rotary(torch.arange(S)[None]))
            num += float((kd - rlayer.keys).norm() ** 2)
            den += float(rlayer.keys.norm() ** 2)
        errs[pre] = (num / den) ** 0.5
    assert errs[True] < errs[False], errs


def test_calibration_roundtrip_and_validation(model, tmp_path, seed):
    seqs = torch.randint(0, model.config.vocab_size, (4, 64))
    cal = calibrate(model, seqs, QuantConfig(), bits=(2, 3), sensitivity="fisher", model_id="tiny", progress=False)
    path = cal.save(tmp_path / "cal.safetensors")
    loaded = Calibration.load(path)
    assert loaded.model_id == "tiny" and loaded.num_layers == model.config.num_hidden_layers
    torch.testing.assert_close(loaded.layers[1].key_hi, cal.layers[1].key_hi)
    assert torch.equal(loaded.layers[0].value_codebooks[3].levels, cal.layers[0].value_codebooks[3].levels)
    cache = KVQuantCache(model, QuantConfig(datatype="nuq3"), calibration=str(path))
    ids, mask = _batch(seed, model.config.vocab_size)
    _generate(model, ids, mask, cache)
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


def test_perplexity_fp16_row_equals_plain(model, seed, tmp_path, capsys):
    windows = torch.randint(0, model.config.vocab_size, (2, 48))
    out = tmp_path / "ppl.json"
    res = {r.datatype: r for r in evaluate_perplexity(model, windows, ["plain", "fp16", "nuq3"], chunk=5,
                                                      out_path=out, progress=False)}
    assert res["fp16"].tokens == res["plain"].tokens == 2 * 23
    assert res["fp16"].ppl == pytest.approx(res["plain"].ppl, rel=1e-5)
    assert res["nuq3"].delta_ppl is not None and res["nuq3"].bits_per_element is not None
    # one log line per datatype as it ends; the JSON holds every row (rewritten after each)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ppl ")]
    assert [ln.split(":")[0] for ln in lines] == ["ppl fp16", "ppl plain", "ppl nuq3"]
    assert f"{res['nuq3'].ppl:.4f} ({res['nuq3'].delta_ppl_pct:+.2f} %)" in lines[2]
    assert [r["datatype"] for r in json.loads(out.read_text())["results"]] == ["fp16", "plain", "nuq3"]


def test_real_model_stories260k(shared_dir, seed):
    from transformers import LlamaForCausalLM

    path = shared_dir / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    model = LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 500, (2, 40))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    got = _generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="fp16")))
    assert torch.equal(ref.sequences, got.sequences)
    q = _generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="nuq4")))
    assert (q.sequences == ref.sequences).float().mean() > 0.8


def test_cache_implementation_kvquant_matches_explicit_cache(model, seed):
    from kvquant.cache.register import register_cache_implementation, unregister_cache_implementation

    ids, mask = _batch(seed, model.config.vocab_size)
    explicit = _generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32)))
    register_cache_implementation(model)
    register_cache_implementation(model)  # idempotent
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, cache_implementation="kvquant",
                                 cache_config={"datatype": "nuq3", "page_size": 32})
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, cache_implementation="dynamic")
        assert torch.equal(out, explicit.sequences)
        assert isinstance(model.kvquant_last_cache, KVQuantCache)
        assert model.kvquant_last_cache.config.datatype == "nuq3"
        assert model.kvquant_last_cache.layers[0].qkeys.bits == 3
        ref = _generate(model, ids, mask, DynamicCache(config=model.config))
        assert torch.equal(plain, ref.sequences)  # other cache implementations pass through untouched
        with pytest.raises(ValueError, match="not both"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="kvquant",
                           past_key_values=DynamicCache(config=model.config))
        with pytest.raises(TypeError, match="cache_config"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="kvquant",
                           cache_config="nuq3")
    finally:
        unregister_cache_implementation(model)
    assert "generate" not in vars(model)


def test_reserve_tokens_allocates_the_decode_budget_exactly(model, seed):
    ids, mask = _batch(seed, model.config.vocab_size)
    free = KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32))
    held = KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32), reserve_tokens=40)
    a, b = _generate(model, ids, mask, free), _generate(model, ids, mask, held)
    assert torch.equal(a.sequences, b.sequences)  # reserving changes where pages live, not what they hold
    for f_layer, h_layer in zip(free.layers, held.layers):
        f, h = f_layer.qkeys.pages, h_layer.qkeys.pages
        # pages for (real prompt tokens - 1 sink + 40) tokens per sequence, and the pools sized to exactly that
        want = (mask.sum(1) - 1 + 40 + 31) // 32
        assert torch.equal(h.pages_per_seq.cpu(), want.cpu())
        assert h.capacity == h.n_pages == int(want.sum())
        assert f.n_pages <= h.n_pages
    with pytest.raises(ValueError, match="reserve_tokens"):
        KVQuantCache(model, QuantConfig(datatype="nuq3"), reserve_tokens=-1)


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


def test_eval_ppl_cli_residual_window(shared_dir, tmp_path, capsys, monkeypatch):
    """`kvquant eval ppl --residual-length R` runs the cache with an exact window of R recent tokens (the KIVI
    baselines keep one): recorded in the JSON, and it costs bits (the window is stored exactly)."""
    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    rows = {}
    for r in (0, 8):
        out = tmp_path / f"ppl{r}.json"
        main(["eval", "ppl", "--model", "stories260k", "--data", "tinystories", "--ctx", "64", "--chunk", "16",
              "--max-windows", "2", "--datatypes", "fp16,nuq2", "--residual-length", str(r), "--out", str(out)])
        doc = json.loads(out.read_text())
        assert doc["meta"]["config"]["residual_length"] == r
        rows[r] = {x["datatype"]: x for x in doc["results"]}
    assert rows[0]["fp16"]["ppl"] == pytest.approx(rows[8]["fp16"]["ppl"])
    assert rows[8]["nuq2"]["bits_per_element"] > rows[0]["nuq2"]["bits_per_element"]
    assert rows[8]["nuq2"]["ppl"] != rows[0]["nuq2"]["ppl"]


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


def test_no_progress_flag_on_every_long_running_command():
    from kvquant.cli.main import build_parser

    p = build_parser()
    for argv in (["demo"], ["calibrate", "--out", "x"], ["eval", "ppl"]):
        assert p.parse_args(argv).progress is True
        assert p.parse_args([*argv, "--no-progress"]).progress is False


def test_calibrate_and_eval_ppl_cli_no_progress_hides_the_bars(shared_dir, tmp_path, capsys, monkeypatch):
    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    common = ["--model", "stories260k", "--data", "tinystories"]
    for flag in ([], ["--no-progress"]):
        cal = tmp_path / f"cal{len(flag)}.safetensors"
        main(["calibrate", *common, "--n-seqs", "2", "--seq-len", "32", "--batch-size", "2", "--out", str(cal),
              *flag])
        out = tmp_path / f"ppl{len(flag)}.json"
        main(["eval", "ppl", *common, "--ctx", "32", "--chunk", "8", "--max-windows", "1", "--datatypes", "fp16,nuq3",
              "--calibration", str(cal), "--out", str(out), *flag])
        err = capsys.readouterr().err
        assert cal.exists()
        # the results record which calibration (its content, not only its path): reports merge runs by it
        meta = json.loads(out.read_text())["meta"]
        assert meta["calibration_sha256"] == hashlib.sha256(cal.read_bytes()).hexdigest()[:16]
        for bar in ("calibration forward", "fitting codebooks", "ppl fp16"):
            assert (f"{bar}:   0%" in err) == (not flag), (bar, flag, err)
        assert re.search(r"ppl fp16: \d+\.\d{4}, ", err), err  # the per-datatype log line stays


def test_cache_keyword_follows_the_models_forward() -> None:
    """transformers 5.2x takes the cache as ``cache`` (``past_key_values`` deprecated), 4.5x as ``past_key_values``:
    kvquant passes it under the name the model's forward declares and reads it under either."""
    from kvquant.cache.hf_compat import cache_in, cache_kwarg, cache_kwargs

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    marker = object()
    for cls, name in ((New, "cache"), (Old, "past_key_values")):
        m = cls()
        assert cache_kwarg(m) == name
        assert m(**cache_kwargs(m, marker)) is marker
    assert cache_in({"cache": marker}) is marker and cache_in({"past_key_values": marker}) is marker
    assert cache_in({"cache": None, "past_key_values": marker}) is marker and cache_in({}) is None
