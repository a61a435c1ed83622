"""``kvquant report``: loading, tables, figures and Pareto fronts from synthetic and real small results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvquant.bench import generate as gen
from kvquant.bench.common import load_bench_model
from kvquant.report import build_report, load_results, pareto_mask, tradeoff_points
from kvquant.report import plots as plots_mod
from kvquant.report.pareto import dominators, energy_per_datatype

PNG = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


# ----------------------------------------------------------------------------------------------------
# Pareto


def test_pareto_hand_checked() -> None:
    names = ["fp16", "nuq4", "nuq3", "int4", "nuq2", "int3", "nuq4b"]
    pts = [(16, 0.0), (4.5, 0.05), (3.5, 0.2), (4.5, 0.3), (2.5, 1.5), (3.6, 0.9), (4.5, 0.05)]
    # int4 is beaten by nuq4 (same bits, lower ΔPPL); int3 by nuq3 (fewer bits, lower ΔPPL); the duplicate
    # nuq4b ties with nuq4 and neither dominates the other
    assert pareto_mask(pts) == [True, True, True, False, True, False, True]
    dom = dominators(pts)
    assert {names[j] for j in dom[3]} == {"nuq4", "nuq3", "nuq4b"} and {names[j] for j in dom[5]} == {"nuq3"}
    assert pareto_mask([]) == [] and pareto_mask([(1, 2)]) == [True]
    assert pareto_mask([(1, 2, 3), (1, 2, 4), (0, 5, 3)]) == [True, False, True]
    with pytest.raises(ValueError):
        pareto_mask([(1, float("nan"))])


def _ppl_doc(model: str = "smollm2-135m") -> dict:
    rows = [("fp16", 10.0, None, 16.5), ("nuq4", 10.05, 0.05, 4.6), ("nuq3", 10.2, 0.2, 3.6),
            ("int3", 11.0, 1.0, 3.6), ("nuq2", 11.5, 1.5, 2.6), ("quanto4", 10.3, 0.3, None)]
    return {"meta": {"model": model, "ctx": 2048, "windows": 4},
            "results": [{"datatype": d, "ppl": p, "nll": 2.3, "tokens": 4000, "windows": 4, "bits_per_element": b,
                         "seconds": 1.0, "delta_ppl": dp, "delta_ppl_pct": None if dp is None else 10 * dp}
                        for d, p, dp, b in rows]}


def test_tradeoff_points() -> None:
    energy = {"fp16": 1.0, "nuq4": 0.8, "nuq3": 0.9, "int3": 0.7, "nuq2": 1.2}
    pts, notes = tradeoff_points(_ppl_doc(), energy)
    by = {p.datatype: p for p in pts}
    assert by["fp16"].delta_ppl == 0.0 and by["fp16"].bits_per_element == 16.5
    assert [d for d in by if by[d].pareto_bits] == ["fp16", "nuq4", "nuq3", "nuq2"]
    assert by["int3"].pareto_bits is False and by["int3"].dominated_by == ["nuq3"]
    assert by["quanto4"].bits_per_element is None and any("quanto4" in n for n in notes)
    # J/token vs ΔPPL: fp16 (1.0, 0), nuq4 (0.8, .05), int3 (0.7, 1.0) on the front; nuq3, nuq2 beaten by nuq4
    assert {d for d in by if by[d].pareto_energy} == {"fp16", "nuq4", "int3"}
    assert by["quanto4"].pareto_energy is None and by["nuq2"].pareto_all is None  # quanto4 has no bits


def test_energy_per_datatype_uses_common_configs() -> None:
    recs = [{"status": "ok", "datatype": dt, "batch": b, "prompt_len": s, "j_per_token": j}
            for dt, b, s, j in [("fp16", 1, 1024, 2.0), ("fp16", 8, 1024, 0.5), ("nuq3", 1, 1024, 1.0),
                                ("nuq3", 8, 1024, 0.4), ("nuq3", 8, 4096, 9.0), ("fp16", 8, 4096, None)]]
    recs.append({"status": "OOM", "datatype": "nuq3", "batch": 32, "prompt_len": 1024, "j_per_token": None})
    e, how = energy_per_datatype(recs)
    assert e == {"fp16": pytest.approx(1.25), "nuq3": pytest.approx(0.7)} and "B=1 S=1024, B=8 S=1024" in how
    assert energy_per_datatype([])[0] == {}


# ----------------------------------------------------------------------------------------------------
# synthetic results folder


def _gen_record(dt: str, b: int, s: int, bits: float, status: str = "ok", energy: bool = True) -> dict:
    r = {k: None for k in gen.FIELDS}
    ok = status == "ok"
    kv = int(2 * 4 * b * 8 * (s + 31) * 64 * bits / 8)
    r.update(schema=gen.SCHEMA, kind="generate", run_id="r1", timestamp="2026-01-01T00:00:00+00:00",
             model="random:7b", random_weights=True, device="cuda", gpu_name="NVIDIA H100 80GB HBM3", dtype="float16",
             datatype=dt, batch=b, prompt_len=s, gen_tokens=32, status=status,
             error=None if ok else "CUDA out of memory", weights_bytes=13 * 2**30)
    if ok:
        dec = 30.0 * b / (1 + s / 4096) * (1.3 if dt != "fp16" else 1.0)
        r.update(prefill_s=s * b / 2e4, decode_s=31 * b / dec, decode_tokens_per_s=dec, e2e_tokens_per_s=dec * 0.9,
                 decode_ms_per_step=1e3 * b / dec, kv_bytes=kv, kv_bytes_allocated=kv, bits_per_element=bits,
                 peak_memory_bytes=13 * 2**30 + 3 * kv, generated_tokens=32 * b)
        if energy:
            j = 3.0 / b * bits / 16 + 0.1
            r.update(energy_available=True, energy_j=j * 32 * b, j_per_token=j, co2_g_per_1k_tokens=j * 0.1,
                     mean_power_w=400.0, energy_method="nvml_energy_counter")
    return r


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    recs = [_gen_record(dt, b, s, bits) for dt, bits in (("fp16", 16.0), ("nuq4", 4.6), ("nuq3", 3.6))
            for b in (1, 8) for s in (1024, 4096)]
    recs.append(_gen_record("nuq2", 8, 4096, 2.6, status="OOM"))
    (tmp_path / "generate.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "ppl.json").write_text(json.dumps(_ppl_doc("random:7b")))
    cap = {"schema": "kvquant.bench.capacity/v1", "kind": "capacity", "model": "random:7b", "random_weights": True,
           "device": "cuda", "gpu_name": "H100", "shape": {"num_layers": 32, "num_heads": 32, "num_kv_heads": 32,
                                                            "head_dim": 128},
           "weights_bytes": 13 * 2**30, "budget_bytes": 79 * 2**30, "budget_source": "free", "empirical": True,
           "datatypes": {dt: {"fit": {"bits_per_element": bits}, "analytic": {"max_context_batch1": mc}}
                         for dt, bits, mc in (("fp16", 16.0, 100000), ("nuq3", 3.6, 500000))},
           "rows": [{"datatype": dt, "context": s, "analytic_max_batch": b, "empirical_max_batch": e,
                     "empirical_exact": True} for dt, s, b, e in (("fp16", 4096, 33, 32), ("fp16", 32768, 4, 4),
                                                                   ("nuq3", 4096, 150, 147), ("nuq3", 32768, 18, 18))]}
    (tmp_path / "capacity.json").write_text(json.dumps(cap))
    (tmp_path / "kernels.json").write_text(json.dumps([
        {"kind": "device", "name": "H100", "copy_bw_GBps": 3000.0, "torch": "2.11"},
        {"kind": "decode", "shape": "mha", "context": 4096, "batch": 8, "datatype": "nuq3", "fp16_ms": 0.5,
         "kernel_ms": 0.2, "speedup_vs_fp16": 2.5}]))
    (tmp_path / "broken.json").write_text("{not json")
    return tmp_path


def _pngs(path: Path) -> list[Path]:
    return sorted((path / "figures").glob("*.png"))


def test_report_from_synthetic_results(synthetic_dir: Path) -> None:
    res = load_results(synthetic_dir)
    assert len(res.generate) == 13 and len(res.capacity) == 1 and len(res.ppl) == 1 and len(res.kernels) == 2
    assert any("broken.json" in s for s in res.skipped)
    report = build_report(synthetic_dir)
    text = report.read_text()
    assert report == synthetic_dir / "report.md"
    assert "random weights: memory/throughput only, not accuracy" in text
    assert "| nuq3 | 8 | 4096 | 32 | ok |" in text  # throughput table
    assert "| nuq2 | 8 | 4096 | OOM |" in text  # memory table keeps the OOM row
    assert "#### Not measured" in text and "CUDA out of memory" in text
    assert "| 4096 | 33 / 32 | 150 / 147 |" in text  # capacity table
    assert "Other processes held" not in text
    assert "**Pareto-optimal (bits/element vs ΔPPL):** fp16, nuq4, nuq3, nuq2." in text
    assert "**Pareto-optimal (J/token vs ΔPPL):**" in text and "Not placed: quanto4" in text
    assert "| decode | mha | 4096 | 8 | nuq3 |" in text
    assert "Missing" not in text
    names = {p.name for p in _pngs(synthetic_dir)}
    assert {"throughput_random_7b_nvidia_h100_80gb_hbm3.png", "memory_random_7b_nvidia_h100_80gb_hbm3.png",
            "energy_random_7b_nvidia_h100_80gb_hbm3.png"} <= names
    assert any(n.startswith("capacity_") for n in names) and any(n.startswith("pareto_") for n in names)
    for p in _pngs(synthetic_dir):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
        assert f"](figures/{p.name})" in text


def test_report_with_missing_inputs(tmp_path: Path) -> None:
    text = build_report(tmp_path).read_text()
    assert text.count("_Missing:") == 4 and "No recognised result files" in text
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")


def test_report_from_csv_only_and_without_matplotlib(synthetic_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from kvquant.bench.common import ResultWriter

    out = tmp_path / "csvonly"
    w = ResultWriter(out, "generate", gen.FIELDS)
    for r in load_results(synthetic_dir).generate:
        w.write(r)
    w.jsonl_path.unlink()
    res = load_results(out)
    assert len(res.generate) == 13 and "generate (csv)" in res.files
    r = next(x for x in res.generate if x["datatype"] == "nuq3" and x["batch"] == 8 and x["prompt_len"] == 4096)
    assert r["random_weights"] is True and isinstance(r["kv_bytes"], int) and r["error"] is None

    def no_mpl():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plots_mod, "_plt", no_mpl)
    text = build_report(out).read_text()
    assert "matplotlib is not installed" in text and "| nuq3 | 8 | 4096 | 32 | ok |" in text
    assert _pngs(out) == []


# ----------------------------------------------------------------------------------------------------
# real small bench output


def test_report_from_real_bench_output(tmp_path: Path) -> None:
    bm = load_bench_model("random:tiny", None, "cpu")
    s = gen.GenerateSettings(datatypes=["fp16", "nuq4"], batches=[1, 2], prompt_lens=[32, 64], gen=2, warmup=0,
                             progress=False)
    gen.run_generate_benchmark(bm, s, tmp_path / "res")
    from kvquant.cli.main import main

    main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep" / "r.md")])
    text = (tmp_path / "rep" / "r.md").read_text()
    assert "### random:tiny on cpu" in text and "| nuq4 | 2 | 64 | 2 | ok |" in text
    assert "_Energy unavailable for these runs: unavailable: CPU run" in text
    assert "n/a (CPU)" in text  # peak memory is not faked on CPU
    assert "_Missing: no `capacity.json`" in text and "_Missing: no `kvquant eval ppl` JSON" in text
    pngs = sorted((tmp_path / "rep" / "figures").glob("*.png"))
    assert [p.name for p in pngs] == ["memory_random_tiny_cpu.png", "throughput_random_tiny_cpu.png"]


def test_capacity_report_flags_memory_held_elsewhere(synthetic_dir: Path) -> None:
    path = synthetic_dir / "capacity.json"
    doc = json.loads(path.read_text())
    doc.update(held_by_other_processes_bytes=48 * 2**30, device_total_bytes=80 * 2**30)
    path.write_text(json.dumps(doc))
    assert "**Other processes held 48.0 GiB of the GPU during this run**" in build_report(synthetic_dir).read_text()
