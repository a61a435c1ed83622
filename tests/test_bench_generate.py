"""``kvquant bench generate`` / ``kvquant bench capacity`` on CPU with tiny random models (no timing asserts)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from kvquant.bench import capacity as cap
from kvquant.bench import generate as gen
from kvquant.bench.common import (
    RANDOM_WEIGHTS_NOTE,
    build_random_model,
    load_bench_model,
    parse_datatypes,
    parse_size_list,
)
from kvquant.config import QuantConfig


@pytest.fixture(scope="module")
def tiny() -> gen.BenchModel:
    return load_bench_model("random:tiny", None, "cpu")


def _settings(**kw) -> gen.GenerateSettings:
    base = dict(datatypes=["fp16", "nuq3"], batches=[2], prompt_lens=[64, 128], gen=3, warmup=0, progress=False)
    base.update(kw)
    return gen.GenerateSettings(**base)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def bench_run(tiny: gen.BenchModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("gen")
    return out, gen.run_generate_benchmark(tiny, _settings(), out)


# ----------------------------------------------------------------------------------------------------
# argument parsing


def test_size_lists() -> None:
    assert parse_size_list("1K..32K") == [1024, 2048, 4096, 8192, 16384, 32768]
    assert parse_size_list("1024, 4096") == [1024, 4096]
    assert parse_size_list("1,8,32") == [1, 8, 32]
    assert parse_size_list("4k,1..4,4096") == [1, 2, 4, 4096]
    for bad in ["", "32K..1K", "1K..3K", "abc", "0", "1.5", "4,,8", "-4"]:
        with pytest.raises(ValueError):
            parse_size_list(bad)


def test_datatype_list() -> None:
    assert parse_datatypes("fp16, NUQ3,nuq3") == ["fp16", "nuq3"]
    with pytest.raises(ValueError, match="unknown datatype 'nuq5'.*fp16"):
        parse_datatypes("fp16,nuq5")
    with pytest.raises(ValueError):
        parse_datatypes(" , ")


def test_bad_cli_input_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--datatypes", "fp8"], ["--prompt-len", "4K..1K"], ["--gen", "0"]):
        with pytest.raises(SystemExit) as e:
            gen.main(["--model", "random:tiny", "--device", "cpu", *argv])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown datatype 'fp8'" in err and "smaller than start" in err and "--gen must be >= 1" in err
    with pytest.raises(ValueError, match="unknown random model preset"):
        load_bench_model("random:13x", None, "cpu")


# ----------------------------------------------------------------------------------------------------
# generate


def test_records_have_every_field(bench_run: tuple[Path, list[dict]]) -> None:
    out, records = bench_run
    assert len(records) == 4
    for r in records:
        assert set(r) == set(gen.FIELDS)
        assert r["status"] == "ok", r["error"]
        assert r["random_weights"] is True and r["note"] == RANDOM_WEIGHTS_NOTE
        assert r["prompt_source"].startswith("random-ids")
        for k in ("prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s",
                  "kv_bytes", "bits_per_element", "weights_bytes"):
            assert isinstance(r[k], (int, float)) and r[k] > 0, k
        assert r["generated_tokens"] == 2 * 3 and r["decode_steps"] == 2 and r["kv_tokens"] == r["prompt_len"] + 2
        assert r["decode_tokens_per_s"] == pytest.approx(2 * 2 / r["decode_s"])
        assert r["e2e_tokens_per_s"] == pytest.approx(6 / (r["prefill_s"] + r["decode_s"]))
        # CPU: no peak GPU memory and no energy, never a made-up number
        assert r["peak_memory_bytes"] is None and r["peak_memory_note"].startswith("unavailable")
        assert r["energy_available"] is False and r["energy_note"].startswith("unavailable")
        for k in ("energy_j", "j_per_token", "co2_g_per_1k_tokens", "mean_power_w"):
            assert r[k] is None
        assert r["logits_finite"] is True
    # both files hold every record; the CSV has the fixed header
    assert _jsonl(out / "generate.jsonl") == json.loads(json.dumps(records))
    with open(out / "generate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and list(rows[0]) == gen.FIELDS and rows[0]["peak_memory_bytes"] == ""


def test_quantized_cache_is_smaller(bench_run: tuple[Path, list[dict]]) -> None:
    _, records = bench_run
    by = {(r["datatype"], r["prompt_len"]): r for r in records}
    for s in (64, 128):
        fp, q = by[("fp16", s)], by[("nuq3", s)]
        assert fp["cache_class"] == "DynamicCache" and q["cache_class"] == "KVQuantCache"
        assert q["kv_elements"] == fp["kv_elements"]  # same tokens stored
        assert q["kv_bytes"] < fp["kv_bytes"]
        assert fp["bits_per_element"] == pytest.approx(32.0)  # float32 model on CPU: DynamicCache is fp32
        assert q["bits_per_element"] < fp["bits_per_element"]
    # tiny heads (2 x 16 channels): sinks, scales and the last partial page weigh a lot, less as S grows
    assert by[("nuq3", 128)]["bits_per_element"] < min(16, by[("nuq3", 64)]["bits_per_element"])


def test_warmup_rehearses_the_exact_configuration_and_order_is_shape_major(
        tiny: gen.BenchModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int, bool]] = []
    real = gen.run_generation

    def spy(model, prompt, cache, n_new, device, region=None):
        calls.append((prompt.shape[0], prompt.shape[1], n_new, region is not None))
        return real(model, prompt, cache, n_new, device, region)

    monkeypatch.setattr(gen, "run_generation", spy)
    recs = gen.run_generate_benchmark(tiny, _settings(batches=[1, 2], prompt_lens=[48, 96], gen=4, warmup=1),
                                      tmp_path)
    # shape-major: every datatype of one (batch, prompt) before the next shape
    assert [(r["batch"], r["prompt_len"], r["datatype"]) for r in recs] == [
        (b, s, dt) for b in (1, 2) for s in (48, 96) for dt in ("fp16", "nuq3")]
    # each timed run (the one with energy regions) follows one untimed rehearsal of the same shape and length
    untimed = [c for c in calls if not c[3]]
    timed = [c for c in calls if c[3]]
    assert len(untimed) == len(timed) == len(recs)
    assert [c[:3] for c in untimed] == [c[:3] for c in timed] == [(r["batch"], r["prompt_len"], 4) for r in recs]


def test_oom_is_recorded_and_the_sweep_goes_on(tiny: gen.BenchModel, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = gen._forward

    def forward(model, input_ids, cache):
        if type(cache).__name__ == "KVQuantCache" and input_ids.shape == (2, 64):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return real(model, input_ids, cache)

    monkeypatch.setattr(gen, "_forward", forward)
    records = gen.run_generate_benchmark(tiny, _settings(batches=[1, 2], prompt_lens=[64, 128]), tmp_path)
    status = {(r["datatype"], r["batch"], r["prompt_len"]): r["status"] for r in records}
    assert status == {("fp16", 1, 64): "ok", ("fp16", 1, 128): "ok", ("fp16", 2, 64): "ok", ("fp16", 2, 128): "ok",
                      ("nuq3", 1, 64): "ok", ("nuq3", 1, 128): "ok", ("nuq3", 2, 64): "OOM",
                      ("nuq3", 2, 128): "skipped"}
    oom = next(r for r in records if r["status"] == "OOM")
    assert "out of memory" in oom["error"] and oom["decode_tokens_per_s"] is None and oom["kv_bytes"] is None
    assert set(oom) == set(gen.FIELDS)
    assert "already ran out of memory" in next(r for r in records if r["status"] == "skipped")["error"]
    assert [r["status"] for r in _jsonl(tmp_path / "generate.jsonl")] == [r["status"] for r in records]
    # without skipping, the larger configuration is tried (and here succeeds)
    records = gen.run_generate_benchmark(tiny, _settings(datatypes=["nuq3"], skip_after_oom=False), tmp_path / "b")
    assert [r["status"] for r in records] == ["OOM", "ok"]


def test_results_are_on_disk_after_each_config(tiny: gen.BenchModel, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = gen.measure_config

    def spy(*args, **kw):
        path = tmp_path / "generate.jsonl"
        seen.append(len(_jsonl(path)) if path.exists() else 0)
        return real(*args, **kw)

    monkeypatch.setattr(gen, "measure_config", spy)
    gen.run_generate_benchmark(tiny, _settings(prompt_lens=[32, 64]), tmp_path)
    assert seen == [0, 1, 2, 3]
    with open(tmp_path / "generate.csv") as f:
        assert len(f.read().splitlines()) == 1 + 4


def test_energy_numbers_with_mocked_nvml(tiny: gen.BenchModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_energy import FakeGpu, make_fake_pynvml

    gpu = FakeGpu("NVIDIA H100 80GB HBM3", lambda t: 300.0, lambda t: 300.0 * t)
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml([gpu]))
    records = gen.run_generate_benchmark(
        tiny, _settings(datatypes=["nuq3"], prompt_lens=[64], energy="on", grid_intensity=400.0), tmp_path)
    (r,) = records
    assert r["status"] == "ok" and r["energy_available"] is True and r["energy_note"] is None
    assert r["energy_j"] == pytest.approx(r["prefill_energy_j"] + r["decode_energy_j"])
    assert r["energy_j"] > 0 and r["mean_power_w"] == pytest.approx(300.0, rel=0.1)
    assert r["j_per_token"] == pytest.approx(r["energy_j"] / r["generated_tokens"])
    assert r["co2_g"] == pytest.approx(r["energy_j"] / 3.6e6 * 400.0)
    assert r["co2_g_per_1k_tokens"] == pytest.approx(r["co2_g"] / r["generated_tokens"] * 1000)
    summary = json.loads((tmp_path / "energy" / "energy_summary.json").read_text())
    assert [x["region"] for x in summary["regions"]] == ["nuq3_b2_s64_prefill", "nuq3_b2_s64_decode"]


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kvquant.cli.main import main

    main(["bench", "generate", "--model", "random:tiny", "--device", "cpu", "--datatypes", "fp16,nuq2",
          "--batch", "1", "--prompt-len", "32..64", "--gen", "2", "--warmup", "1", "--no-progress",
          "--backend", "torch", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert "| datatype | batch | prompt | status |" in out and "nuq2 | 1 | 64 | ok" in out
    assert RANDOM_WEIGHTS_NOTE in out
    # one log line per configuration as it ends, progress bar or not (long GPU runs are read from logs)
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert "nuq2 B=1 S=64: ok, prefill" in lines[3] and "ms/step" in lines[3]
    records = _jsonl(tmp_path / "generate.jsonl")
    assert len(records) == 4
    assert {r["cache_backend"] for r in records if r["datatype"] == "nuq2"} == {"torch"}


def test_bench_help_is_the_benchmarks_own(capsys: pytest.CaptureFixture) -> None:
    from kvquant.cli.main import main

    for what, option in (("generate", "--prompt-len"), ("capacity", "--contexts"), ("kernels", "--prefill-sweep")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", what, "--help"])
        assert exc.value.code == 0
        assert option in capsys.readouterr().out, what
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2 and "kvquant bench WHAT --help" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# capacity


def _shape(preset: str) -> cap.ModelShape:
    return cap.ModelShape.of(build_random_model(f"random:{preset}", torch.float16, "meta"))


def test_seven_b_shape() -> None:
    s = _shape("7b")
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == (32, 32, 32, 128, 4096)
    assert s.params == 6_738_415_616  # exactly Llama-2-7B
    assert 0 <= s.weights_bytes - 2 * s.params < 2**20  # fp16 weights + the rotary buffer
    assert _shape("8b").num_kv_heads == 8


def test_analytic_capacity_is_monotone() -> None:
    shape = _shape("7b")
    dts = ["fp16", "nuq4", "nuq3", "nuq2"]
    fits = {dt: cap.measure_fit(shape, dt, QuantConfig(), "cpu", torch.float16, (64, 128)) for dt in dts}
    assert fits["fp16"].bits_per_element == 16.0
    bits = [fits[dt].bits_per_element for dt in dts]
    assert bits == sorted(bits, reverse=True) and 2 < bits[-1] < 4  # more bits -> more bytes
    contexts = [1024, 4096, 16384, 65536]
    budget = 80 * 2**30
    caps = {dt: cap.analytic_capacity(shape, fits[dt], budget, 0.0, contexts) for dt in dts}
    for dt in dts:
        b = [caps[dt]["rows"][s]["max_batch"] for s in contexts]
        assert b == sorted(b, reverse=True) and b[0] > 0  # longer context -> smaller batch
        for s in contexts:  # the frontier really is the largest batch under the budget
            r = caps[dt]["rows"][s]
            kv = shape.num_layers * fits[dt].layer_bytes(r["max_batch"] + 1, s)
            assert shape.weights_bytes + kv > budget >= shape.weights_bytes + r["kv_bytes_at_max"]
    for s in contexts:  # more bits -> smaller capacity
        b = [caps[dt]["rows"][s]["max_batch"] for dt in dts]
        assert b == sorted(b)
        assert caps["fp16"]["rows"][s]["max_batch"] < caps["nuq3"]["rows"][s]["max_batch"]
    # fp16 by hand: 2 (K, V) x 32 layers x 32 heads x 128 x 2 bytes = 512 KiB per token
    avail = budget - shape.weights_bytes
    assert caps["fp16"]["rows"][4096]["max_batch"] == avail // (512 * 1024 * 4096)
    s1 = [caps[dt]["max_context_batch1"] for dt in dts]
    assert s1 == sorted(s1) and s1[0] < s1[2]


def test_search_max_batch() -> None:
    for limit, guess in ((37, 30), (37, 50), (37, 37), (1, 9), (0, 5), (500, 1)):
        res = cap.search_max_batch(lambda b, limit=limit: b <= limit, guess, 20)
        assert res["max_batch"] == limit and res["exact"], (limit, guess, res)
    res = cap.search_max_batch(lambda b: True, 5, 3)
    assert res["max_batch"] == 8 and not res["exact"]  # 5, 6, 8 and len(res["probes"]) == 3


def test_prober_builds_caches_and_catches_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = _shape("small")
    s = cap.CapacitySettings(datatypes=["nuq3"], contexts=[200], chunk_mib=0.05)
    fits = {"nuq3": cap.measure_fit(shape, "nuq3", s.quant, "cpu", torch.float16, (64, 128))}
    prober = cap.CacheProber(shape, s, torch.device("cpu"), torch.float16, fits)
    assert prober("nuq3", 3, 200)
    held, model = prober.last["kv_bytes_held"], shape.num_layers * fits["nuq3"].layer_bytes(3, 200)
    assert 0.8 * model < held < 1.3 * model  # the measured bytes model predicts a chunk-built cache
    assert prober("fp16", 3, 200) and prober.last["kv_bytes_held"] == shape.num_layers * 2 * 3 * 2 * 200 * 64 * 2
    real = cap.CacheProber._quantized_layer

    def limited(self, quantizer, fit, batch, length):
        if batch > 5:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(self, quantizer, fit, batch, length)

    monkeypatch.setattr(cap.CacheProber, "_quantized_layer", limited)
    res = cap.search_max_batch(lambda b: prober("nuq3", b, 64), 3, 10)
    assert res["max_batch"] == 5 and res["exact"] and prober.last["fits"] in (True, False)


def test_capacity_cli_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cap.main(["--model", "random:small", "--device", "cpu", "--datatypes", "fp16,nuq4,nuq2",
                     "--contexts", "1K..4K", "--memory-budget-gb", "0.05", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "capacity.json").read_text())
    assert doc["schema"] == cap.SCHEMA and doc["random_weights"] and doc["note"] == RANDOM_WEIGHTS_NOTE
    assert doc["empirical"] is False and "CUDA" in doc["empirical_note"]
    assert len(doc["rows"]) == 9 and all(r["empirical_max_batch"] is None for r in doc["rows"])
    out = capsys.readouterr().out
    assert "max ctx @B=1" in out and RANDOM_WEIGHTS_NOTE in out
    # budget is required on CPU; --find-capacity of generate goes to the same code
    assert cap.main(["--model", "random:small", "--device", "cpu", "--no-progress", "--out", str(tmp_path)]) == 2
    assert gen.main(["--model", "random:small", "--device", "cpu", "--find-capacity", "--prompt-len", "2K",
                     "--datatypes", "nuq3", "--memory-budget-gb", "0.05", "--no-progress",
                     "--out", str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "g" / "capacity.json").read_text())["contexts"] == [2048]


def test_empirical_frontier_updates_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The GPU search loop, run on CPU: the allocator cap is mocked, OOM simulated above batch 4."""
    shape = _shape("small")
    s = cap.CapacitySettings(datatypes=["fp16", "nuq2"], contexts=[64], chunk_mib=0.05, max_probes=10,
                             progress=False)
    fits = {dt: cap.measure_fit(shape, dt, s.quant, "cpu", torch.float16, (64, 128)) for dt in s.datatypes}
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append(f))
    real_q = cap.CacheProber._quantized_layer

    def limited(self, quantizer, fit, batch, length):
        if batch > 4:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_q(self, quantizer, fit, batch, length)

    monkeypatch.setattr(cap.CacheProber, "_quantized_layer", limited)
    real_empty = torch.empty

    def empty(*size, **kw):
        if kw.get("dtype") == torch.float16 and len(size) == 4 and size[0] > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    doc = {"rows": [{"datatype": dt, "context": 64, "analytic_max_batch": 3} for dt in s.datatypes]}
    cap.empirical_frontier(doc, shape, s, torch.device("cpu"), torch.float16, fits, 10.0, 20.0, tmp_path / "c.json")
    assert calls == [0.5, 1.0]  # capped at budget / total, then released
    got = {r["datatype"]: (r["empirical_max_batch"], r["empirical_exact"]) for r in doc["rows"]}
    assert got == {"fp16": (2, True), "nuq2": (4, True)}
    assert all(p["fits"] == (p["batch"] <= 4) for p in doc["rows"][1]["probes"])
    assert json.loads((tmp_path / "c.json").read_text())["rows"][1]["empirical_max_batch"] == 4


