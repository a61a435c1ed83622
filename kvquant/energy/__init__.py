"""GPU energy and carbon measurement for kvquant benchmarks.

* :class:`EnergyMonitor` measures one interval (NVML energy counter, or integrated power samples).
* :class:`DetailedEnergyProfiler` records named regions (J/token, tokens/s, CO2) to CSV/JSON as they end.
* :class:`CarbonTracker` wraps CodeCarbon's offline tracker; :func:`co2_from_energy` and
  :func:`grid_intensity` convert joules to grams of CO2eq.

NVML (``nvidia-ml-py``) and CodeCarbon are optional (``pip install kvquant[energy]``): without them the
results say ``available=False`` with a reason, after a single :class:`EnergyUnavailableWarning`.
Command line: ``python -m kvquant.energy --duration 2 --gpu 0`` prints one JSON measurement.
"""

from ._warn import EnergyUnavailableWarning
from .carbon import (
    GRID_INTENSITY_G_PER_KWH,
    GRID_INTENSITY_SOURCE,
    CarbonMeasurement,
    CarbonTracker,
    GridIntensity,
    co2_from_energy,
    grid_intensity,
)
from .measurement import EnergyMeasurement
from .monitor import EnergyMonitor
from .nvml import NvmlBackend, NvmlUnavailableError
from .profiler import DetailedEnergyProfiler, RegionContext, sanitize_region_name

__all__ = [
    "GRID_INTENSITY_G_PER_KWH",
    "GRID_INTENSITY_SOURCE",
    "CarbonMeasurement",
    "CarbonTracker",
    "DetailedEnergyProfiler",
    "EnergyMeasurement",
    "EnergyMonitor",
    "EnergyUnavailableWarning",
    "GridIntensity",
    "NvmlBackend",
    "NvmlUnavailableError",
    "RegionContext",
    "co2_from_energy",
    "grid_intensity",
    "sanitize_region_name",
]
