"""Matplotlib figures of the report (Agg backend, PNG). Each function returns the file written, or None
when there is nothing to plot. ``ImportError`` propagates when matplotlib is missing (the report says so)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvquant.report.load import datatype_key
from kvquant.report.pareto import TradeoffPoint


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series_by_batch(records: list[dict[str, Any]], metric: Callable[[dict[str, Any]], float | None]
                     ) -> dict[int, dict[str, list[tuple[int, float]]]]:
    out: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        v = metric(r)
        if _num(v):
            out.setdefault(int(r["batch"]), {}).setdefault(str(r["datatype"]), []).append((int(r["prompt_len"]), v))
    return out


def _grid(records: list[dict[str, Any]], rows: list[tuple[str, Callable[[dict[str, Any]], float | None], bool]],
          path: Path, title: str) -> Path | None:
    """A row per metric (label, value function, log y axis), a column per batch, a line per datatype."""
    series = [(label, _series_by_batch(records, f), logy) for label, f, logy in rows]
    series = [(label, s, logy) for label, s, logy in series if s]
    if not series:
        return None
    batches = sorted({b for _, s, _ in series for b in s})
    plt = _plt()
    fig, axes = plt.subplots(len(series), len(batches), figsize=(4.2 * len(batches), 3.4 * len(series)),
                             squeeze=False)
    for i, (label, s, logy) in enumerate(series):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            for dt in sorted(s.get(b, {}), key=datatype_key):
                pts = sorted(s[b][dt])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=dt)
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"batch {b}")
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if s.get(b):
                ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(plt, fig, path)


def plot_throughput(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Decode and end-to-end tokens/s vs prompt length, a column per batch, a line per datatype."""
    return _grid(records, [("decode tokens/s", lambda r: r.get("decode_tokens_per_s"), True),
                           ("end-to-end tokens/s", lambda r: r.get("e2e_tokens_per_s"), True)], path, title)


def plot_memory(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """KV cache MiB and peak GPU GiB vs prompt length."""
    def kv(r: dict[str, Any]) -> float | None:
        return r["kv_bytes"] / 2**20 if _num(r.get("kv_bytes")) else None

    def peak(r: dict[str, Any]) -> float | None:
        return r["peak_memory_bytes"] / 2**30 if _num(r.get("peak_memory_bytes")) else None

    return _grid(records, [("KV cache (MiB)", kv, True), ("peak GPU memory (GiB)", peak, False)], path, title)


def plot_energy(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """J/token per datatype, a bar per (batch, prompt) configuration."""
    ok = [r for r in records if r.get("status") == "ok" and _num(r.get("j_per_token"))]
    if not ok:
        return None
    dts = sorted({r["datatype"] for r in ok}, key=datatype_key)
    cfgs = sorted({(r["batch"], r["prompt_len"]) for r in ok})
    val = {(r["datatype"], r["batch"], r["prompt_len"]): r["j_per_token"] for r in ok}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(dts) * max(1, len(cfgs)) ** 0.5), 3.8))
    width = 0.8 / len(cfgs)
    for k, (b, s) in enumerate(cfgs):
        xs = [i + (k - (len(cfgs) - 1) / 2) * width for i in range(len(dts))]
        ys = [val.get((dt, b, s), 0.0) for dt in dts]
        ax.bar(xs, ys, width=width, label=f"B={b} S={s}")
    ax.set_xticks(range(len(dts)), dts)
    ax.set_ylabel("J per generated token")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the axes: bars stay visible
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title)
    return _save(plt, fig, path)


def plot_capacity(doc: dict[str, Any], path: Path, title: str) -> Path | None:
    """Largest batch vs context per datatype: analytic lines, empirical markers."""
    rows = doc.get("rows") or []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for i, dt in enumerate(sorted({r["datatype"] for r in rows}, key=datatype_key)):
        rs = sorted((r for r in rows if r["datatype"] == dt), key=lambda r: r["context"])
        color = f"C{i}"
        pts = [(r["context"], r["analytic_max_batch"]) for r in rs if r["analytic_max_batch"]]
        if pts:
            ax.plot(*zip(*pts), color=color, label=f"{dt} analytic")
        emp = [(r["context"], r["empirical_max_batch"]) for r in rs if r.get("empirical_max_batch")]
        if emp:
            ax.plot(*zip(*emp), color=color, marker="o", linestyle="none", label=f"{dt} measured on GPU")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("largest batch that fits")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(plt, fig, path)


LABEL_ALL_POINTS = 8
"""Up to this many points a Pareto figure names every point; past it only the front (report.md's table has all)."""


def plot_pareto(points: list[TradeoffPoint], path: Path, title: str) -> Path | None:
    """ΔPPL vs bits/element (and vs J/token when measured): Pareto points filled, joined and named, dominated
    points hollow (named too when there are at most :data:`LABEL_ALL_POINTS`)."""
    panels: list[tuple[str, str, str]] = []
    if any(p.pareto_bits is not None for p in points):
        panels.append(("bits_per_element", "pareto_bits", "bits per element"))
    if any(p.pareto_energy is not None for p in points):
        panels.append(("j_per_token", "pareto_energy", "J per generated token"))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (xattr, flag, xlabel) in zip(axes[0], panels):
        pts = [p for p in points if getattr(p, flag) is not None]
        front = sorted((p for p in pts if getattr(p, flag)), key=lambda p: getattr(p, xattr))
        if front:
            ax.step([getattr(p, xattr) for p in front], [p.delta_ppl for p in front], where="post", color="C0",
                    alpha=0.6, label="Pareto front")
        label_all = len(pts) <= LABEL_ALL_POINTS  # many points: the front is labelled, the table names the rest
        for p in pts:
            on = bool(getattr(p, flag))
            ax.scatter(getattr(p, xattr), p.delta_ppl, s=50, color="C0" if on else "none",
                       edgecolors="C0" if on else "gray", zorder=3)
            if on or label_all:
                ax.annotate(p.datatype, (getattr(p, xattr), p.delta_ppl), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color="black" if on else "gray")
        ax.scatter([], [], s=50, color="none", edgecolors="gray", label="dominated")
        xs = [getattr(p, xattr) for p in pts]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 4:  # bits from 2 to 32: a log axis keeps 2-4 bits apart
            ax.set_xscale("log", base=2)
        ys = [abs(p.delta_ppl) for p in pts if p.delta_ppl]
        if ys and max(ys) / max(min(ys), 1e-12) > 100:  # one diverging baseline must not flatten the rest
            ax.set_yscale("symlog", linthresh=min(ys))
            if all(p.delta_ppl >= 0 for p in pts):  # no negative decades to show
                ax.set_ylim(-0.5 * min(ys), 3 * max(ys))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ΔPPL vs fp16")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(plt, fig, path)
