"""Carbon accounting: grid carbon intensity, J -> g CO2eq, and an optional CodeCarbon tracker.

``codecarbon`` is an optional dependency (``pip install kvquant[energy]``); without it
:class:`CarbonTracker` returns ``available=False`` results and the grid-intensity lookup falls back to
:data:`GRID_INTENSITY_G_PER_KWH`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ._warn import warn_once

__all__ = [
    "CODECARBON_MISSING_REASON",
    "GRID_INTENSITY_G_PER_KWH",
    "GRID_INTENSITY_SOURCE",
    "CarbonMeasurement",
    "CarbonTracker",
    "GridIntensity",
    "co2_from_energy",
    "grid_intensity",
]

CODECARBON_MISSING_REASON = "codecarbon is not installed (pip install kvquant[energy])"

J_PER_KWH = 3.6e6

#: Built-in fallback, g CO2eq per kWh of electricity, by ISO 3166-1 alpha-3 code, year 2023.
GRID_INTENSITY_G_PER_KWH: dict[str, float] = {
    "USA": 369.5,
    "CAN": 170.0,
    "GBR": 237.6,
    "FRA": 56.0,
    "DEU": 381.0,
    "SWE": 40.7,
    "CHN": 582.3,
    "IND": 713.4,
    "JPN": 485.4,
}

#: Where :data:`GRID_INTENSITY_G_PER_KWH` comes from.
GRID_INTENSITY_SOURCE = (
    "Our World in Data electricity-mix dataset (Ember / Energy Institute), 2023 carbon intensity of "
    "electricity generation, as shipped in codecarbon 3.3 "
    "(codecarbon/data/private_infra/global_energy_mix.json)"
)


@dataclass(frozen=True)
class GridIntensity:
    """Carbon intensity of a country's electricity grid.

    Attributes:
        g_per_kwh: grams CO2-equivalent per kWh.
        country_iso_code: ISO 3166-1 alpha-3 code, e.g. ``"USA"``.
        source: where the number comes from.
    """

    g_per_kwh: float
    country_iso_code: str
    source: str


@lru_cache(maxsize=1)
def _codecarbon_energy_mix() -> dict[str, Any] | None:
    """codecarbon's per-country energy-mix table, read from its package data without importing it."""
    try:
        spec = importlib.util.find_spec("codecarbon")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "data" / "private_infra" / "global_energy_mix.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def grid_intensity(country_iso_code: str = "USA", use_codecarbon: bool = True) -> GridIntensity:
    """Country-level grid carbon intensity.

    Uses codecarbon's own per-country data when codecarbon is installed (and ``use_codecarbon``), else the
    built-in :data:`GRID_INTENSITY_G_PER_KWH` table (source: :data:`GRID_INTENSITY_SOURCE`). Sub-national
    regions are not resolved: these are country averages.

    Raises:
        KeyError: the country is in neither table.
    """
    code = country_iso_code.strip().upper()
    if use_codecarbon:
        mix = _codecarbon_energy_mix()
        entry = mix.get(code) if mix else None
        value = entry.get("carbon_intensity") if isinstance(entry, dict) else None
        if isinstance(value, (int, float)) and value >= 0:
            year = entry.get("year", "?")
            return GridIntensity(
                float(value), code, f"codecarbon global_energy_mix.json (Our World in Data, {year})"
            )
    if code in GRID_INTENSITY_G_PER_KWH:
        return GridIntensity(GRID_INTENSITY_G_PER_KWH[code], code, GRID_INTENSITY_SOURCE)
    raise KeyError(
        f"no grid carbon intensity known for country {country_iso_code!r}; pass grams_per_kwh explicitly "
        f"(built-in table: {sorted(GRID_INTENSITY_G_PER_KWH)})"
    )


def co2_from_energy(energy_j: float, grams_per_kwh: float) -> float:
    """Grams of CO2eq emitted by ``energy_j`` joules on a grid of ``grams_per_kwh`` g CO2eq/kWh.

    ``grams = energy_j / 3.6e6 * grams_per_kwh`` (1 kWh = 3.6 MJ).

    Raises:
        ValueError: a negative argument.
    """
    if energy_j < 0 or grams_per_kwh < 0:
        raise ValueError(f"energy_j and grams_per_kwh must be >= 0, got {energy_j}, {grams_per_kwh}")
    return float(energy_j) / J_PER_KWH * float(grams_per_kwh)


