"""Pareto fronts (every objective minimised) and the accuracy-vs-cost points of each datatype."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvquant.report.load import row_label


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and strictly better in one (minimisation)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_mask(points: Sequence[Sequence[float]]) -> list[bool]:
    """``True`` for the points no other point dominates (ties are all kept).

    Raises:
        ValueError: points of different dimension or a non-finite coordinate.
    """
    pts = [tuple(float(x) for x in p) for p in points]
    if pts and len({len(p) for p in pts}) != 1:
        raise ValueError("all points need the same number of objectives")
    if any(not math.isfinite(x) for p in pts for x in p):
        raise ValueError("pareto_mask needs finite coordinates")
    return [not any(dominates(q, p) for j, q in enumerate(pts) if j != i) for i, p in enumerate(pts)]


def dominators(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """For each point, the indices of the points that dominate it."""
    pts = [tuple(float(x) for x in p) for p in points]
    return [[j for j, q in enumerate(pts) if j != i and dominates(q, p)] for i, p in enumerate(pts)]


@dataclass
class TradeoffPoint:
    """One datatype: its accuracy loss and its costs."""

    datatype: str
    delta_ppl: float
    bits_per_element: float | None
    bits_source: str
    j_per_token: float | None = None
    pareto_bits: bool | None = None
    pareto_energy: bool | None = None
    pareto_all: bool | None = None
    dominated_by: list[str] = field(default_factory=list)


def tradeoff_points(ppl_doc: dict[str, Any], j_per_token: dict[str, float] | None = None
                    ) -> tuple[list[TradeoffPoint], list[str]]:
    """Points of a ``kvquant eval ppl`` result (``fp16`` has ΔPPL 0) with Pareto flags; and notes on the
    rows that could not be placed. A row's ``_label`` (set by :func:`~kvquant.report.load.group_ppl` on rows
    that disagree between merged files) names its point; ``j_per_token`` is looked up by datatype.

    ``pareto_bits``: front of (bits/element, ΔPPL); ``pareto_energy``: (J/token, ΔPPL) over the points with
    an energy number; ``pareto_all``: (bits, J/token, ΔPPL) when every point has one.
    """
    notes: list[str] = []
    pts: list[TradeoffPoint] = []
    for r in ppl_doc.get("results", []):
        dt = str(r.get("datatype"))
        if dt == "plain":
            continue
        name = str(r.get("_label") or row_label(r))
        d = 0.0 if dt == "fp16" else r.get("delta_ppl")
        if not isinstance(d, (int, float)) or not math.isfinite(d):
            notes.append(f"{name}: no ΔPPL (fp16 missing from the perplexity results?)")
            continue
        bits, src = r.get("bits_per_element"), "measured (eval ppl)"
        if not isinstance(bits, (int, float)) or not math.isfinite(bits):
            if dt == "fp16":
                bits, src = 16.0, "nominal"
            else:
                notes.append(f"{name}: bits/element unknown (not a kvquant cache); left out of the bits front")
                bits, src = None, "unknown"
        e = (j_per_token or {}).get(dt)
        pts.append(TradeoffPoint(name, float(d), bits, src, e))
    placed = [p for p in pts if p.bits_per_element is not None]
    for p, ok, dom in zip(placed, pareto_mask([(p.bits_per_element, p.delta_ppl) for p in placed]),
                          dominators([(p.bits_per_element, p.delta_ppl) for p in placed])):
        p.pareto_bits = ok
        p.dominated_by = [placed[j].datatype for j in dom]
    with_e = [p for p in pts if p.j_per_token is not None]
    if with_e:
        for p, ok in zip(with_e, pareto_mask([(p.j_per_token, p.delta_ppl) for p in with_e])):
            p.pareto_energy = ok
        both = [p for p in with_e if p.bits_per_element is not None]
        if len(both) == len(pts):
            for p, ok in zip(both, pareto_mask([(p.bits_per_element, p.j_per_token, p.delta_ppl) for p in both])):
                p.pareto_all = ok
    return pts, notes


def energy_per_datatype(records: list[dict[str, Any]], datatypes: Sequence[str] | None = None
                        ) -> tuple[dict[str, float], str]:
    """Median J/token per datatype over the (batch, prompt) configurations every datatype measured.

    Returns the mapping and a sentence saying which configurations were used.
    """
    ok = [r for r in records if r.get("status") == "ok" and isinstance(r.get("j_per_token"), (int, float))]
    if not ok:
        return {}, "no configuration has an energy measurement"
    dts = list(datatypes) if datatypes else sorted({r["datatype"] for r in ok})
    by_dt: dict[str, dict[tuple[int, int], float]] = {}
    for r in ok:
        by_dt.setdefault(r["datatype"], {})[(r["batch"], r["prompt_len"])] = float(r["j_per_token"])
    present = [dt for dt in dts if dt in by_dt]
    common = set.intersection(*(set(by_dt[dt]) for dt in present)) if present else set()
    if common:
        out = {dt: statistics.median(by_dt[dt][c] for c in common) for dt in present}
        cfgs = ", ".join(f"B={b} S={s}" for b, s in sorted(common))
        return out, f"median over the configurations measured for every datatype ({cfgs})"
    out = {dt: statistics.median(by_dt[dt].values()) for dt in present}
    return out, "median over each datatype's own configurations (no configuration common to all datatypes)"
