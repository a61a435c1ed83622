"""The calibration file format (defined in :mod:`kvquant.quant.calibration_file`, re-exported here)."""

from kvquant.quant.calibration_file import (
    FORMAT_VERSION,
    SENSITIVITIES,
    Calibration,
    CalibrationError,
    LayerCalibration,
    calibration_digest,
)

__all__ = ["FORMAT_VERSION", "SENSITIVITIES", "Calibration", "CalibrationError", "LayerCalibration",
           "calibration_digest"]
