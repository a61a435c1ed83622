"""Long-context evaluation rows (``longctx*.jsonl``, as ``kvquant eval longctx`` writes them) shaped for tables and
heat maps.

Each row is a JSON object (rows with another ``"kind"`` than ``"longctx"`` are ignored); the report reads the first
of the names listed that the row has:

* model: ``model``; task: ``task`` (``passkey``, ``niah_single_2``, ...; default ``longctx``);
* the cache: ``datatype``, ``cache`` (``fp16``, ``nuq3``, ``quanto4k``, ``snapkv@nuq3``, ...);
* context length in tokens: ``length``, ``context``, ``context_len``, ``ctx``, ``seq_len``;
* depth of the needle (optional): ``depth``, ``needle_depth``, ``depth_pct``, ``position``;
* score (higher is better): ``accuracy``, ``score``, ``acc``, ``exact_match``, ``correct``, ``recall``
  (booleans count as 0/1; percentages stay percentages).

Rows with the same (model, task, cache, context, depth) are averaged. Rows without a context or a score are counted
and left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvquant.report.load import datatype_key

DATATYPE_KEYS = ("datatype", "cache")
CONTEXT_KEYS = ("length", "context", "context_len", "ctx", "seq_len")
DEPTH_KEYS = ("depth", "needle_depth", "depth_pct", "position")
SCORE_KEYS = ("accuracy", "score", "acc", "exact_match", "correct", "recall")


def _first(row: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


@dataclass
class HeatMap:
    """Mean scores of one (model, task): ``cells[(datatype, depth)][context]`` (depth None without depths)."""

    model: str
    task: str
    contexts: list[Any] = field(default_factory=list)
    depths: list[Any] = field(default_factory=list)
    datatypes: list[str] = field(default_factory=list)
    cells: dict[tuple[str, Any], dict[Any, float]] = field(default_factory=dict)
    counts: dict[tuple[str, Any], dict[Any, int]] = field(default_factory=dict)

    def mean_over_depths(self, datatype: str, context: Any) -> float | None:
        """The score of a datatype at a context, averaged over depths (rows weighted equally)."""
        tot, n = 0.0, 0
        for depth in self.depths or [None]:
            c = self.counts.get((datatype, depth), {}).get(context, 0)
            if c:
                tot += self.cells[(datatype, depth)][context] * c
                n += c
        return tot / n if n else None


def heat_maps(rows: list[dict[str, Any]]) -> tuple[list[HeatMap], int]:
    """One :class:`HeatMap` per (model, task), and how many rows were left out (no context or no score)."""
    sums: dict[tuple[str, str], dict[tuple[str, Any, Any], list[float]]] = {}
    dropped = 0
    for r in rows:
        if r.get("kind", "longctx") != "longctx":
            continue
        ctx, score = _first(r, CONTEXT_KEYS), _number(_first(r, SCORE_KEYS))
        if ctx is None or score is None:
            dropped += 1
            continue
        key = (str(r.get("model")), str(r.get("task") or "longctx"))
        cell = (str(_first(r, DATATYPE_KEYS)), _first(r, DEPTH_KEYS), ctx)
        acc = sums.setdefault(key, {}).setdefault(cell, [0.0, 0])
        acc[0] += score
        acc[1] += 1
    maps = []
    for (model, task), cells in sums.items():
        hm = HeatMap(model, task)
        hm.datatypes = sorted({dt for dt, _, _ in cells}, key=datatype_key)
        hm.contexts = sorted({c for _, _, c in cells}, key=_sort_key)
        depths = {d for _, d, _ in cells}
        hm.depths = [] if depths == {None} else sorted(depths, key=_sort_key)
        for (dt, depth, ctx), (tot, n) in cells.items():
            hm.cells.setdefault((dt, depth), {})[ctx] = tot / n
            hm.counts.setdefault((dt, depth), {})[ctx] = int(n)
        maps.append(hm)
    return maps, dropped


def _sort_key(v: Any) -> tuple[int, float, str]:
    n = _number(v)
    return (0, n, "") if n is not None else (1, 0.0, str(v))
