"""Loading evaluation / calibration text corpora.

Named datasets (``"wikitext2"``, ``"wikitext2-raw"``, ``"tinystories"``, ``"pg-essays"``) are looked up, in order, in
``$KVQUANT_DATA`` (a file or a directory), in the project's ``shared/`` folder, and on the Hugging Face
hub through ``datasets`` (part of the ``kvquant[hf]`` extra). Any other source is read as a local file or directory.

WikiText files are stored one hub row per line (blank rows as ``" \\n"``); they are returned the way the
standard perplexity evaluation builds its text from the hub, ``"\\n\\n".join(rows)``, so the string is
the same whichever place it came from.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kvquant.data.paths import find_shared_dir, shared_dir_candidates

DATA_ENV = "KVQUANT_DATA"

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}

# File names a split may have inside a plain directory (``load_text(dir, split)`` or ``$KVQUANT_DATA``).
_SPLIT_FILE_NAMES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "validation": ("valid.txt", "validation.txt", "val.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}


@dataclass(frozen=True)
class NamedDataset:
    """Where a named text dataset lives. Paths are relative to ``shared/``."""

    name: str
    shared_files: dict[str, str]
    """split -> file under ``shared/``."""
    hub_path: str
    hub_config: str | None
    wikitext_lines: bool
    """File stores one hub row per line; rebuild the hub text as ``"\\n\\n".join(rows)``."""
    fallbacks: dict[str, str] = field(default_factory=dict)
    """split -> file under ``shared/`` used as a stand-in (with a warning) when the split is nowhere."""
    hub_splits: dict[str, str] = field(default_factory=dict)
    """split -> hub split name, where they differ."""
    dir_names: tuple[str, ...] = ()
    """Sub-directory names the dataset may have inside a ``$KVQUANT_DATA`` directory."""


DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset(
        name="wikitext2",
        shared_files={"validation": "data/wikitext-2/valid.txt", "test": "data/wikitext-2/test.txt"},
        fallbacks={"train": "data/wikitext-2/valid.txt"},
        hub_path="wikitext",
        hub_config="wikitext-2-v1",
        wikitext_lines=True,
        dir_names=("wikitext-2",),
    ),
    "wikitext2-raw": NamedDataset(
        name="wikitext2-raw",
        shared_files={"test": "data/wikitext-2-raw/test.txt"},
        fallbacks={"train": "data/wikitext-2/valid.txt", "validation": "data/wikitext-2/valid.txt"},
        hub_path="wikitext",
        hub_config="wikitext-2-raw-v1",
        wikitext_lines=True,
        dir_names=("wikitext-2-raw",),
    ),
    "tinystories": NamedDataset(
        name="tinystories",
        shared_files=dict.fromkeys(("train", "validation", "test"), "data/tinystories/sample.txt"),
        hub_path="roneneldan/TinyStories",
        hub_config=None,
        wikitext_lines=False,
        hub_splits={"test": "validation"},
        dir_names=("tinystories",),
    ),
    "pg-essays": NamedDataset(  # the haystack of needle-in-a-haystack and RULER's essay tasks
        name="pg-essays",
        shared_files=dict.fromkeys(("train", "validation", "test"), "data/pg-essays/essays.txt"),
        hub_path="sgoel9/paul_graham_essays",
        hub_config=None,
        wikitext_lines=False,
        hub_splits={"test": "train", "validation": "train"},
        dir_names=("pg-essays",),
    ),
}


def normalize_split(split: str) -> str:
    """Map split spellings (``"valid"``, ``"val"``, ...) to ``"train"``, ``"validation"`` or ``"test"``."""
    try:
        return _SPLIT_ALIASES[split.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(set(_SPLIT_ALIASES))}") from None


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def wikitext_rows_to_text(file_text: str) -> str:
    """Rebuild the hub's ``"\\n\\n".join(dataset["text"])`` from a one-row-per-line WikiText file."""
    rows = [line if line.strip() else "" for line in file_text.splitlines(keepends=True)]
    return "\n\n".join(rows)


def _find_split_file(directory: Path, split: str) -> Path | None:
    for name in _SPLIT_FILE_NAMES[split]:
        cand = directory / name
        if cand.is_file():
            return cand
    return None


