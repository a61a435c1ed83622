"""Offline calibration: per-channel key ranges and per-layer NUQ codebooks."""

from kvquant.quant.calibration_file import Calibration, CalibrationError, LayerCalibration

__all__ = ["Calibration", "CalibrationError", "LayerCalibration"]
