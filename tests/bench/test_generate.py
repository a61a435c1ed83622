"""``kvquant bench generate`` on CPU with tiny random models (no timing asserts)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from kvquant.bench import generate as gen
from kvquant.bench import runs
from kvquant.bench.model import BenchModel, load_bench_model
from kvquant.config import QuantConfig
from kvquant.models.random import RANDOM_WEIGHTS_NOTE


@pytest.fixture(scope="module")
def tiny() -> BenchModel:
    return load_bench_model("random:tiny", None, "cpu")


def _settings(**kw) -> gen.GenerateSettings:
    # toy prompts, shorter than the default exact hold of uncalibrated keys: ranges from the prompt
    base = dict(datatypes=["fp16", "nuq3"], batches=[2], prompt_lens=[64, 128], gen=3, warmup=0, progress=False,
                quant=QuantConfig(min_range_tokens=1))
    base.update(kw)
    return gen.GenerateSettings(**base)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def bench_run(tiny: BenchModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("gen")
    return out, gen.run_generate_benchmark(tiny, _settings(), out)


def test_bad_cli_input_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--datatypes", "fp8"], ["--prompt-len", "4K..1K"], ["--gen", "0"], ["--graph"]):
        with pytest.raises(SystemExit) as e:
            gen.main(["--model", "random:tiny", "--device", "cpu", *argv])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown datatype 'fp8'" in err and "smaller than start" in err and "--gen must be >= 1" in err
    assert "--graph needs a CUDA device" in err
    with pytest.raises(ValueError, match="unknown random model preset"):
        load_bench_model("random:13x", None, "cpu")


def test_graph_mode_gives_fp16_a_static_cache(tiny: BenchModel) -> None:
    """``--graph``: fp16 runs in transformers' StaticCache (graph-safe), sized for the prompt and the new tokens."""
    from transformers import DynamicCache, StaticCache

    from kvquant.bench.runs import make_cache
    from kvquant.config import QuantConfig

    cache = make_cache(tiny, "fp16", QuantConfig(), None, static_len=70)
    assert isinstance(cache, StaticCache) and cache.kvquant_max_len == 70
    assert isinstance(make_cache(tiny, "fp16", QuantConfig(), None), DynamicCache)


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
    # tiny heads (2 x 16 channels): sinks, scales and the values' exact open page (fp32 here) weigh a lot, less
    # as S grows
    assert by[("nuq3", 128)]["bits_per_element"] < by[("nuq3", 64)]["bits_per_element"]


def test_warmup_rehearses_the_exact_configuration_and_order_is_shape_major(
        tiny: BenchModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int, bool]] = []
    real = gen.run_generation

    def spy(model, prompt, cache, n_new, device, region=None, prefill_chunk=None):
        calls.append((prompt.shape[0], prompt.shape[1], n_new, region is not None))
        return real(model, prompt, cache, n_new, device, region, prefill_chunk)

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


