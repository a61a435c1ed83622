"""``kvquant bench capacity``: the analytic model, the batch search and the empirical prober on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvquant.bench import capacity as cap
from kvquant.bench import generate as gen
from kvquant.bench.capacity_model import ModelShape, analytic_capacity, measure_fit
from kvquant.config import QuantConfig
from kvquant.models.random import RANDOM_WEIGHTS_NOTE, build_random_model


def _shape(preset: str) -> ModelShape:
    return ModelShape.of(build_random_model(f"random:{preset}", torch.float16, "meta"))


def test_seven_b_shape() -> None:
    s = _shape("7b")
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == (32, 32, 32, 128, 4096)
    assert s.params == 6_738_415_616  # exactly Llama-2-7B
    assert 0 <= s.weights_bytes - 2 * s.params < 2**20  # fp16 weights + the rotary buffer
    assert _shape("8b").num_kv_heads == 8


def test_analytic_capacity_is_monotone() -> None:
    shape = _shape("7b")
    dts = ["fp16", "nuq4", "nuq3", "nuq2"]
    # (toy lengths, shorter than the default exact hold of uncalibrated keys: ranges from the first tokens)
    fits = {dt: measure_fit(shape, dt, QuantConfig(min_range_tokens=1), "cpu", torch.float16, (64, 128)) for dt in dts}
    assert fits["fp16"].bits_per_element == 16.0
    bits = [fits[dt].bits_per_element for dt in dts]
    assert bits == sorted(bits, reverse=True)  # more bits -> more bytes
    # the bytes a long context adds per token (the values' exact open page amortised away): packed 2-bit codes
    per_token_bits = 8 * fits["nuq2"].per_token / (2 * shape.num_kv_heads * shape.head_dim)
    assert 2 < per_token_bits < 3
    contexts = [1024, 4096, 16384, 65536]
    budget = 80 * 2**30
    caps = {dt: analytic_capacity(shape, fits[dt], budget, 0.0, contexts) for dt in dts}
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
    s = cap.CapacitySettings(datatypes=["nuq3"], contexts=[200], chunk_mib=0.05,
                             quant=QuantConfig(min_range_tokens=1))  # the prober's keys have ranges: no hold
    fits = {"nuq3": measure_fit(shape, "nuq3", s.quant, "cpu", torch.float16, (64, 128))}
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
    fits = {dt: measure_fit(shape, dt, s.quant, "cpu", torch.float16, (64, 128)) for dt in s.datatypes}
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


def test_per_layer_widths_refused_where_capacity_needs_one_width() -> None:
    """The capacity fit and --at-capacity size batches from one width for every layer: nuq-alloc is refused up
    front, naming the reason, not when the run starts."""
    with pytest.raises(ValueError, match="per layer"):
        cap.CapacitySettings(datatypes=["nuq3", "nuq-alloc"], contexts=[64])
    with pytest.raises(ValueError, match="per layer"):
        gen.GenerateSettings(datatypes=["nuq-alloc"], batches=[1], prompt_lens=[64], gen=2, warmup=0, progress=False,
                             at_capacity=True, memory_budget_gb=1.0)
    gen.GenerateSettings(datatypes=["nuq-alloc"], batches=[1], prompt_lens=[64], gen=2, warmup=0, progress=False)
