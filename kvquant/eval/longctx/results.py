"""Long-context results: one JSON line per (model, task, length, depth, cache) cell.

A record (``"kind": "longctx"``) holds the cell (``model``, ``task``, ``length``, ``depth``, ``cache``, ``n``,
``seed``), ``accuracy`` (percent, RULER string match), ``bits_per_element``, ``kv_bytes`` (per sequence),
``seconds``, the run's settings and the per-sample answers. :class:`ResultsFile` rewrites the file through a
temporary file and a rename after every cell, so a killed run leaves every finished cell intact, and a rerun with
the same file skips the cells it already has.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

KIND = "longctx"
KEY_FIELDS = ("model", "task", "length", "depth", "cache", "n", "seed")
"""What makes two records the same cell (a rerun with another ``n`` or ``seed`` is another cell)."""


def cell_key(record: dict[str, Any]) -> tuple:
    """The identity of a record's cell (:data:`KEY_FIELDS`; depths compared as floats)."""
    depth = record.get("depth")
    return tuple(float(depth) if k == "depth" and depth is not None else record.get(k) for k in KEY_FIELDS)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The ``longctx`` records of a JSON-lines file (other lines and unreadable ones are ignored; a missing file has
    none)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == KIND:
            out.append(rec)
    return out


class ResultsFile:
    """A JSON-lines results file that grows one cell at a time, atomically.

    Args:
        path: the file (created with its folder on the first :meth:`add`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records = read_records(self.path)
        self._keys = {cell_key(r) for r in self.records}

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def find(self, **fields: Any) -> list[dict[str, Any]]:
        """Records whose fields equal ``fields``."""
        return [r for r in self.records if all(r.get(k) == v for k, v in fields.items())]

    def add(self, record: dict[str, Any]) -> None:
        """Append ``record`` (``kind`` set) and rewrite the file through a temporary file and a rename; a record
        of a cell already present replaces it."""
        record = {"kind": KIND, **record}
        key = cell_key(record)
        self.records = [r for r in self.records if cell_key(r) != key] + [record]
        self._keys.add(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
