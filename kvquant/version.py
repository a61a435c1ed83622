"""kvquant's version (recorded in calibration files and reports)."""

__version__ = "0.2.0"
