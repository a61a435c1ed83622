"""The results file of a perplexity run: rewritten after every datatype, marked until complete, resumable.

Shape::

    {"meta": {"model", "data", "calibration", "calibration_sha256", "dtype", "ctx", "prefill", "chunk", "windows",
              "config": <QuantConfig fields every row shares (no datatype)>, "skipped": {...},
              "complete": false until the last datatype is written},
     "results": [{"datatype", "label", "config": <that row's QuantConfig, or null>, "ppl", ...}, ...]}

A run that stops part-way leaves a valid file with ``"complete": false``. A later run with the same protocol
(:func:`protocol`: every meta key but ``skipped`` and ``complete``) keeps the rows it finds whose ``config`` is the
one it would use (:func:`reusable_rows`) and computes only the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvquant.files import write_json_atomic

#: ``meta`` keys that do not change what a perplexity run measures.
NOT_PROTOCOL = ("skipped", "complete")


def protocol(meta: dict[str, Any]) -> str:
    """The protocol of a run as canonical JSON: every ``meta`` key but :data:`NOT_PROTOCOL`."""
    return json.dumps({k: v for k, v in meta.items() if k not in NOT_PROTOCOL}, sort_keys=True, default=str)


def read_results(path: str | Path) -> dict[str, Any] | None:
    """The document at ``path``, or ``None`` when there is none or it is not a perplexity results file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("meta"), dict) and isinstance(doc.get("results"), list)):
        return None
    return doc


def reusable_rows(path: str | Path, meta: dict[str, Any], configs: dict[str, dict[str, Any] | None]
                  ) -> tuple[dict[str, dict[str, Any]], str]:
    """Rows of the file at ``path`` a run with ``meta`` may keep, by datatype, and a sentence saying what was found.

    Args:
        meta: the run's meta (compared by :func:`protocol`).
        configs: per datatype of the run, the config its row records (``None`` for rows without a kvquant cache);
            a row is kept only when its ``config`` is this one.
    """
    doc = read_results(path)
    if doc is None:
        return {}, "" if not Path(path).exists() else f"{path} is not a perplexity results file: it is replaced"
    if protocol(doc["meta"]) != protocol(meta):
        old = {k: v for k, v in doc["meta"].items() if k not in NOT_PROTOCOL}
        new = {k: v for k, v in meta.items() if k not in NOT_PROTOCOL}
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return {}, f"{path} holds a run of another protocol (differs in {', '.join(differ)}): it is replaced"
    rows = {}
    for r in doc["results"]:
        dt = r.get("datatype") if isinstance(r, dict) else None
        if dt in configs and "config" in r and r["config"] == configs[dt]:
            rows[dt] = r
    return rows, f"{path}: keeping {len(rows)} finished row(s) of the same protocol ({', '.join(rows) or 'none'})"


def write_results(path: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]], complete: bool) -> None:
    """Write the document atomically, ``meta["complete"]`` set to ``complete``."""
    write_json_atomic(path, {"meta": {**meta, "complete": bool(complete)}, "results": rows})
