""":class:`DetailedEnergyProfiler`: named energy regions written to disk as soon as each one ends."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from ._cuda import synchronize_cuda
from .carbon import co2_from_energy, grid_intensity
from .measurement import EnergyMeasurement, measurement_from_samples, unavailable_measurement
from .nvml import NvmlBackend, normalize_gpu_ids, open_backend
from .sampler import PowerSample, PowerSampler

__all__ = ["DetailedEnergyProfiler", "RegionContext", "sanitize_region_name", "SUMMARY_FILENAME"]

SUMMARY_FILENAME = "energy_summary.json"
SUMMARY_SCHEMA = "kvquant.energy.summary/v1"
_MAX_NAME_LEN = 100


def _shutdown(sampler: PowerSampler, backend: NvmlBackend) -> None:
    sampler.stop()
    backend.close()


def sanitize_region_name(name: str) -> str:
    """Make a region name safe as a file-name stem.

    Runs of characters other than ASCII letters, digits, ``-``, ``_`` and ``.`` become ``_``; leading and
    trailing ``.``/``_`` are stripped (no hidden files, no ``..``); the result is cut to 100 characters and
    is ``"region"`` if nothing is left. ``"nuq3 len=4096/batch:4"`` -> ``"nuq3_len_4096_batch_4"``.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:_MAX_NAME_LEN].strip("._")
    return stem or "region"


class RegionContext:
    """Handle yielded by :meth:`DetailedEnergyProfiler.profile`: attach tokens and metadata to a region.

    After the ``with`` block, :attr:`record` holds the region's summary record and :attr:`measurement` the
    :class:`~kvquant.energy.EnergyMeasurement`.
    """

    def __init__(self, name: str, file_stem: str, tokens: int | None, metadata: dict[str, Any]) -> None:
        self.name = name
        self.file_stem = file_stem
        self.tokens = tokens
        self.metadata: dict[str, Any] = dict(metadata)
        self.record: dict[str, Any] | None = None
        self.measurement: EnergyMeasurement | None = None

    def set_tokens(self, n: int) -> None:
        """Number of tokens processed in the region (for J/token and tokens/s).

        Raises:
            ValueError: ``n`` is negative.
        """
        if int(n) < 0:
            raise ValueError(f"tokens must be >= 0, got {n}")
        self.tokens = int(n)

    def add_metadata(self, **kwargs: Any) -> None:
        """Attach JSON-serialisable key/values to the region record (non-JSON values are stored as str)."""
        self.metadata.update(kwargs)