# ----------------------------------------------------------------------------------------------------
# profile


def test_prefill_profile_names_ops_and_syncs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kvquant.bench import profile as prof

    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=0, page_size=32,
                      backend="torch")
    res = prof.profile_prefill("values", 2, 2, 96, 16, cfg, "cpu", dtype=torch.float32, warmup=1)
    ops = {r["op"] for r in res["rows"]}
    assert res["wall_ms"] > 0 and all(r["count"] >= 1 and r["host_ms"] >= 0 for r in res["rows"])
    assert any(op.startswith("aten::") for op in ops)
    assert res["syncs"] and set(res["syncs"]) <= set(prof.SYNC_OPS)  # the host reads the append makes are named
    with pytest.raises(ValueError, match="kind must be"):
        prof.profile_prefill("queries", 1, 1, 8, 16, cfg, "cpu")
    out = tmp_path / "p.json"
    assert prof.main(["--kind", "keys", "--heads", "2", "--tokens", "64", "--head-dim", "16", "--backend", "torch",
                      "--device", "cpu", "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prefill keys [1, 2, 64, 16]" in printed and "by host time" in printed and "by device time" not in printed
    doc = json.loads(out.read_text())
    assert doc["config"]["tokens"] == 64 and doc["rows"] and "syncs" in doc
    with pytest.raises(SystemExit):
        prof.main(["--tokens", "0", "--device", "cpu"])


def test_decode_profile_labels_kvquant_parts(tiny: gen.BenchModel, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from kvquant.bench import profile as prof
    from kvquant.cache.hf_cache import KVQuantLayer
    from kvquant.quant.store import QuantizedKVCache

    update, append = KVQuantLayer.update, QuantizedKVCache.append
    quant = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=0, backend="torch")
    q = prof.profile_decode(tiny, "nuq3", 2, 24, quant, steps=3, warmup_steps=1)
    assert KVQuantLayer.update is update and QuantizedKVCache.append is append  # the labels are taken off again
    layers = tiny.text_config.num_hidden_layers
    assert q["wall_ms_per_step"] > 0 and q["profiled_ms_per_step"] > 0 and q["device_busy_ms_per_step"] is None
    # torch path: every layer's update dequantizes the past and appends keys and values (nested in update)
    assert q["regions"]["kvquant.update"]["calls_per_step"] == pytest.approx(layers)
    assert q["regions"]["kvquant.append"]["calls_per_step"] == pytest.approx(2 * layers)
    assert q["regions"]["kvquant.append"]["host_ms_per_step"] <= q["regions"]["kvquant.update"]["host_ms_per_step"]
    assert "kvquant.kernel_decode" not in q["regions"] and q["syncs_per_step"] > 0
    f = prof.profile_decode(tiny, "fp16", 2, 24, quant, steps=2, warmup_steps=0)
    assert f["regions"] == {} and f["syncs_per_step"] == 0 and any(r["op"] == "aten::mm" for r in f["rows"])
    with pytest.raises(ValueError, match="steps"):
        prof.profile_decode(tiny, "nuq3", 1, 8, quant, steps=0)

    out = tmp_path / "d.json"
    assert prof.main(["--kind", "decode", "--model", "random:tiny", "--device", "cpu", "--datatype", "fp16,nuq2",
                      "--backend", "torch", "--tokens", "16", "--steps", "2", "--warmup-steps", "0", "--top", "3",
                      "--out", str(out)]) == 0
    table = capsys.readouterr().out.split("| datatype | wall ms/step")[1]
    assert "\n| fp16 |" in table and "\n| nuq2 |" in table
    doc = json.loads(out.read_text())
    assert [r["datatype"] for r in doc["results"]] == ["fp16", "nuq2"] and doc["random_weights"] is True
