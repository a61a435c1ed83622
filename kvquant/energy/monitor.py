""":class:`EnergyMonitor`: GPU energy of one interval (start/stop or ``with`` block)."""

from __future__ import annotations

import contextlib
import time
from types import TracebackType

from ._cuda import synchronize_cuda
from .measurement import EnergyMeasurement, measurement_from_samples, unavailable_measurement
from .nvml import NvmlBackend, normalize_gpu_ids, open_backend
from .sampler import PowerSample, PowerSampler

__all__ = ["EnergyMonitor"]


class EnergyMonitor:
    """Measure the energy used by one or more GPUs between :meth:`start` and :meth:`stop`.

    Energy comes from NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``) when every
    monitored GPU supports it (Volta and newer, e.g. H100), otherwise from the trapezoid integral of the
    power sampled every ``sample_period_s`` in a background thread (instantaneous power where NVML offers
    it, else ``nvmlDeviceGetPowerUsage``; see :meth:`NvmlBackend.power_w`). Power is sampled in both modes:
    for the peak, and because the counter advances in ticks (~100 ms on H100), whose partial ends are filled
    from the samples. Intervals shorter than two ticks fall back to power integration. The mean power is
    ``energy / duration``. With several GPUs the energies (and the simultaneous powers) are summed.
    ``torch.cuda.synchronize()`` is called at start and stop when CUDA
    is initialised, so queued asynchronous GPU work is counted.

    Without NVML (no ``pynvml``, no driver, no GPU) a single warning is emitted per process and
    :meth:`stop` returns a measurement with ``available=False`` and ``method="unavailable"``.

    Example::

        with EnergyMonitor(0) as m:
            run_model()
        print(m.result.energy_j)

    Args:
        gpu_id: NVML index (``nvidia-smi`` order) or a list of them.
        sample_period_s: power sampling period in seconds.

    Raises:
        ValueError: a gpu_id is out of range (when NVML is available) or malformed.
    """

    def __init__(self, gpu_id: int | list[int] = 0, sample_period_s: float = 0.05) -> None:
        if not sample_period_s > 0:
            raise ValueError(f"sample_period_s must be > 0, got {sample_period_s}")
        self.gpu_ids = normalize_gpu_ids(gpu_id)
        self.sample_period_s = float(sample_period_s)
        self.result: EnergyMeasurement | None = None
        self._backend: NvmlBackend | None
        self._backend, self._reason = open_backend(self.gpu_ids)
        self._names: list[str] = []
        if self._backend is not None:
            try:
                self._names = [self._backend.name(i) for i in self.gpu_ids]
            except Exception:
                self._backend.close()
                raise
        self._sampler: PowerSampler | None = None
        self._first: PowerSample | None = None
        self._t_start: float | None = None
        self._running = False

    @property
    def available(self) -> bool:
        """Whether NVML is usable for the monitored GPUs."""
        return self._backend is not None

    @property
    def running(self) -> bool:
        """Whether :meth:`start` was called without a matching :meth:`stop`."""
        return self._running

    def start(self) -> EnergyMonitor:
        """Synchronise CUDA, read the counters and start sampling.

        Raises:
            RuntimeError: the monitor is already running.
        """
        if self._running:
            raise RuntimeError("EnergyMonitor.start() called twice without stop()")
        self.result = None
        synchronize_cuda()
        self._t_start = time.monotonic()
        if self._backend is not None:
            probe = [self._backend.energy_j(i) for i in self.gpu_ids]
            use_counter = all(e is not None for e in probe)
            self._sampler = PowerSampler(
                self._backend, self.gpu_ids, self.sample_period_s, read_energy=use_counter
            )
            self._first = self._sampler.sample_now()
            self._sampler.start()
        self._running = True
        return self

    def stop(self) -> EnergyMeasurement:
        """Synchronise CUDA, stop sampling and return (and store in :attr:`result`) the measurement.

        Raises:
            RuntimeError: :meth:`start` was not called first.
        """
        if not self._running:
            raise RuntimeError("EnergyMonitor.stop() called before start()")
        synchronize_cuda()
        self._running = False
        if self._backend is None or self._sampler is None or self._first is None:
            assert self._t_start is not None
            duration = time.monotonic() - self._t_start
            self.result = unavailable_measurement(self.gpu_ids, self._reason or "NVML unavailable", duration)
            return self.result
        sampler, self._sampler = self._sampler, None
        sampler.stop()
        try:
            last = sampler.sample_now()
        except Exception as exc:  # a GPU that vanished mid-run must not crash the caller
            self.result = unavailable_measurement(
                self.gpu_ids, f"NVML read failed at stop: {exc}", time.monotonic() - self._t_start
            )
            return self.result
        samples = sampler.samples_between(self._first.t, last.t)
        if sampler.error is not None and not sampler.read_energy:
            # the sampling thread died: the power integral would silently miss part of the interval
            self.result = unavailable_measurement(
                self.gpu_ids, f"power sampling failed: {sampler.error}", last.t - self._first.t
            )
            return self.result
        self.result = measurement_from_samples(samples, self.gpu_ids, self._names)
        return self.result

    def close(self) -> None:
        """Stop sampling if running and release NVML; the monitor cannot be restarted afterwards."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self._running = False
        if self._backend is not None:
            self._backend.close()
            self._backend = None
            self._reason = "EnergyMonitor was closed"

    def __enter__(self) -> EnergyMonitor:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._running:
                if exc_type is None:
                    self.stop()
                else:  # keep the body's exception the one that propagates
                    with contextlib.suppress(Exception):
                        self.stop()
        finally:
            self.close()

    def __repr__(self) -> str:
        state = "running" if self._running else "idle"
        return f"EnergyMonitor(gpu_id={self.gpu_ids}, sample_period_s={self.sample_period_s}, {state})"
