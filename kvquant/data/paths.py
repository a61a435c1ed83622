"""Locating the project's ``shared/`` folder of development data and weights.

``shared/`` sits beside the repository (``../shared`` from the repo root) and is never committed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

SHARED_ENV = "KVQUANT_SHARED"


def repo_root() -> Path:
    """The directory holding the ``kvquant`` package source (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[2]


def shared_dir_candidates() -> list[Path]:
    """Every place :func:`find_shared_dir` looks, in order (for error messages and diagnostics)."""
    candidates: list[Path] = []
    env = os.environ.get(SHARED_ENV)
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(Path.cwd() / ".." / "shared")
    candidates.append(repo_root() / ".." / "shared")
    return candidates


def find_shared_dir() -> Path | None:
    """Return the ``shared/`` data folder, or ``None`` when it cannot be found.

    Looks at ``$KVQUANT_SHARED`` first, then ``../shared`` relative to the current working directory,
    then ``../shared`` relative to the repository root. A ``$KVQUANT_SHARED`` that does not point at a
    directory is reported with a warning and the other places are tried.
    """
    env = os.environ.get(SHARED_ENV)
    for i, cand in enumerate(shared_dir_candidates()):
        if cand.is_dir():
            return cand.resolve()
        if i == 0 and env:
            warnings.warn(f"${SHARED_ENV}={env!r} is not a directory; ignoring it", stacklevel=2)
    return None
