"""Files written atomically (a crash leaves the previous file or the new one, never half of one), with the mode
the umask gives new files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask (``0o666 & ~umask``; 0644 for umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Give the finished file ``tmp`` the default mode (:func:`default_file_mode`: writers such as safetensors'
    make private 0600 files) and rename it to ``path`` in one step (same filesystem)."""
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)
    return Path(path)
