"""A fake ``pynvml`` module over simulated GPUs (power traces with exact energy integrals)."""

from __future__ import annotations

import math
import threading
import time
import types
from collections.abc import Callable


def triangle_trace(base: float, peak: float, rise_s: float) -> Callable[[float], float]:
    """base -> peak linearly over rise_s, back to base over rise_s, then flat at base (watts)."""

    def p(tau: float) -> float:
        if tau < 0:
            return base
        if tau < rise_s:
            return base + (peak - base) * tau / rise_s
        if tau < 2 * rise_s:
            return peak - (peak - base) * (tau - rise_s) / rise_s
        return base

    return p


def triangle_energy(base: float, peak: float, rise_s: float, t: float) -> float:
    """Exact integral over [0, t] of triangle_trace(base, peak, rise_s), joules."""
    h = peak - base
    e = base * t
    a = min(t, rise_s)
    e += 0.5 * h / rise_s * a * a
    if t > rise_s:
        b = min(t, 2 * rise_s) - rise_s
        e += h * b - 0.5 * h / rise_s * b * b
    return e


class FakeGpu:
    """A simulated GPU whose clock starts at its first power/energy read (== the monitor's start)."""

    def __init__(
        self,
        name: str | bytes,
        trace: Callable[[float], float],
        energy: Callable[[float], float],
        counter_supported: bool = True,
        counter_offset_mj: int = 987_654_321,
        counter_tick_s: float | None = None,
        instant: Callable[[float], float] | None = None,
        instant_status: int = 0,
    ) -> None:
        self.name = name
        self.trace = trace  # what nvmlDeviceGetPowerUsage reports
        self.energy = energy
        self.counter_supported = counter_supported
        self.counter_offset_mj = counter_offset_mj
        self.counter_tick_s = counter_tick_s  # None: the counter advances continuously
        self.instant = instant  # NVML_FI_DEV_POWER_INSTANT trace; None: the field API raises NotSupported
        self.instant_status = instant_status  # per-field nvmlReturn
        self.origin: float | None = None
        self.lock = threading.Lock()

    def tau(self) -> float:
        with self.lock:
            now = time.monotonic()
            if self.origin is None:
                self.origin = now
            return now - self.origin


def make_fake_pynvml(gpus: list[FakeGpu], init_error: int | None = None) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's name
        def __init__(self) -> None:
            super().__init__(3)

    class NVMLError_InvalidArgument(NVMLError):  # noqa: N801
        def __init__(self) -> None:
            super().__init__(2)

    m.NVMLError = NVMLError
    m.NVMLError_NotSupported = NVMLError_NotSupported
    m.NVMLError_InvalidArgument = NVMLError_InvalidArgument
    m.NVML_FI_DEV_POWER_INSTANT = 186
    m.calls = {"init": 0, "shutdown": 0}

    def nvmlInit() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        m.calls["init"] += 1

    def nvmlShutdown() -> None:
        m.calls["shutdown"] += 1

    def nvmlDeviceGetCount() -> int:
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(i: int) -> FakeGpu:
        if not 0 <= i < len(gpus):
            raise NVMLError_InvalidArgument()
        return gpus[i]

    def nvmlDeviceGetName(h: FakeGpu) -> str | bytes:
        return h.name

    def nvmlDeviceGetPowerUsage(h: FakeGpu) -> int:
        return int(round(h.trace(h.tau()) * 1000))  # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(h: FakeGpu) -> int:
        if not h.counter_supported:
            raise NVMLError_NotSupported()
        tau = h.tau()
        if h.counter_tick_s is not None:  # the counter only moves at tick instants (like H100's ~100 ms)
            tau = math.floor(tau / h.counter_tick_s) * h.counter_tick_s
        return h.counter_offset_mj + int(round(h.energy(tau) * 1000))  # millijoules

    def nvmlDeviceGetFieldValues(h: FakeGpu, field_ids: list[int]) -> list[types.SimpleNamespace]:
        assert field_ids == [m.NVML_FI_DEV_POWER_INSTANT]
        if h.instant is None:
            raise NVMLError_NotSupported()
        mw = int(round(h.instant(h.tau()) * 1000))
        value = types.SimpleNamespace(uiVal=mw)
        return [types.SimpleNamespace(nvmlReturn=h.instant_status, valueType=1, value=value)]

    for f in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetName,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetTotalEnergyConsumption,
        nvmlDeviceGetFieldValues,
    ):
        setattr(m, f.__name__, f)
    return m