class DetailedEnergyProfiler:
    """Profile the GPU energy of named regions, with one background power-sampling thread.

    Each region (``with profiler.profile("nuq3_len4096_batch4") as ctx: ...; ctx.set_tokens(n)``) is written
    as soon as it ends, so a crash loses nothing already measured:

    * ``<output_dir>/<region>_samples.csv``: the samples inside the region (time since region start, unix
      time, each GPU's power in W and energy-counter reading since region start in J, total power);
    * ``<output_dir>/energy_summary.json``: ``{"schema": ..., "regions": [record, ...]}``, rewritten
      atomically after every region. A record holds ``energy_j``, ``duration_s``, ``mean_power_w``,
      ``peak_power_w``, ``tokens``, ``j_per_token``, ``tokens_per_s``, ``method``, ``gpu_names``, grid
      intensity and CO2 (``co2_g``, ``co2_g_per_1k_tokens``), ``metadata``, ``status`` (``"ok"`` or
      ``"error"`` when the body raised; the exception is recorded and re-raised).

    An existing summary in ``output_dir`` is appended to (``append=True``) and region files are never
    overwritten: a repeated name gets a ``_2``, ``_3``... suffix. Regions may be nested. Without NVML the
    regions are still timed (duration, tokens/s) but energy fields are None and ``method="unavailable"``.

    Args:
        output_dir: directory for the CSV and JSON files (created if missing).
        gpu_id: NVML index or list of indices; energies of several GPUs are summed.
        sample_period_s: power sampling period in seconds.
        grid_intensity_g_per_kwh: grid carbon intensity for CO2 numbers; None looks up ``country_iso_code``.
        country_iso_code: country for the grid-intensity lookup (:func:`kvquant.energy.grid_intensity`);
            None (with no explicit intensity) disables CO2 numbers.
        append: keep records from an existing ``energy_summary.json``.

    Raises:
        ValueError: a gpu_id is out of range (when NVML is available) or malformed.
        KeyError: no grid intensity is known for ``country_iso_code`` (pass ``grid_intensity_g_per_kwh``).
        RuntimeError: ``append`` and the existing summary file is unreadable.
    """

    def __init__(
        self,
        output_dir: str | Path,
        gpu_id: int | list[int] = 0,
        sample_period_s: float = 0.05,
        grid_intensity_g_per_kwh: float | None = None,
        country_iso_code: str | None = "USA",
        append: bool = True,
    ) -> None:
        if not sample_period_s > 0:
            raise ValueError(f"sample_period_s must be > 0, got {sample_period_s}")
        self.output_dir = Path(output_dir)
        self.gpu_ids = normalize_gpu_ids(gpu_id)
        self.sample_period_s = float(sample_period_s)
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._used_stems: set[str] = set()
        self._active_starts: dict[int, float] = {}

        if grid_intensity_g_per_kwh is not None:
            if grid_intensity_g_per_kwh < 0:
                raise ValueError(f"grid_intensity_g_per_kwh must be >= 0, got {grid_intensity_g_per_kwh}")
            self.grid_intensity_g_per_kwh: float | None = float(grid_intensity_g_per_kwh)
            self.grid_intensity_source: str | None = "user supplied"
        elif country_iso_code is not None:
            gi = grid_intensity(country_iso_code)
            self.grid_intensity_g_per_kwh, self.grid_intensity_source = gi.g_per_kwh, gi.source
        else:
            self.grid_intensity_g_per_kwh, self.grid_intensity_source = None, None
        self.country_iso_code = country_iso_code if grid_intensity_g_per_kwh is None else None

        self.output_dir.mkdir(parents=True, exist_ok=True)
        if append:
            self._records = self._load_existing()
        self._used_stems.update(str(r.get("file_stem", "")) for r in self._records)

        self._backend: NvmlBackend | None
        self._backend, self._reason = open_backend(self.gpu_ids)
        self._names: list[str] = []
        self._sampler: PowerSampler | None = None
        if self._backend is not None:
            try:
                self._names = [self._backend.name(i) for i in self.gpu_ids]
                use_counter = all(self._backend.energy_j(i) is not None for i in self.gpu_ids)
                self._sampler = PowerSampler(
                    self._backend, self.gpu_ids, self.sample_period_s, read_energy=use_counter
                )
                self._sampler.start()
                # stop the thread and release NVML even if the profiler is dropped without close()
                weakref.finalize(self, _shutdown, self._sampler, self._backend)
            except Exception:
                self.close()
                raise
        self._closed = False

    # -- public API --------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether energy is being measured (NVML usable)."""
        return self._sampler is not None

    @property
    def summary_path(self) -> Path:
        """Path of the JSON summary file."""
        return self.output_dir / SUMMARY_FILENAME

    def summary(self) -> list[dict[str, Any]]:
        """A copy of every region record (those loaded from an existing summary first)."""
        with self._lock:
            return [dict(r) for r in self._records]

    @contextmanager
    def profile(self, name: str, tokens: int | None = None, **metadata: Any) -> Iterator[RegionContext]:
        """Measure the body as region ``name``; yields a :class:`RegionContext`.

        Raises:
            RuntimeError: the profiler is closed.
        """
        if self._closed:
            raise RuntimeError("DetailedEnergyProfiler is closed")
        ctx = RegionContext(name, self._reserve_stem(name), tokens, metadata)
        synchronize_cuda()
        started_unix = time.time()
        first: PowerSample | None = None
        t0 = time.monotonic()
        if self._sampler is not None:
            first = self._sampler.sample_now()
            t0 = first.t
        with self._lock:
            self._active_starts[id(ctx)] = t0
        error: BaseException | None = None
        try:
            yield ctx
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish_region(ctx, first, t0, started_unix, error)

    def close(self) -> None:
        """Stop the sampling thread and release NVML (idempotent). Files are already written."""
        self._closed = True
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> DetailedEnergyProfiler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------
    def _reserve_stem(self, name: str) -> str:
        base = sanitize_region_name(name)
        with self._lock:
            stem, k = base, 1
            while stem in self._used_stems or (self.output_dir / f"{stem}_samples.csv").exists():
                k += 1
                stem = f"{base}_{k}"
            self._used_stems.add(stem)
            return stem

    def _finish_region(
        self,
        ctx: RegionContext,
        first: PowerSample | None,
        t0: float,
        started_unix: float,
        error: BaseException | None,
    ) -> None:
        try:
            synchronize_cuda()
        except Exception:  # a failing body may leave CUDA broken; still record the region
            if error is None:
                raise
        samples: list[PowerSample] = []
        sampler = self._sampler
        if sampler is not None and first is not None:
            try:
                last = sampler.sample_now()
                samples = sampler.samples_between(first.t, last.t)
                m = measurement_from_samples(samples, self.gpu_ids, self._names)
            except Exception as exc:  # NVML failing mid-run must not lose the record
                m = unavailable_measurement(self.gpu_ids, f"NVML read failed: {exc}", time.monotonic() - t0)
        else:
            reason = self._reason or "NVML unavailable"
            m = unavailable_measurement(self.gpu_ids, reason, time.monotonic() - t0)
        ctx.measurement = m
        csv_name: str | None = None
        if samples:
            csv_name = f"{ctx.file_stem}_samples.csv"
            self._write_csv(self.output_dir / csv_name, samples)
        record = self._make_record(ctx, m, started_unix, csv_name, error)
        ctx.record = record
        with self._lock:
            self._records.append(record)
            self._active_starts.pop(id(ctx), None)
            oldest = min(self._active_starts.values(), default=None)
            self._write_summary_locked()
        if sampler is not None:  # bound memory: samples older than every open region are not needed
            if oldest is None:
                sampler.clear()
            else:
                sampler.discard_before(oldest)

    def _make_record(
        self,
        ctx: RegionContext,
        m: EnergyMeasurement,
        started_unix: float,
        csv_name: str | None,
        error: BaseException | None,
    ) -> dict[str, Any]:
        tokens = ctx.tokens
        energy, duration = m.energy_j, m.duration_s
        j_per_token = energy / tokens if energy is not None and tokens else None
        tokens_per_s = tokens / duration if tokens is not None and duration else None
        intensity = self.grid_intensity_g_per_kwh
        co2_g = co2_from_energy(energy, intensity) if energy is not None and intensity is not None else None
        co2_per_1k = co2_g / tokens * 1000.0 if co2_g is not None and tokens else None
        return {
            "region": ctx.name,
            "file_stem": ctx.file_stem,
            "status": "ok" if error is None else "error",
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "start_time": _dt.datetime.fromtimestamp(started_unix, _dt.timezone.utc).isoformat(),
            "energy_j": energy,
            "duration_s": duration,
            "mean_power_w": m.mean_power_w,
            "peak_power_w": m.peak_power_w,
            "n_samples": m.n_samples,
            "tokens": tokens,
            "j_per_token": j_per_token,
            "tokens_per_s": tokens_per_s,
            "method": m.method,
            "available": m.available,
            "reason": m.reason,
            "gpu_ids": list(self.gpu_ids),
            "gpu_names": list(m.gpu_names),
            "grid_intensity_g_per_kwh": intensity,
            "grid_intensity_source": self.grid_intensity_source,
            "co2_g": co2_g,
            "co2_g_per_1k_tokens": co2_per_1k,
            "samples_csv": csv_name,
            "metadata": dict(ctx.metadata),
        }

    def _write_csv(self, path: Path, samples: list[PowerSample]) -> None:
        t0 = samples[0].t
        e0 = samples[0].energy_j
        header = ["t_s", "unix_time"]
        for g in self.gpu_ids:
            header += [f"gpu{g}_power_w", f"gpu{g}_energy_j"]
        header.append("total_power_w")
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for s in samples:
                row: list[Any] = [f"{s.t - t0:.6f}", f"{s.unix_time:.6f}"]
                for k in range(len(self.gpu_ids)):
                    e, e_start = s.energy_j[k], e0[k]
                    row.append(f"{s.power_w[k]:.3f}")
                    row.append("" if e is None or e_start is None else f"{e - e_start:.3f}")
                row.append(f"{s.total_power_w:.3f}")
                w.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def _write_summary_locked(self) -> None:
        doc = {
            "schema": SUMMARY_SCHEMA,
            "gpu_ids": list(self.gpu_ids),
            "gpu_names": list(self._names),
            "country_iso_code": self.country_iso_code,
            "grid_intensity_g_per_kwh": self.grid_intensity_g_per_kwh,
            "grid_intensity_source": self.grid_intensity_source,
            "regions": self._records,
        }
        fd, tmp = tempfile.mkstemp(prefix=".energy_summary.", suffix=".tmp", dir=self.output_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.summary_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load_existing(self) -> list[dict[str, Any]]:
        path = self.output_dir / SUMMARY_FILENAME
        if not path.exists():
            return []
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"cannot append to {path}: not a readable JSON summary ({exc}); move it or pass append=False"
            ) from exc
        regions = doc.get("regions") if isinstance(doc, dict) else None
        if not isinstance(regions, list):
            raise RuntimeError(f"cannot append to {path}: no 'regions' list; move it or pass append=False")
        return [r for r in regions if isinstance(r, dict)]
