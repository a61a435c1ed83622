"""Markdown tables and number formatting shared by the report and the benchmarks' printed summaries."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def format_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """A Markdown table (``None`` shows as ``-``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in r) + " |")
    return "\n".join(lines)


def fmt_num(v: Any, spec: str = ".3g") -> str | None:
    """Format a number, or None for missing/non-numeric values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return format(v, spec)
