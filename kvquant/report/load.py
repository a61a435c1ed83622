"""Find and read benchmark outputs in a results folder (recognised by content, not by file name).

* ``kvquant bench generate``: JSON lines with ``"kind": "generate"`` (``generate.jsonl``), or its CSV when no
  JSON-lines file of the same name sits next to it;
* ``kvquant bench capacity`` / ``generate --find-capacity``: JSON with ``"schema": "kvquant.bench.capacity/v1"``;
* ``kvquant eval longctx``: JSON lines with ``"kind": "longctx"`` (the latest record of a cell wins);
* ``kvquant eval ppl``: JSON ``{"meta": {...}, "results": [{"datatype", "ppl", ...}, ...]}`` (files of the same
  protocol are merged by :func:`group_ppl`; a file whose meta says ``"complete": false`` is a run still going or
  stopped part-way, read with the rows it has);
* ``kvquant bench kernels``: a JSON list of rows with ``"kind"`` in decode / prefill / decode_append / device /
  sweep / tuning;
* ``kvquant bench profile --kind decode``: JSON ``{"config": {"kind": "decode", ...}, "results": [...]}``;
* ``python -m kvquant.bench.backends``: a JSON list of rows with ``"part"`` in e2e / e2e_breakdown / device;

Subfolders are searched too (a ``kvquant sweep`` results folder holds one folder per job); files inside hidden
folders (``.sweep/``, a running job's ``.<name>.partial/``) are not results and are left out. Unreadable or
unrecognised files are listed in :attr:`Results.skipped`, never raised.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvquant.datatypes import EXACT_DATATYPE, exact_label, parse_datatype

_KERNEL_KINDS = {"decode", "prefill", "decode_append", "device", "sweep", "tuning"}
_BACKEND_PARTS = {"e2e", "e2e_breakdown", "device"}


def row_label(row: dict[str, Any]) -> str:
    """What tables call a ``kvquant eval ppl`` row: its ``label`` (``exact (fp32)`` for the unquantized ``fp16``
    cache of an fp32 run, see :func:`kvquant.datatypes.result_label`); for files written before rows had labels,
    the ``fp16`` row is ``exact (fp32)`` when it measured more than 24 bits per element, ``exact (fp16)`` when
    fewer, ``exact`` without a measurement; other rows are their datatype. A row whose cache rotated its channels
    (``config.rotation``) says so: ``int4 + hadamard``."""
    config = row.get("config")
    rotation = config.get("rotation", "none") if isinstance(config, dict) else "none"
    suffix = f" + {rotation}" if rotation not in ("none", None) and row.get("datatype") != EXACT_DATATYPE else ""
    if row.get("label"):
        return str(row["label"]) + suffix
    dt = str(row.get("datatype"))
    if dt != EXACT_DATATYPE:
        return dt + suffix
    bits = row.get("bits_per_element")
    if not _num(bits):
        return "exact"
    return exact_label("float32" if bits > 24 else "float16")


def datatype_key(name: Any) -> tuple[int, str]:
    """Sort key: fp16, then the NUQ datatypes and then the uniform ones, each by average bits, most first, and at
    equal average by key bits, most first (nuq4, k4v3, k3v4, k4v2, nuq3, k3v2, k2v3, nuq2, int4, ...), ``nuq-alloc``
    after the NUQ ones, then anything else alphabetically."""
    s = str(name)
    try:
        dt = parse_datatype(s)
    except (TypeError, ValueError):
        return (10_000, s)
    if dt.kind == "fp":
        return (0, s)
    family = 100 if dt.kind == "nuq" else 1_000
    if dt.per_layer:
        return (family + 99, s)
    return (family + int(round((4 - dt.mean_bits) * 20)) + (4 - dt.key_bits), s)


@dataclass
class Results:
    """Everything found in a results folder."""

    root: Path
    generate: list[dict[str, Any]] = field(default_factory=list)
    capacity: list[dict[str, Any]] = field(default_factory=list)
    ppl: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)
    decode_profiles: list[dict[str, Any]] = field(default_factory=list)
    backends: list[dict[str, Any]] = field(default_factory=list)
    longctx: list[dict[str, Any]] = field(default_factory=list)
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


def _is_decode_profile(doc: Any) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("config"), dict) and doc["config"].get("kind") == "decode"
            and isinstance(doc.get("results"), list)
            and all(isinstance(r, dict) and "wall_ms_per_step" in r for r in doc["results"]))


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSON-lines file and the number of lines that are not one."""
    recs, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            recs.append(rec)
        else:
            bad += 1
    return recs, bad


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
    longctx: list[dict[str, Any]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl", ".csv") or any(part.startswith(".")
                                                             for part in path.relative_to(root).parts):
            continue
        try:
            if suffix == ".jsonl":
                recs, torn = _read_jsonl(path)
                if torn:
                    res.skipped.append(f"{path.relative_to(root)}: {torn} unreadable line(s) (a run stopped while "
                                       "writing?)")
                if any(r.get("kind") == "generate" for r in recs):
                    generate += [r for r in recs if r.get("kind") == "generate"]
                    res._add_file("generate", path)
                if any(r.get("kind") == "longctx" for r in recs):
                    longctx += [r for r in recs if r.get("kind") == "longctx"]
                    res._add_file("longctx", path)
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
                elif _is_decode_profile(doc):
                    doc["_file"] = str(path.relative_to(root))
                    res.decode_profiles.append(doc)
                    res._add_file("decode profile", path)
                elif isinstance(doc, list) and doc and all(isinstance(r, dict) for r in doc) and \
                        any(r.get("part") in ("e2e", "e2e_breakdown") for r in doc):
                    res.backends += [r for r in doc if r.get("part") in _BACKEND_PARTS]
                    res._add_file("backends", path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            res.skipped.append(f"{path.relative_to(root)} ({type(exc).__name__}: {str(exc)[:100]})")
    res.generate, res.superseded = _dedupe(generate)
    latest = {_longctx_key(r): r for r in longctx}
    res.longctx = list(latest.values())
    return res


def _longctx_key(r: dict[str, Any]) -> tuple:
    depth = r.get("depth")
    return (r.get("model"), r.get("task"), r.get("length"), None if depth is None else float(depth), r.get("cache"),
            r.get("n"), r.get("seed"))


def group_generate(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records by (model, device description), each sorted by datatype, batch, prompt length."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        key = (str(r.get("model")), str(r.get("gpu_name") or r.get("device")))
        groups.setdefault(key, []).append(r)
    for recs in groups.values():
        recs.sort(key=lambda r: (datatype_key(r.get("datatype")), r.get("batch") or 0, r.get("prompt_len") or 0))
    return groups


# ----------------------------------------------------------------------------------------------------
# perplexity files of the same protocol

#: Two rows of the same datatype agree when their perplexities differ by at most this relative amount.
PPL_AGREE_RTOL = 1e-5
#: ``meta`` keys that do not change what a perplexity run measures (``skipped``: requested datatypes that could
#: not run).
_NOT_PROTOCOL = ("skipped", "complete")


def ppl_protocol(meta: Any) -> str | None:
    """What defines the protocol of a ``kvquant eval ppl`` file, as canonical JSON: every ``meta`` key (model,
    data, calibration, ctx, prefill, chunk, windows, config, ...) except ``skipped`` and ``complete`` (a file
    still being written is the same protocol as the finished one), and every ``config`` field
    except ``datatype`` (the base config's, which each row overrides). A key missing from one file and present
    in another makes the protocols differ. ``None`` (never merged) when the meta names no model."""
    if not isinstance(meta, dict) or meta.get("model") is None:
        return None
    proto = {k: v for k, v in meta.items() if k not in _NOT_PROTOCOL}
    if isinstance(proto.get("config"), dict):
        proto["config"] = {k: v for k, v in proto["config"].items() if k != "datatype"}
    return json.dumps(proto, sort_keys=True, default=str)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rows_agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two perplexity rows agree: their PPL are within :data:`PPL_AGREE_RTOL` (or equal when not numbers)."""
    pa, pb = a.get("ppl"), b.get("ppl")
    if _num(pa) and _num(pb):
        return math.isclose(pa, pb, rel_tol=PPL_AGREE_RTOL)
    return pa == pb


def group_ppl(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge the ``kvquant eval ppl`` documents of the same protocol (:func:`ppl_protocol`), in file order.

    Each returned document has the shape of a ``kvquant eval ppl`` file (rows of a merged group also carry
    ``_from``, the files they came from, and ``_file``, those names joined by ", ") plus ``_files`` (the files
    merged, in order), ``_file`` (their names joined by `` + ``), ``_reference`` (the file whose fp16 row is the group's
    reference, or None) and ``_notes`` (sentences for the reader). A group of one file is that file unchanged.

    Rules for a group of several files:

    * rows are sorted by datatype (:func:`datatype_key`), file order within a datatype;
    * rows of the same datatype in several files whose PPL agree within :data:`PPL_AGREE_RTOL` (relative) are
      one row, the first file's, its ``_file`` naming every file it came from; rows that disagree are all kept,
      each labelled ``"<datatype> (<file>)"`` (``_label``), and a note says so;
    * ΔPPL and ΔPPL % of a row are recomputed against the fp16 row of its own file when that file has one, and
      otherwise against the group's reference: the first fp16 row, in file order (when the fp16 rows of the
      files disagree, a note says so). With no fp16 row anywhere, rows keep the values stored in their file.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, doc in enumerate(docs):
        groups.setdefault(ppl_protocol(doc.get("meta")) or f"\0file {i}", []).append(doc)
    return [_merge_ppl(g) for g in groups.values()]


def _merge_ppl(docs: list[dict[str, Any]]) -> dict[str, Any]:
    files = [str(d.get("_file")) for d in docs]
    if len(docs) == 1:
        fp16 = any(r.get("datatype") == "fp16" for r in docs[0].get("results", []))
        return {**docs[0], "_files": files, "_reference": files[0] if fp16 else None, "_notes": []}
    kept: dict[str, list[dict[str, Any]]] = {}  # datatype -> rows kept, each with the files it came from
    own_fp16: dict[str, float] = {}
    for f, doc in zip(files, docs):
        for r in doc.get("results", []):
            dt = str(r.get("datatype"))
            if dt == "fp16" and _num(r.get("ppl")) and f not in own_fp16:
                own_fp16[f] = float(r["ppl"])
            same = next((k for k in kept.get(dt, []) if rows_agree(k, r)), None)
            if same is not None:
                same["_from"].append(f)
            else:
                kept.setdefault(dt, []).append({**r, "_from": [f]})
    ref_file = next(iter(own_fp16), None)
    notes = []
    for dt, rows in kept.items():
        if len(rows) > 1:
            for r in rows:
                r["_label"] = f"{row_label(r)} ({', '.join(r['_from'])})"
            notes.append(f"{dt} disagrees between files ("
                         + "; ".join(f"{', '.join(f'`{x}`' for x in r['_from'])}: PPL {_fmt_ppl(r.get('ppl'))}"
                                     for r in rows)
                         + "): every row is shown")
    if len(kept.get("fp16", [])) > 1:
        notes.append(f"each file's rows are compared with the fp16 of their own file; rows of files without fp16 "
                     f"with the fp16 of `{ref_file}`")
    results = []
    for dt in sorted(kept, key=datatype_key):
        for r in kept[dt]:
            ref = own_fp16.get(r["_from"][0], own_fp16.get(ref_file)) if ref_file else None
            if ref is not None and dt != "fp16" and _num(r.get("ppl")):
                r["delta_ppl"] = r["ppl"] - ref
                r["delta_ppl_pct"] = 100 * (r["ppl"] - ref) / ref
            elif ref is not None and dt == "fp16":
                r["delta_ppl"] = r["delta_ppl_pct"] = None
            r["_file"] = ", ".join(r["_from"])
            results.append(r)
    return {"meta": docs[0].get("meta", {}), "results": results, "_files": files, "_file": " + ".join(files),
            "_reference": ref_file, "_notes": notes}


def _fmt_ppl(v: Any) -> str:
    return f"{v:.4f}" if _num(v) else str(v)
