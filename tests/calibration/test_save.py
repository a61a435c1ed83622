"""Calibration files are written atomically, with the mode the umask gives new files, under a .safetensors name."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from kvquant.calibration import Calibration, LayerCalibration
from kvquant.calibration.format import calibration_path, save_calibration


@pytest.fixture
def cal() -> Calibration:
    lo = -torch.ones(2, 16)
    return Calibration([LayerCalibration(lo, -lo)], "m", 0.01, 1, True, 2, 16)


@pytest.fixture
def umask():
    """Set a umask for the test, restore the old one after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_umask_mode_not_safetensors_private_one(cal, umask, tmp_path):
    tensors, sidecar = save_calibration(cal, tmp_path / "cal.safetensors")
    assert (_mode(tensors), _mode(sidecar)) == (0o644, 0o644)
    umask(0o077)
    tensors, sidecar = save_calibration(cal, tmp_path / "private.safetensors")
    assert (_mode(tensors), _mode(sidecar)) == (0o600, 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # nothing staged is left behind
        "cal.safetensors", "cal.safetensors.json", "private.safetensors", "private.safetensors.json"]
    assert Calibration.load(tensors).model_id == "m"


def test_a_name_without_suffix_gets_one(cal, umask, tmp_path):
    assert calibration_path(tmp_path / "cal") == tmp_path / "cal.safetensors"
    assert calibration_path(tmp_path / "cal.v2") == tmp_path / "cal.v2.safetensors"
    assert calibration_path(tmp_path / "c.safetensors") == tmp_path / "c.safetensors"
    tensors, sidecar = save_calibration(cal, tmp_path / "sub" / "cal")
    assert (tensors.name, sidecar.name) == ("cal.safetensors", "cal.safetensors.json")
    assert not (tmp_path / "sub" / "cal").exists()


def test_a_failed_write_keeps_the_previous_file(cal, umask, tmp_path, monkeypatch):
    tensors, _ = save_calibration(cal, tmp_path / "cal.safetensors")
    before = tensors.read_bytes()

    def broken(self, path):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Calibration, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_calibration(cal, tmp_path / "cal.safetensors")
    assert tensors.read_bytes() == before and len(list(tmp_path.iterdir())) == 2
