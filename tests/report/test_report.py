"""``kvquant report``: loading, tables, figures and Pareto fronts from synthetic and real small results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvquant.bench import generate as gen
from kvquant.bench.model import load_bench_model
from kvquant.report import build_report, load_results, pareto_mask, tradeoff_points
from kvquant.report import plots as plots_mod
from kvquant.report import tables as tables_mod
from kvquant.report.load import group_ppl, ppl_protocol
from kvquant.report.pareto import dominators, energy_per_datatype

PNG = b"\x89PNG\r\n\x1a\n"
pytest.importorskip("matplotlib")


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
    by = {p.datatype: p for p in pts}  # the unquantized row is named by what it stores: 16.5 bits, fp16
    assert by["exact (fp16)"].delta_ppl == 0.0 and by["exact (fp16)"].bits_per_element == 16.5
    assert [d for d in by if by[d].pareto_bits] == ["exact (fp16)", "nuq4", "nuq3", "nuq2"]
    assert by["int3"].pareto_bits is False and by["int3"].dominated_by == ["nuq3"]
    assert by["quanto4"].bits_per_element is None and any("quanto4" in n for n in notes)
    # J/token vs ΔPPL: fp16 (1.0, 0), nuq4 (0.8, .05), int3 (0.7, 1.0) on the front; nuq3, nuq2 beaten by nuq4
    assert {d for d in by if by[d].pareto_energy} == {"exact (fp16)", "nuq4", "int3"}
    assert by["quanto4"].pareto_energy is None and by["nuq2"].pareto_all is None  # quanto4 has no bits


def test_energy_per_datatype_uses_common_configs() -> None:
    recs = [{"status": "ok", "datatype": dt, "batch": b, "prompt_len": s, "j_per_token": j}
            for dt, b, s, j in [("fp16", 1, 1024, 2.0), ("fp16", 8, 1024, 0.5), ("nuq3", 1, 1024, 1.0),
                                ("nuq3", 8, 1024, 0.4), ("nuq3", 8, 4096, 9.0), ("fp16", 8, 4096, None)]]
    recs.append({"status": "OOM", "datatype": "nuq3", "batch": 32, "prompt_len": 1024, "j_per_token": None})
    e, how = energy_per_datatype(recs)
    assert e == {"fp16": pytest.approx(1.25), "nuq3": pytest.approx(0.7)} and "B=1 S=1024, B=8 S=1024" in how
    assert energy_per_datatype([])[0] == {}


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
    assert "**Pareto-optimal (bits/element vs ΔPPL):** exact (fp16), nuq4, nuq3, nuq2." in text
    assert "**Pareto-optimal (J/token vs ΔPPL):**" in text and "Not placed: quanto4" in text
    assert "| mha | 4096 | 8 | nuq3 | 0.500 | - | 0.200 | 2.50 |" in text
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
    from kvquant.bench.results import ResultWriter

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


def _ppl_file(rows: list[tuple[str, float]], ctx: int = 2048, base_dt: str = "nuq3", **cfg_extra) -> dict:
    """A `kvquant eval ppl` document as the CLI writes it; ΔPPL against fp16 of this file only (as eval does)."""
    ref = next((p for d, p in rows if d == "fp16"), None)
    cfg = {"datatype": base_dt, "outlier_fraction": 0.01, "n_sink": 1, "residual_length": 0, "pre_rope": True,
           "page_size": 64, **cfg_extra}
    return {"meta": {"model": "tiny-lm", "data": "wikitext2-raw", "calibration": "/cal", "skipped": {},
                     "ctx": ctx, "prefill": ctx // 2, "chunk": 64, "windows": 8, "config": cfg},
            "results": [{"datatype": d, "ppl": p, "nll": 2.0, "tokens": 8184, "windows": 8,
                         "bits_per_element": {"fp16": 32.0, "nuq4": 4.9, "nuq3": 3.9, "int4": 4.9,
                                              "nuq2": 2.9}.get(d),
                         "seconds": 1.0, "delta_ppl": None if ref is None or d == "fp16" else p - ref,
                         "delta_ppl_pct": None if ref is None or d == "fp16" else 100 * (p - ref) / ref}
                        for d, p in rows]}


def _section(text: str, start: str) -> str:
    """The Markdown from the heading line containing ``start`` up to the next heading of level 2 or 3."""
    i = text.index(start)
    ends = [j for j in (text.find("\n### ", i + 1), text.find("\n## ", i + 1)) if j >= 0]
    return text[i:min(ends) if ends else len(text)]


def test_ppl_files_of_same_protocol_merge(tmp_path: Path) -> None:
    # a: fp16 + nuq4; b: nuq3 + int4, no fp16, another base datatype and another `skipped` (not protocol);
    # c: same model at another ctx (its own fp16): stays separate
    (tmp_path / "a.json").write_text(json.dumps(_ppl_file([("fp16", 10.0), ("nuq4", 10.05)])))
    b = _ppl_file([("nuq3", 10.25), ("int4", 10.4)], base_dt="nuq4")
    b["meta"]["skipped"] = {"quanto4": "optimum.quanto is not installed"}
    (tmp_path / "b.json").write_text(json.dumps(b))
    (tmp_path / "c.json").write_text(json.dumps(_ppl_file([("fp16", 8.0), ("nuq2", 9.0)], ctx=4096)))
    text = build_report(tmp_path).read_text()
    assert text.count("### tiny-lm") == 2
    merged = _section(text, "### tiny-lm (merged from `a.json` + `b.json`; ctx 2048, 8 windows)")
    assert "ΔPPL and ΔPPL % recomputed against the fp16 row of `a.json`" in merged
    # b's rows get ΔPPL from a's fp16 (10.0): nuq3 +0.25 (+2.50 %), int4 +0.40 (+4.00 %); rows sorted by datatype
    assert "| nuq3 | 10.2500 | +0.2500 | +2.50 | 3.90 | 8184 | `b.json` |" in merged
    assert "| int4 | 10.4000 | +0.4000 | +4.00 | 4.90 | 8184 | `b.json` |" in merged
    assert "| nuq4 | 10.0500 | +0.0500 | +0.50 | 4.90 | 8184 | `a.json` |" in merged
    order = ["| exact (fp32) |", "| nuq4 |", "| nuq3 |", "| int4 |"]
    assert [merged.index(x) for x in order] == sorted(merged.index(x) for x in order)
    assert "Not placed" not in merged  # every row has a ΔPPL, so every row is on the Pareto table
    assert "**Pareto-optimal (bits/element vs ΔPPL):** exact (fp32), nuq4, nuq3." in merged
    assert "c.json" not in merged and "nuq2" not in merged
    alone = _section(text, "### tiny-lm (`c.json`; ctx 4096, 8 windows)")
    assert "| nuq2 | 9.0000 | +1.0000 | +12.50 | 2.90 | 8184 |" in alone and "merged" not in alone
    assert len(list((tmp_path / "figures").glob("pareto_*.png"))) == 2


def test_ppl_protocol_and_grouping_rules() -> None:
    a = {**_ppl_file([("fp16", 10.0)]), "_file": "a.json"}
    assert ppl_protocol(a["meta"]) == ppl_protocol(_ppl_file([("int4", 10.2)], base_dt="int4")["meta"])
    for other in (_ppl_file([], ctx=1024), _ppl_file([], outlier_fraction=0.0), _ppl_file([], page_size=128)):
        assert ppl_protocol(other["meta"]) != ppl_protocol(a["meta"])
    no_prefill = _ppl_file([])
    del no_prefill["meta"]["prefill"]  # a key missing from one file only: different protocols, no error
    assert ppl_protocol(no_prefill["meta"]) != ppl_protocol(a["meta"])
    assert ppl_protocol({}) is None and ppl_protocol(None) is None and ppl_protocol({"ctx": 2048}) is None
    # files with no model in their meta are never merged
    bare = [{"meta": {"ctx": 2048}, "results": [{"datatype": "fp16", "ppl": 9.0}], "_file": f"{i}.json"}
            for i in range(2)]
    assert [g["_files"] for g in group_ppl(bare)] == [["0.json"], ["1.json"]]
    # a single file is passed through unchanged (stored ΔPPL kept, no recomputation)
    single = {**_ppl_file([("fp16", 10.0), ("nuq4", 10.05)]), "_file": "s.json"}
    single["results"][1]["delta_ppl"] = 0.123
    (g,) = group_ppl([single])
    assert g["results"] == single["results"] and g["_files"] == ["s.json"] and g["_reference"] == "s.json"


def test_ppl_merge_duplicate_datatypes() -> None:
    a = {**_ppl_file([("fp16", 10.0), ("nuq3", 10.2)]), "_file": "a.json"}
    b = {**_ppl_file([("nuq3", 10.2 * (1 + 1e-7)), ("int4", 10.5)]), "_file": "b.json"}
    (g,) = group_ppl([a, b])
    nuq3 = [r for r in g["results"] if r["datatype"] == "nuq3"]
    assert len(nuq3) == 1 and nuq3[0]["_file"] == "a.json, b.json" and not g["_notes"]  # they agree: one row
    assert "| nuq3 | 10.2000 | +0.2000 | +2.00 | 3.90 | 8184 | `a.json`, `b.json` |" in tables_mod.ppl_table(g)
    # disagreeing nuq3 and fp16: every row is kept and labelled, b's rows use b's own fp16 (10.5)
    c = {**_ppl_file([("fp16", 10.5), ("nuq3", 10.8)]), "_file": "c.json"}
    d = {**_ppl_file([("int4", 10.7)]), "_file": "d.json"}
    (g,) = group_ppl([a, c, d])
    rows = {(r["datatype"], r["_file"]): r for r in g["results"]}
    assert set(rows) == {("fp16", "a.json"), ("fp16", "c.json"), ("nuq3", "a.json"), ("nuq3", "c.json"),
                         ("int4", "d.json")}
    assert rows[("nuq3", "c.json")]["delta_ppl"] == pytest.approx(0.3)  # vs c's fp16
    assert rows[("nuq3", "a.json")]["delta_ppl"] == pytest.approx(0.2)  # vs a's fp16
    assert rows[("int4", "d.json")]["delta_ppl"] == pytest.approx(0.7)  # d has no fp16: the first one, a's
    assert g["_reference"] == "a.json"
    assert any(n.startswith("nuq3 disagrees") and "`c.json`: PPL 10.8000" in n for n in g["_notes"])
    assert any("fp16 of their own file" in n for n in g["_notes"])
    pts, _ = tradeoff_points(g)
    assert {p.datatype for p in pts} == {"exact (fp32) (a.json)", "exact (fp32) (c.json)", "nuq3 (a.json)",
                                         "nuq3 (c.json)", "int4"}


def _kernel_rows() -> list[dict]:
    dec = {"kind": "decode", "shape": "mha", "Hq": 32, "Hkv": 32, "D": 128, "datatype": "nuq3", "outliers": 0.01}
    return [
        {"kind": "device", "name": "H100", "copy_bw_GBps": 3000.0, "torch": "2.11"},
        {**dec, "context": 1024, "batch": 8, "kernel_ms": 0.207, "kernel_floor_ms": 0.0108,
         "kernel_frac_floor": 0.0521, "dequant_ms": 10.274, "fp16_ms": 0.0609, "speedup_vs_fp16": 0.294,
         "speedup_vs_dequant": 49.62, "hf_quanto4_bytes": 1, "hf_quanto4_ms": 73.67, "speedup_vs_hf_quanto4": 355.8,
         "hf_hqq4_bytes": 1, "hf_hqq4_ms": 68.877, "speedup_vs_hf_hqq4": 332.7},
        {**dec, "context": 131072, "batch": 32, "kernel_ms": 82.9, "kernel_frac_floor": 0.0597, "dequant_ms": None,
         "hf_quanto4_ms": None, "hf_quanto4_note": "does not fit (it dequantizes the whole layer every step)",
         "hf_hqq4_ms": None, "hf_hqq4_note": "hqq is not installed (pip install hqq)"},
        {**dec, "context": 262144, "batch": 32, "skipped": "quantized cache does not fit"},
        {"kind": "prefill", "what": "keys", "shape": "gqa", "tokens": 4096, "H": 8, "D": 128, "datatype": "nuq3",
         "kernel_ms": 0.0966, "kernel_GBps": 105.2, "kernel_frac_bw": 0.035, "write_ms": 0.663,
         "append_triton_ms": 5.314, "append_torch_ms": 5.768, "identical": True},
        {"kind": "decode_append", "what": "values", "shape": "gqa", "batch": 8, "H": 8, "prompt": 4096,
         "triton_ms": 2.876, "torch_ms": 4.389},
    ]


def test_kernels_table_columns(tmp_path: Path) -> None:
    (tmp_path / "kernels.json").write_text(json.dumps(_kernel_rows()))
    res = load_results(tmp_path)
    assert [r["kind"] for r in res.kernels] == ["device", "decode", "decode", "decode", "prefill", "decode_append"]
    text = build_report(tmp_path).read_text()
    assert ("| shape | context | batch | datatype | fp16 ms | dequant ms | kernel ms | × fp16 | × dequant | "
            "floor frac | hf quanto4 ms | hf hqq4 ms | note |") in text
    assert ("| mha | 1024 | 8 | nuq3 | 0.061 | 10.274 | 0.207 | 0.29 | 49.6 | 0.052 | 73.670 (×356) | "
            "68.877 (×333) | - |") in text
    # not measured: the short form of each note, the whole note once below the table
    assert "| mha | 131072 | 32 | nuq3 | - | - | 82.900 | - | - | 0.060 | does not fit | hqq is not installed | - |" \
        in text
    assert "quanto4: does not fit (it dequantizes the whole layer every step)" in text
    assert "| mha | 262144 | 32 | nuq3 | - | - | - | - | - | - | - | - | quantized cache does not fit |" in text
    # prefill and decode-append rows still render, in their own table
    assert ("| prefill | keys | gqa | 4096 | 1 | 8 | nuq3 | 0.097 | 105 | 0.035 | 0.663 | 5.314 | 5.768 | 1.09 | "
            "True |") in text
    assert "| decode append | values | gqa | 4096 | 8 | 8 | - | - | - | - | - | 2.876 | 4.389 | 1.53 | - |" in text
    # no hf baseline anywhere: no hf column
    assert "hf " not in tables_mod.kernels_table([{"kind": "decode", "kernel_ms": 1.0}])
    assert tables_mod.short_note("x" * 60).endswith("…") and len(tables_mod.short_note("x" * 60)) == 40


def test_report_out_directory(synthetic_dir: Path, tmp_path: Path) -> None:
    from kvquant.cli.main import main

    out_dir = tmp_path / "existing"
    out_dir.mkdir()
    main(["report", str(synthetic_dir), "--out", str(out_dir)])  # an existing directory
    assert (out_dir / "report.md").is_file() and _pngs(out_dir) and not (tmp_path / "figures").exists()
    assert "](figures/" in (out_dir / "report.md").read_text()
    # a new directory named with a trailing separator (a str: pathlib drops the separator)
    got = build_report(synthetic_dir, str(tmp_path / "new") + "/")
    assert got == tmp_path / "new" / "report.md" and got.is_file() and _pngs(tmp_path / "new")
    # an existing file keeps being overwritten in place
    f = tmp_path / "old.md"
    f.write_text("stale")
    main(["report", str(synthetic_dir), "--out", str(f)])
    assert f.read_text().startswith("# kvquant benchmark report") and _pngs(tmp_path)


def test_side_by_side_table_has_a_column_per_datatype() -> None:
    recs = [{"datatype": dt, "batch": b, "prompt_len": s, "status": st, "decode_ms_per_step": ms, "kv_bytes": kb}
            for dt, b, s, st, ms, kb in [("nuq3", 1, 1024, "ok", 49.5, 2**20), ("fp16", 1, 1024, "ok", 20.4, 4 * 2**20),
                                         ("fp16", 8, 32768, "OOM", None, None), ("nuq3", 8, 32768, "ok", 239.0, 2**30)]]
    text = tables_mod.side_by_side_table(recs, "decode_ms_per_step", ".1f")
    assert text.splitlines()[0] == "| batch | prompt | fp16 | nuq3 |"  # datatypes in the report's order
    assert "| 1 | 1024 | 20.4 | 49.5 |" in text and "| 8 | 32768 | OOM | 239.0 |" in text
    kv = tables_mod.side_by_side_table(recs, "kv_bytes", ".0f", 2**-20)
    assert "| 1 | 1024 | 4 | 1 |" in kv and "| 8 | 32768 | OOM | 1024 |" in kv


def test_report_reads_decode_profiles_and_backend_comparisons(tmp_path: Path) -> None:
    profile = {"config": {"kind": "decode", "batch": 1, "tokens": 4096}, "model": "random:7b", "random_weights": True,
               "results": [{"datatype": "fp16", "batch": 1, "prompt_len": 4096, "steps": 8, "wall_ms_per_step": 20.7,
                            "profiled_ms_per_step": 35.4, "device_busy_ms_per_step": 7.6, "launches_per_step": 1494.0,
                            "syncs_per_step": 0.25, "regions": {}, "rows": []},
                           {"datatype": "nuq3", "batch": 1, "prompt_len": 4096, "steps": 8, "wall_ms_per_step": 58.3,
                            "profiled_ms_per_step": 112.2, "device_busy_ms_per_step": 13.8,
                            "launches_per_step": 1831.0, "syncs_per_step": 1.25, "rows": [],
                            "regions": {"kvquant.kernel_decode": {"calls_per_step": 32.0, "host_ms_per_step": 48.04},
                                        "kvquant.append": {"calls_per_step": 64.0, "host_ms_per_step": 25.27}}}]}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    backends = [{"part": "device", "name": "GPU"},
                {"part": "e2e", "backend": "torch", "dtype": "float16", "batch": 4, "prompt": 2048, "new_tokens": 64,
                 "decode_tok_per_s": 60.1},
                {"part": "e2e", "backend": "triton", "dtype": "float16", "batch": 4, "prompt": 2048, "new_tokens": 64,
                 "decode_tok_per_s": 218.6},
                {"part": "e2e", "dtype": "float16", "identical_tokens": True, "tokens_compared": 256,
                 "max_logit_gap_until_divergence": 0.0073},
                {"part": "e2e_breakdown", "dtype": "float16", "kernel_ms_per_layer": 0.257, "append_ms_per_layer": 1.0}]
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    res = load_results(tmp_path)
    assert len(res.decode_profiles) == 1 and len(res.backends) == 5 and not res.ppl and not res.skipped
    text = build_report(tmp_path).read_text()
    assert "## Decode-step profile" in text
    assert "| 1 | 4096 | nuq3 | 58.3 | 112.2 | 13.8 | 1831 | 1.25 | - | 48.0 | - | 25.3 |" in text
    assert "## Cache backends in `model.generate`" in text
    assert "| float16 | 4 | 2048 | 64 | yes, 256 | 0.0073 | 60.1 | 218.6 | 0.26 | 1.00 |" in text


def test_unquantized_row_is_named_by_what_it_stores() -> None:
    from kvquant.report.load import row_label

    assert row_label({"datatype": "fp16", "label": "exact (bf16)", "bits_per_element": 16.0}) == "exact (bf16)"
    # files written before rows had labels: the measured bits tell the stored dtype
    assert row_label({"datatype": "fp16", "bits_per_element": 32.03}) == "exact (fp32)"
    assert row_label({"datatype": "fp16", "bits_per_element": 16.02}) == "exact (fp16)"
    assert row_label({"datatype": "fp16", "bits_per_element": None}) == "exact"
    assert row_label({"datatype": "nuq3", "bits_per_element": 3.9}) == "nuq3"


def test_partial_and_finished_files_of_one_protocol_merge(tmp_path: Path) -> None:
    """A run stopped part-way (`"complete": false`) and its finished rerun are one protocol; rows with their own
    config (the current format) read as before."""
    partial = _ppl_file([("fp16", 10.0)])
    done = _ppl_file([("fp16", 10.0), ("nuq3", 10.2)])
    for doc, complete in ((partial, False), (done, True)):
        doc["meta"]["complete"] = complete
        doc["meta"]["config"].pop("datatype")
        for r in doc["results"]:
            r["label"] = "exact (fp32)" if r["datatype"] == "fp16" else r["datatype"]
            r["config"] = {**doc["meta"]["config"], "datatype": r["datatype"]}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    (tmp_path / "done.json").write_text(json.dumps(done))
    res = load_results(tmp_path)
    groups = group_ppl(res.ppl)
    assert len(groups) == 1 and groups[0]["_files"] == ["done.json", "partial.json"]
    table = tables_mod.ppl_table(groups[0])
    assert "| exact (fp32) | 10.0000 |" in table and "| nuq3 | 10.2000 | +0.2000 |" in table
    assert "complete" not in " ".join(build_report(tmp_path).read_text().split("Protocol:")[1].split("\n")[:1])
