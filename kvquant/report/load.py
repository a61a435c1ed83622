"""Find and read benchmark outputs in a results folder (recognised by content, not by file name).

* ``kvquant bench generate``: JSON lines with ``"kind": "generate"`` (``generate.jsonl``), or its CSV when no
  JSON-lines file of the same name sits next to it;
* ``kvquant bench capacity`` / ``generate --find-capacity``: JSON with ``"schema": "kvquant.bench.capacity/v1"``;
* ``kvquant eval ppl``: JSON ``{"meta": {...}, "results": [{"datatype", "ppl", ...}, ...]}``;
* ``kvquant bench kernels``: a JSON list of rows with ``"kind"`` in decode / prefill / device / sweep.

Unreadable or unrecognised files are listed in :attr:`Results.skipped`, never raised.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KERNEL_KINDS = {"decode", "prefill", "device", "sweep", "tuning"}
_DT_ORDER = ("fp16", "nuq4", "nuq3", "nuq2", "int4", "int3", "int2")


def datatype_key(name: Any) -> tuple[int, str]:
    """Sort key: fp16, nuq4, nuq3, nuq2, int4, int3, int2, then anything else alphabetically."""
    s = str(name)
    return (_DT_ORDER.index(s), s) if s in _DT_ORDER else (len(_DT_ORDER), s)


@dataclass
class Results:
    """Everything found in a results folder."""

    root: Path
    generate: list[dict[str, Any]] = field(default_factory=list)
    capacity: list[dict[str, Any]] = field(default_factory=list)
    ppl: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    superseded: int = 0

    def _add_file(self, kind: str, path: Path) -> None:
        self.files.setdefault(kind, []).append(str(path.relative_to(self.root)))


def _convert(v: str) -> Any:
    """CSV cell -> None / bool / int / float / JSON value / str."""
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            pass
    return v


def _read_generate_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: _convert(v) for k, v in r.items()} for r in rows if r.get("kind") == "generate"]


def _is_ppl(doc: Any) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("results"), list) and bool(doc["results"])
            and all(isinstance(r, dict) and "ppl" in r and "datatype" in r for r in doc["results"]))


def _dedupe(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Keep the latest record of each (model, device, datatype, batch, prompt, gen)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r.get("model"), r.get("gpu_name") or r.get("device"), r.get("datatype"), r.get("batch"),
               r.get("prompt_len"), r.get("gen_tokens"))
        old = latest.get(key)
        if old is None or str(r.get("timestamp") or "") >= str(old.get("timestamp") or ""):
            latest[key] = r
    return list(latest.values()), len(records) - len(latest)


def load_results(root: str | Path) -> Results:
    """Scan ``root`` (recursively) for benchmark outputs.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    res = Results(root)
    generate: list[dict[str, Any]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl", ".csv") or path.name.startswith("."):
            continue
        try:
            if suffix == ".jsonl":
                recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                recs = [r for r in recs if isinstance(r, dict) and r.get("kind") == "generate"]
                if recs:
                    generate += recs
                    res._add_file("generate", path)
            elif suffix == ".csv":
                if path.with_suffix(".jsonl").exists() or "_" in path.stem and \
                        path.with_name(path.stem.rsplit("_", 1)[0] + ".jsonl").exists():
                    continue  # the JSON-lines twin is authoritative
                recs = _read_generate_csv(path)
                if recs:
                    generate += recs
                    res._add_file("generate (csv)", path)
            else:
                doc = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(doc, dict) and str(doc.get("schema", "")).startswith("kvquant.bench.capacity"):
                    doc["_file"] = str(path.relative_to(root))
                    res.capacity.append(doc)
                    res._add_file("capacity", path)
                elif _is_ppl(doc):
                    doc["_file"] = str(path.relative_to(root))
                    res.ppl.append(doc)
                    res._add_file("ppl", path)
                elif isinstance(doc, list) and doc and all(isinstance(r, dict) for r in doc) and \
                        any(r.get("kind") in _KERNEL_KINDS for r in doc):
                    res.kernels += [r for r in doc if r.get("kind") in _KERNEL_KINDS]
                    res._add_file("kernels", path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            res.skipped.append(f"{path.relative_to(root)} ({type(exc).__name__}: {str(exc)[:100]})")
    res.generate, res.superseded = _dedupe(generate)
    return res


def group_generate(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records by (model, device description), each sorted by datatype, batch, prompt length."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        key = (str(r.get("model")), str(r.get("gpu_name") or r.get("device")))
        groups.setdefault(key, []).append(r)
    for recs in groups.values():
        recs.sort(key=lambda r: (datatype_key(r.get("datatype")), r.get("batch") or 0, r.get("prompt_len") or 0))
    return groups
