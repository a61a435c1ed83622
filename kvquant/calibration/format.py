"""The calibration file format (defined in :mod:`kvquant.quant.calibration_file`, re-exported here) and
:func:`save_calibration`, which writes a calibration atomically with the umask's file mode."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kvquant.files import publish
from kvquant.quant.calibration_file import (
    FORMAT_VERSION,
    SENSITIVITIES,
    Calibration,
    CalibrationError,
    LayerCalibration,
    calibration_digest,
)

__all__ = ["FORMAT_VERSION", "SENSITIVITIES", "Calibration", "CalibrationError", "LayerCalibration",
           "calibration_digest", "calibration_path", "find_calibration", "save_calibration"]

SUFFIX = ".safetensors"


def calibration_path(path: str | Path) -> Path:
    """Where a calibration asked for as ``path`` is written: ``path`` when it ends in ``.safetensors``, else
    ``path.safetensors`` (``--out cal`` writes ``cal.safetensors``)."""
    path = Path(path)
    return path if path.name.endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


def find_calibration(path: str | Path) -> Path:
    """The calibration file a user means by ``path``: ``path`` itself when it is a file, else
    :func:`calibration_path` of it (``--calibration cal`` finds the ``cal.safetensors`` that ``--out cal`` wrote)."""
    path = Path(path)
    return path if path.is_file() else calibration_path(path)


def save_calibration(calibration: Calibration, path: str | Path) -> tuple[Path, Path]:
    """Write ``calibration`` to :func:`calibration_path` of ``path`` and its JSON sidecar (``<file>.json``).

    Each file is staged in a temporary folder beside it and renamed into place, with the mode the umask gives new
    files (0644 under umask 022; safetensors alone writes 0600, unreadable to the other users of a shared machine).

    Returns:
        ``(tensors file, sidecar)``.
    """
    target = calibration_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sidecar = target.with_name(target.name + ".json")
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        staged = calibration.save(Path(tmp) / target.name)
        publish(staged.with_name(staged.name + ".json"), sidecar)
        publish(staged, target)
    return target, sidecar
