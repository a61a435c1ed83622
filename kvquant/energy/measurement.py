"""The :class:`EnergyMeasurement` result type and the arithmetic that produces it from samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .sampler import PowerSample, trapezoid_energy_j

__all__ = ["EnergyMeasurement", "Method", "measurement_from_samples", "unavailable_measurement"]

Method = Literal["nvml_energy_counter", "nvml_power_sampling", "unavailable"]


@dataclass
class EnergyMeasurement:
    """GPU energy used over one interval, summed over the monitored GPUs.

    Attributes:
        energy_j: energy in joules; None when unavailable.
        duration_s: wall-clock length of the interval in seconds (a real timing, also reported when the
            energy is unavailable; None only if the interval was never timed).
        mean_power_w: time-averaged total power, ``energy_j / duration_s``; None when unavailable.
        peak_power_w: highest total (summed over GPUs) power seen in one sample; None when unavailable. NVML's
            "instantaneous" reading is itself a short-window average (~100 ms on H100), so brief spikes are
            smoothed and, for sub-second intervals, the peak can even be below ``mean_power_w``.
        gpu_name: the GPU name, or the distinct names joined by ", " for mixed multi-GPU sets.
        gpu_ids: NVML indices of the GPUs measured.
        method: ``"nvml_energy_counter"`` (``nvmlDeviceGetTotalEnergyConsumption``, with the partial counter
            ticks at both ends filled from power samples), ``"nvml_power_sampling"`` (trapezoid integral of
            sampled power; also used for intervals shorter than two counter ticks, ~0.2 s on H100) or
            ``"unavailable"``.
        available: whether the numbers are real measurements.
        reason: why the measurement is unavailable (None when available).
        n_samples: number of power samples inside the interval (boundary reads included).
        gpu_names: name of each GPU in ``gpu_ids`` order.
    """

    energy_j: float | None
    duration_s: float | None
    mean_power_w: float | None
    peak_power_w: float | None
    gpu_name: str | None
    gpu_ids: list[int]
    method: Method
    available: bool
    reason: str | None = None
    n_samples: int = 0
    gpu_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


def join_gpu_names(names: Sequence[str]) -> str | None:
    """One display name for a set of GPUs: the common name, or the distinct names joined by ", "."""
    distinct = list(dict.fromkeys(names))
    return ", ".join(distinct) if distinct else None


def unavailable_measurement(
    gpu_ids: Sequence[int], reason: str, duration_s: float | None = None
) -> EnergyMeasurement:
    """A measurement with ``available=False`` and no energy or power numbers."""
    return EnergyMeasurement(
        energy_j=None,
        duration_s=duration_s,
        mean_power_w=None,
        peak_power_w=None,
        gpu_name=None,
        gpu_ids=list(gpu_ids),
        method="unavailable",
        available=False,
        reason=reason,
        n_samples=0,
        gpu_names=[],
    )


def _interp_power(samples: Sequence[PowerSample], g: int, t: float) -> float:
    """Power of GPU ``g`` at time ``t``, linearly interpolated between samples (clamped at the ends)."""
    if t <= samples[0].t:
        return samples[0].power_w[g]
    for a, b in zip(samples, samples[1:]):
        if t <= b.t:
            w = (t - a.t) / (b.t - a.t) if b.t > a.t else 1.0
            return a.power_w[g] + w * (b.power_w[g] - a.power_w[g])
    return samples[-1].power_w[g]


def _integrate_power(samples: Sequence[PowerSample], g: int, a: float, b: float) -> float:
    """Integral of the piecewise-linear power of GPU ``g`` over ``[a, b]``, in joules."""
    if b <= a:
        return 0.0
    pts = [(a, _interp_power(samples, g, a))]
    pts += [(s.t, s.power_w[g]) for s in samples if a < s.t < b]
    pts.append((b, _interp_power(samples, g, b)))
    return sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in zip(pts, pts[1:]))


def _counter_energy_j(samples: Sequence[PowerSample], g: int) -> float | None:
    """Energy of GPU ``g`` from its energy counter, or None when the counter cannot be used.

    NVML's counter is updated in discrete ticks (every ~100 ms on H100), so a plain difference of the
    boundary readings is off by up to one tick of energy at each end. Instead the tick instants are located
    from the samples (midpoint between the last read with the old value and the first with the new one); the
    counter gives the energy between the first and last tick inside the interval, and the power samples fill
    the two partial-tick ends. A counter that changes at every read (finer than the sampling) is used as is.
    Returns None if a reading is missing, the counter went backwards (driver reload), or fewer than two ticks
    fall inside the interval (the caller then integrates power instead).
    """
    c = [s.energy_j[g] for s in samples]
    if any(x is None for x in c):
        return None
    vals: list[float] = [x for x in c if x is not None]
    if any(b < a for a, b in zip(vals, vals[1:])):
        return None
    ticks = [k for k in range(1, len(vals)) if vals[k] != vals[k - 1]]
    if len(ticks) == len(vals) - 1:
        return vals[-1] - vals[0]
    if len(ticks) < 2:
        return None
    j, k = ticks[0], ticks[-1]
    u_j = 0.5 * (samples[j - 1].t + samples[j].t)
    u_k = 0.5 * (samples[k - 1].t + samples[k].t)
    return (
        (vals[k] - vals[j])
        + _integrate_power(samples, g, samples[0].t, u_j)
        + _integrate_power(samples, g, u_k, samples[-1].t)
    )


def measurement_from_samples(
    samples: Sequence[PowerSample],
    gpu_ids: Sequence[int],
    gpu_names: Sequence[str],
) -> EnergyMeasurement:
    """Build a measurement from time-ordered samples whose first and last are the interval's boundaries.

    Per GPU, the energy counter is used when it has readings and ticked at least twice inside the interval
    (see :func:`_counter_energy_j`); otherwise that GPU's power is integrated with the trapezoid rule, and the
    method is reported as ``"nvml_power_sampling"`` unless every GPU used its counter.
    """
    if len(samples) < 2:
        return unavailable_measurement(gpu_ids, "fewer than two power samples were taken")
    duration = samples[-1].t - samples[0].t
    energy = 0.0
    method: Method = "nvml_energy_counter"
    for g in range(len(gpu_ids)):
        e = _counter_energy_j(samples, g)
        if e is None:
            e = trapezoid_energy_j(samples, g)
            method = "nvml_power_sampling"
        energy += e
    totals = [s.total_power_w for s in samples]
    mean_power = energy / duration if duration > 0 else sum(totals) / len(totals)
    return EnergyMeasurement(
        energy_j=energy,
        duration_s=duration,
        mean_power_w=mean_power,
        peak_power_w=max(totals),
        gpu_name=join_gpu_names(gpu_names),
        gpu_ids=list(gpu_ids),
        method=method,
        available=True,
        reason=None,
        n_samples=len(samples),
        gpu_names=list(gpu_names),
    )
