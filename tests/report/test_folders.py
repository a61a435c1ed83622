"""``kvquant report`` on a folder of folders (a sweep's results): subfolders are read, hidden ones are not, the
configurations share one Pareto front, long-context rows become tables and heat maps, the sweep's unfinished jobs
are listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvquant.report import build_report, load_results
from kvquant.report.across import across_groups
from kvquant.report.load import group_ppl

pytest.importorskip("matplotlib")


def _ppl(path: Path, calibration: str, rows: dict[str, tuple[float, float]], ctx: int = 128) -> None:
    fp16 = rows["fp16"][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "meta": {"model": "tiny", "data": "d", "calibration": calibration, "ctx": ctx, "prefill": ctx // 2,
                 "chunk": 16, "windows": 2, "config": {"datatype": "fp16", "outlier_fraction": 0.01}},
        "results": [{"datatype": dt, "ppl": p, "bits_per_element": b, "tokens": 100,
                     "delta_ppl": None if dt == "fp16" else p - fp16} for dt, (p, b) in rows.items()]}))


def _gen(path: Path, batch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"kind": "generate", "model": "m", "device": "cpu", "datatype": "nuq3", "batch": batch, "prompt_len": 64,
           "gen_tokens": 4, "status": "ok", "timestamp": "2026-01-01T00:00:00"}
    path.write_text(json.dumps(rec) + "\n")


def test_subfolders_are_read_and_hidden_folders_are_not(tmp_path: Path) -> None:
    rows = {"fp16": (10.0, 16.0), "nuq3": (10.5, 3.5)}
    _ppl(tmp_path / "ppl/cal=a/ppl.json", "a.safetensors", rows)
    _ppl(tmp_path / "ppl/cal=b/ppl.json", "b.safetensors", rows)
    _ppl(tmp_path / "ppl/.cal=c.partial/ppl.json", "c.safetensors", rows)  # a job still running (or killed)
    _ppl(tmp_path / ".sweep/state/ppl.json", "d.safetensors", rows)
    _gen(tmp_path / "generate/batch=1/generate.jsonl", 1)
    _gen(tmp_path / "generate/batch=8/generate.jsonl", 8)
    res = load_results(tmp_path)
    assert sorted(res.files["ppl"]) == ["ppl/cal=a/ppl.json", "ppl/cal=b/ppl.json"]
    assert sorted(r["batch"] for r in res.generate) == [1, 8] and len(res.files["generate"]) == 2


def test_one_pareto_front_across_configurations(tmp_path: Path) -> None:
    # int3 does not depend on the codebooks: the same in both configurations, one point
    _ppl(tmp_path / "ppl/sens=none/ppl.json", "none.safetensors",
         {"fp16": (10.0, 16.0), "nuq3": (10.4, 3.5), "int3": (10.6, 3.5), "nuq2": (11.5, 2.5)})
    _ppl(tmp_path / "ppl/sens=fisher/ppl.json", "fisher.safetensors",
         {"fp16": (10.0, 16.0), "nuq3": (10.2, 3.5), "int3": (10.6, 3.5), "nuq2": (12.5, 2.5)})
    _ppl(tmp_path / "ppl/ctx=256/ppl.json", "none.safetensors", {"fp16": (9.0, 16.0), "nuq3": (9.1, 3.5)}, ctx=256)
    (group,) = across_groups(group_ppl(load_results(tmp_path).ppl))  # ctx 256 is comparable with nothing
    labels = [r["_label"] for r in group["results"]]
    assert labels == ["fp16", "nuq3 · sens=fisher", "nuq3 · sens=none", "nuq2 · sens=fisher", "nuq2 · sens=none",
                      "int3"]
    text = build_report(tmp_path).read_text()
    section = text[text.index("## Accuracy vs cost across configurations"):]
    assert "**Pareto-optimal across configurations (bits/element vs ΔPPL):** fp16, nuq3 · sens=fisher, " \
           "nuq2 · sens=none." in section
    assert "| int3 | 3.50 |" in section and "| nuq3 · sens=none | 3.50 |" in section
    assert (tmp_path / "figures/pareto_across_tiny_128.png").is_file()
    # a single configuration has no cross-configuration section
    for p in ("ppl/sens=fisher/ppl.json", "ppl/ctx=256/ppl.json"):
        (tmp_path / p).unlink()
    assert "across configurations" not in build_report(tmp_path).read_text()


def test_rows_without_fp16_and_rotated_rows_join_the_front(tmp_path: Path) -> None:
    """A run of quantized datatypes alone (no fp16 row) is placed against the fp16 row of the comparable files; a
    row whose cache rotated its channels is labelled with the rotation."""
    _ppl(tmp_path / "ppl/plain/ppl.json", "a.safetensors", {"fp16": (10.0, 16.0), "int4": (10.4, 4.5)})
    _ppl(tmp_path / "ppl/rot/ppl.json", "b.safetensors", {"fp16": (10.0, 16.0), "int4": (10.2, 4.5)})
    doc = json.loads((tmp_path / "ppl/rot/ppl.json").read_text())
    doc["meta"]["config"]["rotation"] = "hadamard"
    doc["results"] = [{**r, "delta_ppl": None, "config": {"datatype": "int4", "rotation": "hadamard"}}
                      for r in doc["results"] if r["datatype"] != "fp16"]
    (tmp_path / "ppl/rot/ppl.json").write_text(json.dumps(doc))
    (group,) = across_groups(group_ppl(load_results(tmp_path).ppl))
    rows = {r["_label"]: r for r in group["results"]}
    assert sorted(rows) == ["fp16 · plain", "int4 + hadamard · rot", "int4 · plain"]
    assert rows["int4 + hadamard · rot"]["delta_ppl"] == pytest.approx(0.2)
    assert rows["int4 + hadamard · rot"]["delta_ppl_pct"] == pytest.approx(2.0)
    assert group["_notes"] == ["rot has no fp16 row: its ΔPPL is against the fp16 PPL 10.0000 of the other files"]
    section = build_report(tmp_path).read_text()
    assert "**Pareto-optimal across configurations (bits/element vs ΔPPL):** fp16 · plain, int4 + hadamard · rot." \
        in section and "rot has no fp16 row" in section


def test_a_sweeps_unfinished_jobs_are_listed(tmp_path: Path) -> None:
    from kvquant.sweep import Job, JobState, SweepDir
    from kvquant.sweep.state import write_state

    sweep = SweepDir(tmp_path)
    jobs = [Job("ppl/ctx=64", "ppl", ["eval", "ppl"], [], {"out": "ppl.json"}),
            Job("ppl/ctx=128", "ppl", ["eval", "ppl"], [], {"out": "ppl.json"})]
    sweep.write_jobs("g", jobs)
    _ppl(tmp_path / "ppl/ctx=64/ppl.json", "c", {"fp16": (10.0, 16.0), "nuq3": (10.5, 3.5)}, ctx=64)
    write_state(sweep, JobState(jobs[0].id, attempts=1, argv=jobs[0].argv(sweep.job_dir(jobs[0]))).finish("completed"))
    write_state(sweep, JobState(jobs[1].id, attempts=1).finish("failed", failure="oom", reason="out of memory: x"))
    text = build_report(tmp_path).read_text()
    assert "Grid `g`: 2 jobs, 1 completed, 1 failed." in text
    assert "| `ppl/ctx=128` | failed | 1 | out of memory: x |" in text and "`ppl/ctx=64` |" not in text


def test_files_of_one_folder_are_named_by_what_sets_them_apart() -> None:
    from kvquant.report.across import _where

    assert _where(["smollm2_ppl.json", "smollm2_ppl_int.json", "smollm2_ppl_kv-widths.json"]) == [
        "smollm2_ppl", "int", "kv-widths"]
    assert _where(["a/x/ppl.json", "b/y/ppl.json"]) == ["x", "y"]
    assert _where(["r/ppl.json", "r/ppl.json"]) == ["r/ppl.json", "r/ppl.json"]  # nothing sets them apart
