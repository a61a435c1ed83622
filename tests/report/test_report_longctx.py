"""The long-context section of ``kvquant report``: heat-map grid and figure, accuracy-vs-bits and by-length tables
from a small JSON-lines file."""

from __future__ import annotations

import json

import pytest

from kvquant.report import build_report, load_results
from kvquant.report.longctx import (
    accuracy_bits_points,
    accuracy_bits_table,
    caches_in,
    heatmap_grid,
    length_table,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict]:
    acc = {"fp16": 100.0, "nuq3": 75.0, "quanto2k": 50.0, "snapkv@nuq3": 25.0}
    kinds = {"fp16": "dynamic", "nuq3": "kvquant", "quanto2k": "baseline", "snapkv@nuq3": "press"}
    bits = {"fp16": 32.0, "nuq3": 4.0, "quanto2k": 3.5, "snapkv@nuq3": 4.0}
    out = []
    for cache in ("snapkv@nuq3", "quanto2k", "nuq3", "fp16"):  # deliberately out of report order
        for length in (2048, 4096):
            for depth in (0, 50, 100):
                a = 0.0 if (cache == "nuq3" and depth == 100 and length == 4096) else acc[cache]
                out.append({"kind": "longctx", "model": "m", "task": "passkey", "length": length, "depth": depth,
                            "cache": cache, "cache_kind": kinds[cache], "n": 2, "seed": 0, "accuracy": a,
                            "bits_per_element": bits[cache], "kv_bytes": 2**20 * bits[cache], "seconds": 1.0,
                            "compression_ratio": 0.75 if cache.startswith("snapkv") else None})
        out.append({"kind": "longctx", "model": "m", "task": "vt", "length": 2048, "depth": None, "cache": cache,
                    "cache_kind": kinds[cache], "n": 4, "seed": 0, "accuracy": 50.0, "bits_per_element": bits[cache],
                    "kv_bytes": 2**20 * bits[cache], "seconds": 1.0})
    return out


def test_grid_and_tables():
    recs = _records()
    assert caches_in(recs) == ["fp16", "nuq3", "quanto2k", "snapkv@nuq3"]
    depths, lengths, grid = heatmap_grid(recs, "nuq3")
    assert depths == [0.0, 50.0, 100.0] and lengths == [2048, 4096]
    assert grid[2] == [75.0, 0.0] and grid[0] == [75.0, 75.0]
    table = accuracy_bits_table(recs)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert list(rows) == ["fp16", "nuq3", "quanto2k", "snapkv@nuq3 (evicts 75%)"]
    # nuq3: passkey mean (5 x 75 + 0) / 6 = 62.5, vt 50, mean 56.25 vs fp16 (100 + 50) / 2 = 75
    assert "| 62.5 | 50.0 | 56.2 | -18.8 |" in rows["nuq3"] and "| 4.00 | 4.00 |" in rows["nuq3"]
    by_length = length_table(recs)
    assert "| 2K | 4K |" in by_length and "| nuq3 | 65.0 | 50.0 |" in by_length  # 2K: (3x2x75 + 4x50) / 10


def test_report_draws_the_heat_map(tmp_path):
    pytest.importorskip("matplotlib")
    recs = _records()
    (tmp_path / "longctx.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "longctx", "tor')
    stale = dict(recs[0], accuracy=1.0)  # a rerun of a cell in another file: the last file read (by name) wins
    (tmp_path / "z_rerun.jsonl").write_text(json.dumps(stale) + "\n")
    res = load_results(tmp_path)
    assert len(res.longctx) == len(recs) and "longctx" in res.files
    assert any("1 unreadable line" in s for s in res.skipped)
    assert next(r for r in res.longctx if r["cache"] == stale["cache"] and r["length"] == stale["length"]
                and r["depth"] == stale["depth"] and r["task"] == "passkey")["accuracy"] == stale["accuracy"]
    text = build_report(tmp_path).read_text()
    assert "## Long-context retrieval" in text and "#### Needle heat map: passkey" in text
    assert "Needle heat map: vt" not in text  # no depth, no heat map
    png = tmp_path / "figures" / "needle_m_passkey.png"
    assert png.read_bytes()[:8] == PNG
    assert "**Pareto-optimal (bits/element vs accuracy over passkey, vt):** fp16, nuq3, quanto2k." in text
    assert (tmp_path / "figures" / "needle_pareto_m_bits.png").read_bytes()[:8] == PNG


def test_accuracy_bits_pareto_front():
    """The front: no other cache has fewer (or equal) bits and higher (or equal) accuracy, one of them strictly.
    nuq3 (4 bits, 56.25) beats snapkv@nuq3 (4 bits, 37.5); quanto2k (3.5 bits, 50) is cheaper than nuq3; fp16 is the
    most accurate. Tasks that some cache did not run, and caches without bits, are left out."""
    recs = _records()
    pts, tasks = accuracy_bits_points(recs)
    assert tasks == ["passkey", "vt"]
    got = {c: (b, round(a, 2), on) for c, b, a, on in pts}
    assert got == {"fp16": (32.0, 75.0, True), "nuq3": (4.0, 56.25, True), "quanto2k": (3.5, 50.0, True),
                   "snapkv@nuq3": (4.0, 37.5, False)}
    extra = [dict(r, cache="nuq2", bits_per_element=3.0, accuracy=60.0) for r in recs
             if r["cache"] == "nuq3" and r["task"] == "passkey"]  # no vt: only passkey is common now
    pts, tasks = accuracy_bits_points(recs + extra)
    assert tasks == ["passkey"]
    front = {c for c, _, _, on in pts if on}
    assert front == {"fp16", "nuq3", "nuq2"}  # nuq2 (3 bits, 60) beats quanto2k (3.5 bits, 50)
    no_bits = [dict(r, cache="odd", bits_per_element=None) for r in recs if r["cache"] == "fp16"]
    assert "odd" not in {c for c, *_ in accuracy_bits_points(recs + no_bits)[0]}
