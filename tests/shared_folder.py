"""Fixtures of the tests that find data and models: the ``shared/`` folder, or none at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvquant.data import find_shared_dir
from kvquant.data import paths as data_paths
from kvquant.data.paths import shared_dir_candidates


@pytest.fixture(autouse=True)
def _no_user_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without the user's data/model overrides (each test sets what it needs)."""
    monkeypatch.delenv("KVQUANT_DATA", raising=False)
    monkeypatch.delenv("KVQUANT_MODEL", raising=False)


@pytest.fixture
def shared() -> Path:
    found = find_shared_dir()
    if found is None:
        pytest.skip(f"../shared not found: looked at {', '.join(map(str, shared_dir_candidates()))}")
    return found


@pytest.fixture
def no_shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make every shared/ candidate miss and the hub `datasets` package unavailable."""
    monkeypatch.delenv("KVQUANT_SHARED", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(data_paths, "repo_root", lambda: tmp_path / "repo")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