@dataclass
class CarbonMeasurement:
    """Result of a :class:`CarbonTracker` run (whole machine as seen by CodeCarbon: CPU, RAM, GPU).

    Attributes:
        energy_kwh: energy consumed in kWh; None when unavailable.
        emissions_kg_co2eq: emissions in kg CO2eq; None when unavailable.
        duration_s: tracked duration in seconds (wall clock; measured even when unavailable).
        available: whether CodeCarbon produced the numbers.
        reason: why not (None when available).
        country_iso_code: the country whose grid intensity was used.
    """

    energy_kwh: float | None
    emissions_kg_co2eq: float | None
    duration_s: float | None
    available: bool
    reason: str | None = None
    country_iso_code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


class CarbonTracker:
    """Offline CodeCarbon tracker (``codecarbon.OfflineEmissionsTracker``); never touches the network.

    Results are also appended by CodeCarbon to ``<output_dir>/emissions.csv``. Without codecarbon, or when
    CodeCarbon fails, :meth:`stop` returns ``available=False`` with a reason (one warning per process when
    codecarbon is missing) instead of raising.

    Args:
        output_dir: directory for CodeCarbon's ``emissions.csv`` (created if missing).
        country_iso_code: ISO 3166-1 alpha-3 code of the grid, e.g. ``"USA"``, ``"FRA"``.
        region: optional sub-national region understood by CodeCarbon (e.g. a US state, ``"california"``).
        project_name: CodeCarbon project name.
        **tracker_kwargs: passed to ``OfflineEmissionsTracker`` (e.g. ``measure_power_secs``, ``gpu_ids``).
    """

    def __init__(
        self,
        output_dir: str | Path,
        country_iso_code: str = "USA",
        region: str | None = None,
        project_name: str = "kvquant",
        **tracker_kwargs: Any,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.country_iso_code = country_iso_code
        self.region = region
        self.project_name = project_name
        self.tracker_kwargs = tracker_kwargs
        self.result: CarbonMeasurement | None = None
        self._tracker: Any = None
        self._reason: str | None = None
        self._t0: float | None = None

    def start(self) -> CarbonTracker:
        """Start tracking.

        Raises:
            RuntimeError: already started.
        """
        if self._t0 is not None:
            raise RuntimeError("CarbonTracker.start() called twice without stop()")
        self.result = None
        self._tracker, self._reason = None, None
        self._t0 = time.monotonic()
        try:
            import codecarbon
            from codecarbon import OfflineEmissionsTracker
        except ImportError:
            self._reason = CODECARBON_MISSING_REASON
            warn_once("codecarbon", f"kvquant.energy: {CODECARBON_MISSING_REASON}; carbon tracking disabled.")
            return self
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = {
                "project_name": self.project_name,
                "country_iso_code": self.country_iso_code,
                "output_dir": str(self.output_dir),
                "log_level": "error",
            }
            output_method = getattr(codecarbon, "OutputMethod", None)
            if output_method is not None:  # codecarbon >= 3 deprecates save_to_file
                kwargs["output_methods"] = [output_method.CSV]
            else:
                kwargs["save_to_file"] = True
            if self.region is not None:
                kwargs["region"] = self.region
            kwargs.update(self.tracker_kwargs)
            tracker = OfflineEmissionsTracker(**kwargs)
            tracker.start()
            self._tracker = tracker
        except Exception as exc:  # carbon tracking must never crash the benchmark
            self._reason = f"codecarbon failed to start: {exc}"
        return self

    def stop(self) -> CarbonMeasurement:
        """Stop tracking and return (and store in :attr:`result`) the measurement.

        Raises:
            RuntimeError: :meth:`start` was not called first.
        """
        if self._t0 is None:
            raise RuntimeError("CarbonTracker.stop() called before start()")
        duration = time.monotonic() - self._t0
        self._t0 = None
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            self.result = self._unavailable(self._reason or "codecarbon tracker did not start", duration)
            return self.result
        try:
            tracker.stop()
            data = getattr(tracker, "final_emissions_data", None)  # codecarbon swallows its own errors
            if data is None:
                raise RuntimeError("codecarbon produced no emissions data (see its log)")
            self.result = CarbonMeasurement(
                energy_kwh=float(data.energy_consumed),
                emissions_kg_co2eq=float(data.emissions),
                duration_s=float(data.duration),
                available=True,
                reason=None,
                country_iso_code=self.country_iso_code,
            )
        except Exception as exc:
            self.result = self._unavailable(f"codecarbon failed: {exc}", duration)
        return self.result

    def _unavailable(self, reason: str, duration: float) -> CarbonMeasurement:
        return CarbonMeasurement(None, None, duration, False, reason, self.country_iso_code)

    def __enter__(self) -> CarbonTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._t0 is not None:
            self.stop()