def load_text(source: str, split: str = "test") -> str:
    """Return the text of ``split`` from ``source``.

    Args:
        source: a named dataset (see :data:`DATASETS`), a text file (returned as is, ``split`` ignored), or
            a directory holding ``{train,valid,test}.txt`` (or ``wiki.{split}.raw`` / ``.tokens``).
        split: ``"train"``, ``"validation"`` (or ``"valid"``) or ``"test"``.

    Raises:
        FileNotFoundError: nothing was found; the message lists every place looked and how to fix it.
        ValueError: unknown split name.
    """
    split = normalize_split(split)
    key = source.strip().lower()
    if key in DATASETS:
        return _load_named(DATASETS[key], split)
    path = Path(source).expanduser()
    if path.is_file():
        return _read(path)
    if path.is_dir():
        found = _find_split_file(path, split)
        if found is None:
            raise FileNotFoundError(
                f"no {split!r} split in directory {path}: looked for {', '.join(_SPLIT_FILE_NAMES[split])}"
            )
        return _read(found)
    raise FileNotFoundError(
        f"text source {source!r} is neither an existing file or directory nor a known dataset "
        f"(known: {', '.join(DATASETS)})"
    )


def _load_named(ds: NamedDataset, split: str) -> str:
    looked: list[str] = []

    def finish(path: Path) -> str:
        text = _read(path)
        return wikitext_rows_to_text(text) if ds.wikitext_lines else text

    # 1. $KVQUANT_DATA: a file (used as is) or a directory (shared/-like root, data dir or dataset dir).
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if root.is_file():
            return finish(root)
        if root.is_dir():
            cands: list[Path] = []
            rel = ds.shared_files.get(split)
            if rel:
                cands += [root / rel, root / Path(rel).relative_to("data")]
            for d in ds.dir_names:
                cands += [root / d / n for n in _SPLIT_FILE_NAMES[split]]
            cands += [root / n for n in _SPLIT_FILE_NAMES[split]]
            for cand in cands:
                if cand.is_file():
                    return finish(cand)
            looked.append(f"${DATA_ENV}={env} (no {split} file in it, e.g. {cands[0]})")
        else:
            looked.append(f"${DATA_ENV}={env} (does not exist)")
    else:
        looked.append(f"${DATA_ENV} (not set)")

    # 2. shared/
    shared = find_shared_dir()
    rel = ds.shared_files.get(split)
    if shared is None:
        where = ", ".join(str(c) for c in shared_dir_candidates())
        looked.append(f"shared/ folder (not found; looked at {where}; set $KVQUANT_SHARED)")
    elif rel is None:
        looked.append(f"{shared} (has no {ds.name} {split} split)")
    elif (shared / rel).is_file():
        return finish(shared / rel)
    else:
        looked.append(f"{shared / rel} (missing)")

    # 3. Hugging Face hub via `datasets`.
    hub_split = ds.hub_splits.get(split, split)
    hub_name = f"{ds.hub_path}" + (f"/{ds.hub_config}" if ds.hub_config else "") + f" [{hub_split}]"
    try:
        import datasets  # noqa: F401
    except ImportError:
        looked.append(f"Hugging Face hub {hub_name} (the `datasets` package is not installed)")
    else:
        unreachable = hub_unreachable()
        if unreachable:
            looked.append(f"Hugging Face hub {hub_name} ({unreachable})")
        else:
            try:
                return _load_from_hub(ds, hub_split)
            except Exception as exc:  # network errors, missing configs, ...
                looked.append(f"Hugging Face hub {hub_name} ({type(exc).__name__}: {exc})")

    # 4. A stand-in split from shared/, announced loudly.
    fb = ds.fallbacks.get(split)
    if shared is not None and fb and (shared / fb).is_file():
        warnings.warn(
            f"{ds.name} {split!r} split is not available offline; using {shared / fb} instead "
            f"(set ${DATA_ENV} to the real file, or install kvquant[hf], which brings `datasets`, with hub access)",
            stacklevel=3,
        )
        return finish(shared / fb)

    raise FileNotFoundError(
        f"could not find dataset {ds.name!r} split {split!r}. Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\nFix: set ${DATA_ENV} to the text file (or a directory holding {_SPLIT_FILE_NAMES[split][0]}), "
        "set $KVQUANT_SHARED to the project's shared/ folder, or install kvquant[hf] (it brings `datasets`) with "
        "hub access."
    )


_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable() -> str | None:
    """Why the hub is not worth asking (``None``: ask it): an offline switch is set, or the hub's host name does
    not resolve (no proxy configured). Without this, a machine with no network spends about half a minute in the
    hub client's retries before the stand-in split is used."""
    import socket
    from urllib.parse import urlparse

    for name in _OFFLINE_ENV:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"${name} is set"
    if any(os.environ.get(name) for name in _PROXY_ENV):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    return None


def _load_from_hub(ds: NamedDataset, hub_split: str) -> str:
    """Fetch a split from the hub and join it as the standard perplexity evaluation does."""
    from datasets import load_dataset

    data = load_dataset(ds.hub_path, ds.hub_config, split=hub_split)
    return "\n\n".join(data["text"])
