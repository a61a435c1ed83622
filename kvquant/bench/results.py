"""Incremental result files: one JSON line per record and a CSV with a fixed header, flushed and fsync'ed
after every record so that a crash loses nothing already measured."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return v


class ResultWriter:
    """Append records to ``<stem>.jsonl`` and ``<stem>.csv`` in ``out_dir``, durably, one at a time.

    Existing files are appended to (several runs may share a folder; records carry a ``run_id``). The CSV
    header is ``fields``; a CSV written earlier with a different header is left alone and a new
    ``<stem>_<n>.csv`` is used.
    """

    def __init__(self, out_dir: str | Path, stem: str, fields: Sequence[str]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fields = list(fields)
        self.jsonl_path = self.out_dir / f"{stem}.jsonl"
        self.csv_path = self._pick_csv(stem)

    def _pick_csv(self, stem: str) -> Path:
        k = 1
        while True:
            path = self.out_dir / (f"{stem}.csv" if k == 1 else f"{stem}_{k}.csv")
            if not path.exists() or path.stat().st_size == 0:
                return path
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if header == self.fields:
                return path
            k += 1

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to both files and fsync them."""
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.fields)
            w.writerow([_csv_value(record.get(k)) for k in self.fields])
            f.flush()
            os.fsync(f.fileno())
