"""Background thread that samples GPU power (and the energy counter) at a fixed period."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .nvml import NvmlBackend

__all__ = ["PowerSample", "PowerSampler", "trapezoid_energy_j"]


@dataclass(frozen=True)
class PowerSample:
    """One reading of every monitored GPU.

    Attributes:
        t: clock time in seconds (``time.monotonic`` by default), the midpoint of the reads.
        unix_time: wall-clock time (``time.time``) of the reading.
        power_w: power of each GPU in watts, in the order of the sampler's ``gpu_ids``.
        energy_j: energy-counter reading of each GPU in joules, None where not read / unsupported.
    """

    t: float
    unix_time: float
    power_w: tuple[float, ...]
    energy_j: tuple[float | None, ...]

    @property
    def total_power_w(self) -> float:
        """Sum of the GPUs' power."""
        return float(sum(self.power_w))


def trapezoid_energy_j(samples: Sequence[PowerSample], gpu_index: int | None = None) -> float:
    """Integrate power over time (trapezoid rule) in joules.

    Args:
        samples: samples ordered by time.
        gpu_index: position of the GPU in ``power_w``; None integrates the sum over GPUs.
    """
    total = 0.0
    for a, b in zip(samples, samples[1:]):
        pa = a.total_power_w if gpu_index is None else a.power_w[gpu_index]
        pb = b.total_power_w if gpu_index is None else b.power_w[gpu_index]
        total += 0.5 * (pa + pb) * (b.t - a.t)
    return total


class PowerSampler:
    """Samples the power of ``gpu_ids`` every ``period_s`` in a daemon thread.

    Samples are kept in memory (:meth:`samples_between`, :meth:`discard_before`); :meth:`sample_now` takes an
    extra reading synchronously, used at region boundaries so integrals cover the exact interval. Errors
    raised by NVML inside the thread stop the sampling and are kept in :attr:`error`.
    """

    def __init__(
        self,
        backend: NvmlBackend,
        gpu_ids: Sequence[int],
        period_s: float = 0.05,
        read_energy: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"sample_period_s must be > 0, got {period_s}")
        self._backend = backend
        self.gpu_ids = list(gpu_ids)
        self.period_s = float(period_s)
        self.read_energy = read_energy
        self._clock = clock
        self._samples: list[PowerSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def read(self) -> PowerSample:
        """Read every GPU once (does not store the sample)."""
        t0 = self._clock()
        unix = time.time()
        power = tuple(self._backend.power_w(i) for i in self.gpu_ids)
        if self.read_energy:
            energy = tuple(self._backend.energy_j(i) for i in self.gpu_ids)
        else:
            energy = tuple(None for _ in self.gpu_ids)
        t1 = self._clock()
        return PowerSample(t=0.5 * (t0 + t1), unix_time=unix, power_w=power, energy_j=energy)

    def sample_now(self) -> PowerSample:
        """Read every GPU once, store the sample and return it."""
        s = self.read()
        with self._lock:
            self._samples.append(s)
            # keep the list ordered: a boundary read may finish after a concurrent thread read
            if len(self._samples) > 1 and self._samples[-2].t > s.t:
                self._samples.sort(key=lambda x: x.t)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample_now()
            except Exception as exc:  # reported through .error, never kills the program
                self.error = exc
                return

    def start(self) -> None:
        """Start the background thread (no-op when already running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvquant-energy-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 10 * self.period_s))
            self._thread = None

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def samples_between(self, t_start: float, t_end: float) -> list[PowerSample]:
        """Stored samples with ``t_start <= t <= t_end``, ordered by time."""
        with self._lock:
            return [s for s in self._samples if t_start <= s.t <= t_end]

    def discard_before(self, t: float) -> None:
        """Forget samples older than ``t`` (bounds memory in long profiling runs)."""
        with self._lock:
            self._samples = [s for s in self._samples if s.t >= t]

    def clear(self) -> None:
        """Forget every stored sample."""
        with self._lock:
            self._samples.clear()
