"""The long-context section of the report (``kvquant eval longctx`` records): needle heat maps, accuracy-vs-bits
tables and the Pareto front of needle accuracy against bits per element."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvquant.report.load import datatype_key
from kvquant.report.markdown import fmt_num, format_table
from kvquant.report.pareto import pareto_mask

_KIND_ORDER = {"dynamic": 0, "kvquant": 1, "baseline": 2, "press": 3}


def cache_key(name: str, kind: str | None) -> tuple:
    """Sort key of a cache: fp16, kvquant datatypes (nuq4, nuq3, nuq2, int...), baselines, presses; more bits first
    within a family (``quanto4k`` before ``quanto2k``, ``snapkv@nuq3`` before ``snapkv@nuq2``); a tagged run
    (``nuq2+r128``) right after its untagged cache."""
    base, _, tag = name.partition("+")
    digits = re.findall(r"\d+", base)
    family = re.sub(r"\d+", "#", base)
    return (_KIND_ORDER.get(str(kind), 4), datatype_key(base) if kind in ("dynamic", "kvquant") else (0, ""),
            family, -int(digits[-1]) if digits else 0, tag)


def caches_in(records: list[dict[str, Any]]) -> list[str]:
    """The caches of ``records`` in report order."""
    kinds = {r.get("cache"): r.get("cache_kind") for r in records}
    return sorted(kinds, key=lambda c: cache_key(str(c), kinds[c]))


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _weighted_accuracy(records: list[dict[str, Any]]) -> float | None:
    """Mean accuracy over the samples of ``records`` (cells weighted by their ``n``)."""
    total = sum(int(r.get("n") or 1) for r in records)
    if not records or not total:
        return None
    return sum(float(r["accuracy"]) * int(r.get("n") or 1) for r in records) / total


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else v


def accuracy_bits_table(records: list[dict[str, Any]]) -> str:
    """One row per cache: bits per element, KV MiB per sequence, accuracy per task (mean over lengths and depths,
    samples weighted), the mean over tasks and its difference from ``fp16`` (only for a cache run on every task of
    the table)."""
    tasks = sorted({str(r.get("task")) for r in records})
    rows, ref = [], None
    by_cache: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_cache.setdefault(str(r.get("cache")), []).append(r)
    means = {c: _mean([_nan_if_none(_weighted_accuracy([r for r in rs if r.get("task") == t])) for t in tasks])
             if {r.get("task") for r in rs} >= set(tasks) else None for c, rs in by_cache.items()}
    ref = means.get("fp16")
    for cache in caches_in(records):
        rs = by_cache[str(cache)]
        per_task = [_weighted_accuracy([r for r in rs if r.get("task") == t]) for t in tasks]
        mean = means[str(cache)]
        delta = None if ref is None or mean is None or cache == "fp16" else f"{mean - ref:+.1f}"
        ratio = _mean([r.get("compression_ratio") for r in rs if r.get("compression_ratio") is not None])
        name = f"{cache} (evicts {ratio:.0%})" if ratio is not None else str(cache)
        rows.append([name, fmt_num(_mean([r.get("bits_per_element") for r in rs]), ".2f"),
                     fmt_num((_mean([r.get("kv_bytes") for r in rs]) or 0) / 2**20, ".2f"),
                     *[fmt_num(a, ".1f") for a in per_task], fmt_num(mean, ".1f"), delta,
                     fmt_num(sum(float(r.get("seconds") or 0) for r in rs), ".0f")])
    return format_table(rows, ["cache", "bits/elem", "KV MiB/seq", *tasks, "mean", "Δ vs fp16", "seconds"])


def accuracy_bits_points(records: list[dict[str, Any]]) -> tuple[list[tuple[str, float, float, bool]], list[str]]:
    """``(cache, bits per element, accuracy, on the Pareto front)`` per cache with measured bits, the accuracy the mean
    over the tasks every such cache ran (each task's cells weighted by their samples); the front keeps the caches no
    other cache beats in both fewer bits and higher accuracy. Also those tasks."""
    by_cache: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("bits_per_element") is not None:
            by_cache.setdefault(str(r.get("cache")), []).append(r)
    if not by_cache:
        return [], []
    common = set.intersection(*({str(r.get("task")) for r in rs} for rs in by_cache.values()))
    tasks = sorted(common)
    if not tasks:
        return [], []
    pts = []
    for cache in caches_in([r for rs in by_cache.values() for r in rs]):
        rs = by_cache[str(cache)]
        acc = _mean([_nan_if_none(_weighted_accuracy([r for r in rs if r.get("task") == t])) for t in tasks])
        bits = _mean([r.get("bits_per_element") for r in rs])
        if acc is not None and bits is not None:
            pts.append((str(cache), bits, acc))
    front = pareto_mask([(b, -a) for _, b, a in pts]) if pts else []
    return [(c, b, a, on) for (c, b, a), on in zip(pts, front)], tasks


def plot_accuracy_bits(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Needle accuracy vs bits per element, one point per cache: the Pareto front (fewer bits, higher accuracy)
    filled, joined and named, dominated caches hollow and named in grey. ``None`` without two caches to compare."""
    pts, tasks = accuracy_bits_points(records)
    if len(pts) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    front = sorted((p for p in pts if p[3]), key=lambda p: p[1])
    ax.step([p[1] for p in front], [p[2] for p in front], where="post", color="C0", alpha=0.6, label="Pareto front")
    for cache, bits, acc, on in pts:
        ax.scatter(bits, acc, s=50, color="C0" if on else "none", edgecolors="C0" if on else "gray", zorder=3)
        ax.annotate(cache, (bits, acc), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color="black" if on else "gray")
    ax.scatter([], [], s=50, color="none", edgecolors="gray", label="dominated")
    if max(p[1] for p in pts) / min(p[1] for p in pts) > 4:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per element held")
    ax.set_ylabel(f"accuracy %, mean of {len(tasks)} task(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def length_table(records: list[dict[str, Any]]) -> str:
    """Accuracy (mean over tasks and depths, samples weighted) by cache and length."""
    lengths = sorted({int(r["length"]) for r in records})
    rows = []
    for cache in caches_in(records):
        rs = [r for r in records if r.get("cache") == cache]
        rows.append([cache, *[fmt_num(_weighted_accuracy([r for r in rs if r.get("length") == n]), ".1f")
                              for n in lengths]])
    return format_table(rows, ["cache", *[_size(n) for n in lengths]])


def _size(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def heatmap_grid(records: list[dict[str, Any]], cache: str) -> tuple[list[float], list[int], list[list[float | None]]]:
    """``(depths, lengths, accuracy[depth][length])`` of one cache (``None`` where a cell is missing)."""
    rs = [r for r in records if r.get("cache") == cache and r.get("depth") is not None]
    depths = sorted({float(r["depth"]) for r in rs})
    lengths = sorted({int(r["length"]) for r in rs})
    grid: list[list[float | None]] = [[None] * len(lengths) for _ in depths]
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            grid[i][j] = _weighted_accuracy([r for r in rs if float(r["depth"]) == d and int(r["length"]) == n])
    return depths, lengths, grid


def plot_needle_heatmap(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """The classic needle heat map: accuracy by depth (rows) and length (columns), one panel per cache, green at
    100 %, red at 0 %. ``None`` when no record has a depth."""
    caches = [c for c in caches_in(records) if any(r.get("depth") is not None for r in records
                                                   if r.get("cache") == c)]
    if not caches:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = min(4, len(caches))
    rows = math.ceil(len(caches) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.0, 2.8 * rows + 0.6), squeeze=False,
                             constrained_layout=True)
    image = None
    for k, (ax, cache) in enumerate(zip(axes.flat, caches)):
        depths, lengths, grid = heatmap_grid(records, cache)
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        image = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_size(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths] if k % cols == 0 else [])
        ax.set_title(cache, fontsize=10)
        ax.set_xlabel("length (tokens)")
        if k % cols == 0:
            ax.set_ylabel("needle depth")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    for ax in list(axes.flat)[len(caches):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy %")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def longctx_sections(records: list[dict[str, Any]], add_figure: Callable[..., str], slug: Callable[..., str]
                     ) -> list[str]:
    """Markdown of the long-context section: per model, the accuracy-vs-bits table, accuracy by length, and one heat
    map per task with depths. ``add_figure(fn, name, records, title)`` draws a figure and returns its link."""
    out = ["## Long-context retrieval (`kvquant eval longctx`)", ""]
    if not records:
        return out + ["_Missing: no `kvquant eval longctx` results (JSON lines with `\"kind\": \"longctx\"`)._", ""]
    for model in sorted({str(r.get("model")) for r in records}):
        recs = [r for r in records if str(r.get("model")) == model]
        ns = sorted({int(r.get("n") or 0) for r in recs})
        lengths = sorted({int(r["length"]) for r in recs})
        out += [f"### {model}", "",
                f"{len(recs)} cells; {', '.join(map(str, ns))} sample(s) per cell; lengths "
                f"{', '.join(_size(n) for n in lengths)} tokens; accuracy is RULER's string match in percent (every "
                "reference found in the answer). Bits per element count everything a cache stores; `fp16` is "
                "transformers' `DynamicCache` in the model's dtype; an eviction press counts its kept tokens at 16 "
                "bits.", "",
                "#### Accuracy vs bits", "", accuracy_bits_table(recs), ""]
        pts, tasks = accuracy_bits_points(recs)
        if len(pts) >= 2:
            out += [f"**Pareto-optimal (bits/element vs accuracy over {', '.join(tasks)}):** "
                    f"{', '.join(c for c, _, _, on in pts if on)}.", "",
                    add_figure(plot_accuracy_bits, f"needle_pareto_{slug(model, 'bits')}.png", recs,
                               f"{model}: needle accuracy vs bits"), ""]
        out += ["#### Accuracy by length", "", length_table(recs), ""]
        for task in sorted({str(r.get("task")) for r in recs if r.get("depth") is not None}):
            trecs = [r for r in recs if r.get("task") == task]
            out += [f"#### Needle heat map: {task}", "",
                    add_figure(plot_needle_heatmap, f"needle_{slug(model, task)}.png", trecs,
                               f"{model}: {task}"), ""]
    return out
