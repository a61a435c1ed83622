"""One Pareto front across configurations: the ``kvquant eval ppl`` results of the same model, data and windows
whose protocols differ otherwise (calibration, quantization settings: the configurations of a sweep), every
(datatype, configuration) one point, its ΔPPL against the fp16 row of its own file."""

from __future__ import annotations

import json
import math
import os
from pathlib import PurePosixPath
from typing import Any

from kvquant.report.load import datatype_key, row_label, rows_agree

#: ``meta`` keys that must agree for ΔPPL to be comparable across files (same model, same scored tokens).
COMPARABLE = ("model", "data", "ctx", "prefill", "chunk", "windows")


def _key(meta: Any) -> str | None:
    if not isinstance(meta, dict) or meta.get("model") is None:
        return None
    return json.dumps({k: meta.get(k) for k in COMPARABLE}, sort_keys=True, default=str)


def _where(files: list[str]) -> list[str]:
    """Short, distinct names for files: their folder's last part, else the folder, else what tells the file names
    apart (``smollm2_ppl.json``, ``smollm2_ppl_int.json``: ``smollm2_ppl``, ``int``), else the file."""
    stems = _distinct_stems(files)
    for pick in (lambda f: PurePosixPath(f).parent.name, lambda f: str(PurePosixPath(f).parent).strip(".")):
        names = [pick(f) or stem for f, stem in zip(files, stems)]
        if len(set(names)) == len(names):
            return names
    return stems if len(set(stems)) == len(stems) else files


def _distinct_stems(files: list[str]) -> list[str]:
    """File names without their suffix and without the prefix they all share (``_`` and ``-`` trimmed); a name
    that is all prefix keeps its stem."""
    stems = [PurePosixPath(f).stem for f in files]
    common = os.path.commonprefix(stems) if len(stems) > 1 else ""
    return [s[len(common):].strip("_-") or s for s in stems]


def _same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ba, bb = a.get("bits_per_element"), b.get("bits_per_element")
    same_bits = ba == bb or (isinstance(ba, (int, float)) and isinstance(bb, (int, float))
                             and math.isclose(ba, bb, rel_tol=1e-9))
    return same_bits and rows_agree(a, b)


def across_groups(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of perplexity documents (as :func:`~kvquant.report.load.group_ppl` returns them, one per protocol)
    that share :data:`COMPARABLE` and hold at least two protocols. Each group is a document in the shape of a
    ``kvquant eval ppl`` file whose rows carry ``_label`` (``"nuq3 · <configuration>"``) and ``_config`` (the
    configurations' names), plus ``_files`` (one per configuration), ``_names`` (the configurations' names) and
    ``meta`` (the comparable keys). Rows of the same datatype that agree (PPL within
    :data:`~kvquant.report.load.PPL_AGREE_RTOL`, same bits/element) in several configurations are one point,
    labelled by the datatype alone when every configuration agrees (fp16, typically); a row stored with a channel
    rotation is labelled with it (``"int4 + hadamard · <configuration>"``, :func:`~kvquant.report.load.row_label`).
    A file without an fp16 row (a run of the quantized datatypes alone) takes its rows' ΔPPL against the fp16 row of
    the other files (the same model, text and windows score the same exact perplexity), and the group's
    ``_notes`` say so; with no fp16 row in the group, or fp16 rows that disagree, such rows keep what they have."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        key = _key(doc.get("meta"))
        if key is not None:
            groups.setdefault(key, []).append(doc)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        files = [str(d.get("_file") or (d.get("_files") or ["?"])[0]).split(" + ")[0] for d in members]
        names = _where(files)
        # a protocol merged from several files of one folder: named by all of them (alloc+int)
        every = [str(f) for d in members for f in (d.get("_files") or [])]
        stem_of = dict(zip(every, _distinct_stems(every))) if len(set(every)) == len(every) else {}
        for i, d in enumerate(members):
            own = [str(f) for f in d.get("_files") or []]
            if len(own) > 1 and stem_of and names[i] == stem_of.get(files[i]):
                names[i] = "+".join(stem_of[f] for f in own)
        kept: dict[str, list[dict[str, Any]]] = {}
        exact = [float(r["ppl"]) for d in members for r in d.get("results", [])
                 if r.get("datatype") == "fp16" and isinstance(r.get("ppl"), (int, float))]
        ref = exact[0] if exact and all(math.isclose(e, exact[0], rel_tol=1e-9) for e in exact) else None
        notes = []
        for name, doc in zip(names, members):
            own = any(r.get("datatype") == "fp16" for r in doc.get("results", []))
            if not own and ref is not None:
                notes.append(f"{name} has no fp16 row: its ΔPPL is against the fp16 PPL {ref:.4f} of the other files")
            for r in doc.get("results", []):
                dt = str(r.get("datatype"))
                if dt == "plain":
                    continue
                if not own and ref is not None and isinstance(r.get("ppl"), (int, float)):
                    r = {**r, "delta_ppl": r["ppl"] - ref, "delta_ppl_pct": 100 * (r["ppl"] - ref) / ref}
                dt = row_label(r) if dt != "fp16" else dt
                same = next((k for k in kept.get(dt, []) if _same_point(k, r)), None)
                if same is not None:
                    same["_configs"].append(name)
                else:
                    kept.setdefault(dt, []).append({**r, "_configs": [name]})
        rows = []
        for dt, versions in kept.items():
            for r in versions:
                everywhere = len(r["_configs"]) == len(names)
                r["_config"] = ", ".join(r["_configs"])
                r["_label"] = dt if everywhere else f"{dt} · {r['_config']}"
                rows.append(r)
        rows.sort(key=lambda r: (datatype_key(r.get("datatype")), str(r.get("_config"))))
        meta = {k: members[0].get("meta", {}).get(k) for k in COMPARABLE}
        out.append({"meta": meta, "results": rows, "_files": files, "_names": names, "_notes": notes})
    return out
