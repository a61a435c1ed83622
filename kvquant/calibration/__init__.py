"""Offline calibration: per-channel key ranges and per-layer NUQ codebooks."""

from kvquant.calibration.format import Calibration, LayerCalibration

__all__ = ["Calibration", "LayerCalibration"]