def test_oom_is_recorded_and_the_sweep_goes_on(tiny: BenchModel, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = runs.forward_logits

    def forward(model, input_ids, cache):
        if type(cache).__name__ == "KVQuantCache" and input_ids.shape == (2, 64):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return real(model, input_ids, cache)

    monkeypatch.setattr(runs, "forward_logits", forward)
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


def test_results_are_on_disk_after_each_config(tiny: BenchModel, tmp_path: Path,
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


def test_energy_numbers_with_mocked_nvml(tiny: BenchModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    from tests.energy.fake_nvml import FakeGpu, make_fake_pynvml

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


def test_at_capacity_runs_each_datatype_at_its_own_largest_batch(tiny: BenchModel, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--at-capacity``: the batch of each datatype is the analytic capacity at the budget; a batch that runs out of
    memory is retried smaller and the tries are recorded."""
    # the exact cache of one sequence: K and V, 2 KV heads x 16, in the model's dtype (float32 on the CPU)
    itemsize = torch.empty(0, dtype=tiny.dtype).element_size()
    fp16_seq = 2 * tiny.text_config.num_hidden_layers * 2 * 16 * (64 + 3) * itemsize
    budget_gb = (tiny.weights_bytes + 12.5 * fp16_seq) / 2**30
    s = _settings(at_capacity=True, memory_budget_gb=budget_gb, prompt_lens=[64], datatypes=["fp16", "nuq3"])
    caps = gen.capacity_batches(tiny, s)
    assert caps[("fp16", 64)] == 12 and caps[("nuq3", 64)] > caps[("fp16", 64)]
    real = runs.forward_logits
    limit = caps[("nuq3", 64)] - 2  # the bytes model leaves out activations: pretend the largest batches do not fit

    def forward(model, input_ids, cache):
        if type(cache).__name__ == "KVQuantCache" and input_ids.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, input_ids, cache)

    monkeypatch.setattr(runs, "forward_logits", forward)
    records = {r["datatype"]: r for r in gen.run_generate_benchmark(tiny, s, tmp_path)}
    f, q = records["fp16"], records["nuq3"]
    assert f["status"] == q["status"] == "ok" and f["error"] is None and q["error"] is None
    assert f["batch"] == f["capacity_batch"] == 12 and f["capacity_tries"] == [12]
    assert q["capacity_batch"] == caps[("nuq3", 64)] and q["batch"] <= limit < q["capacity_tries"][0]
    assert q["capacity_tries"][-1] == q["batch"] and len(q["capacity_tries"]) >= 2
    assert all(r["at_capacity"] and r["memory_budget_gb"] == budget_gb and r["mode"] == "eager" for r in (f, q))
    with pytest.raises(ValueError, match="--at-capacity needs a positive --memory-budget-gb"):
        _settings(at_capacity=True)


def test_chunked_prefill_gives_the_unchunked_result(tiny: BenchModel) -> None:
    """``--prefill-chunk``: the prompt in several forwards, each attending to the cache's past, ends where one forward
    does (exact cache: the same logits; nuq3: the same tokens stored, keys ranged on the first chunk)."""
    from kvquant.cache.graphs import prefill_chunks
    from kvquant.config import QuantConfig

    assert prefill_chunks(10, None) == [(0, 10)] and prefill_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="padding is longer than prefill_chunk=4"):
        prefill_chunks(10, 4, mask)
    prompt, _ = runs.make_prompts(tiny, 2, 37, None, seed=5)
    whole = runs.run_generation(tiny.model, prompt, runs.make_cache(tiny, "fp16", QuantConfig(), None), 4, tiny.device)
    parts = runs.run_generation(tiny.model, prompt, runs.make_cache(tiny, "fp16", QuantConfig(), None), 4, tiny.device,
                                prefill_chunk=10)
    torch.testing.assert_close(parts["logits"], whole["logits"], rtol=1e-4, atol=1e-4)
    cache = runs.make_cache(tiny, "nuq3", QuantConfig(), None)
    runs.run_generation(tiny.model, prompt, cache, 4, tiny.device, prefill_chunk=16)
    assert all(layer.cumulative_length == 37 + 3 for layer in cache.layers)


def test_graph_generation_prefills_in_chunks(tiny: BenchModel) -> None:
    from transformers import DynamicCache

    from kvquant.cache.graphs import generate

    prompt, _ = runs.make_prompts(tiny, 2, 29, None, seed=9)
    whole = generate(tiny.model, prompt, None, DynamicCache(), 5, graph=False)
    parts = generate(tiny.model, prompt, None, DynamicCache(), 5, graph=False, prefill_chunk=8)
    assert torch.equal(parts.tokens, whole.tokens)


def test_timers_synchronize_every_gpu_of_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device_map pipeline spans several GPUs: the generation timers wait for each of them, not only the input's
    (devices faked on a CPU model)."""
    from kvquant.bench import cuda, runs

    model = torch.nn.Linear(2, 2)
    fake = [torch.device("cuda:1"), torch.device("cuda:0"), torch.device("cuda:1")]
    monkeypatch.setattr(torch.nn.Linear, "parameters", lambda self: iter(
        [type("P", (), {"device": d})() for d in fake]))
    assert cuda.model_devices(model, "cuda:0") == [torch.device("cuda:0"), torch.device("cuda:1")]
    monkeypatch.undo()
    assert cuda.model_devices(model, "cpu") == [torch.device("cpu")]
    seen: list[torch.device] = []
    monkeypatch.setattr(runs, "synchronize_all", lambda devs: seen.extend(devs))
    monkeypatch.setattr(runs, "model_devices", lambda m, d: [torch.device("cuda:0"), torch.device("cuda:1")])
    monkeypatch.setattr(runs, "forward_logits", lambda m, p, c: torch.zeros(p.shape[0], 5))
    monkeypatch.setattr(runs, "greedy_steps", lambda m, nxt, c, n: (None, None))
    runs.run_generation(model, torch.zeros(2, 4, dtype=torch.long), None, 3, torch.device("cuda:0"))
    assert seen == [torch.device("cuda:0"), torch.device("cuda:1")] * 4


def test_peak_memory_counts_each_device_once() -> None:
    """``cuda`` (the bench's device) and ``cuda:0`` (where the weights are) are one device: the summed peak memory
    must not count it twice."""
    from kvquant.bench.generate import distinct_cuda_devices

    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert distinct_cuda_devices([cuda0, cuda0, cuda], current=0) == [cuda0]
    assert distinct_cuda_devices([cuda1, cuda, cuda0], current=1) == [cuda0, cuda1]
    assert distinct_cuda_devices([torch.device("cpu")], current=0) == []


def test_chunked_prefill_holds_no_growth_slack(tiny: BenchModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunked prefill allocates the rest of the prompt (and the decode budget) exactly at its first chunk: every
    store's page pool ends exactly full, where pools grown a quarter at a time by the later chunks keep spare pages;
    the tokens generated are the same either way."""
    from kvquant.cache import graphs

    prompt, _ = runs.make_prompts(tiny, 3, 600, None, seed=3)
    cfg = QuantConfig(min_range_tokens=1, page_size=32)

    def run() -> tuple[torch.Tensor, list[int]]:
        cache = runs.make_cache(tiny, "nuq3", cfg, None, reserve_tokens=4)
        res = graphs.generate(tiny.model, prompt, None, cache, 5, graph=False, prefill_chunk=64)
        assert all(layer.cumulative_length == 600 + 4 for layer in cache.layers)
        spare = [s.pages.capacity - s.pages.n_pages for layer in cache.layers for s in (layer.qkeys, layer.qvalues)]
        return res.tokens, spare

    tokens, spare = run()
    assert spare == [0] * len(spare), spare
    monkeypatch.setattr(graphs, "reserve_rest_of_prompt", lambda cache, spans: None)
    grown_tokens, grown_spare = run()
    assert torch.equal(tokens, grown_tokens)
    assert sum(grown_spare) > 0  # (what the reservation saves)
