"""Energy regions of one ``kvquant bench generate`` run: a :class:`~kvquant.energy.DetailedEnergyProfiler` region
for the prefill and one for the decode loop (NVML), turned into the record's energy fields."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kvquant.bench.cuda import is_cuda

#: The energy fields of a ``bench generate`` record, ``None`` where unavailable.
ENERGY_FIELDS: list[str] = [
    "energy_available", "energy_note", "energy_method", "prefill_energy_j", "decode_energy_j", "energy_j",
    "j_per_token", "prefill_j_per_token", "decode_j_per_token", "mean_power_w", "peak_power_w",
    "grid_intensity_g_per_kwh", "country", "co2_g", "co2_g_per_1k_tokens",
]


class EnergyRegions:
    """Energy regions of one benchmark run (a :class:`DetailedEnergyProfiler`, or nothing)."""

    def __init__(self, settings: Any, device: torch.device, out_dir: Path) -> None:
        """``settings``: the run's :class:`~kvquant.bench.generate.GenerateSettings` (energy, gpu_id, country,
        grid_intensity)."""
        self.profiler = None
        self.note: str | None = None
        self.country = settings.country
        use = settings.energy == "on" or (settings.energy == "auto" and is_cuda(device))
        if not use:
            self.note = ("unavailable: energy measurement off (--energy off)" if settings.energy == "off" else
                         "unavailable: CPU run (energy is measured on the GPU through NVML; --energy on forces it)")
            return
        from kvquant.energy import DetailedEnergyProfiler

        gpu = settings.gpu_id
        if gpu is None:
            gpu = device.index if device.index is not None else (torch.cuda.current_device() if is_cuda(device) else 0)
        self.profiler = DetailedEnergyProfiler(out_dir / "energy", gpu_id=gpu,
                                               grid_intensity_g_per_kwh=settings.grid_intensity,
                                               country_iso_code=settings.country)
        if settings.grid_intensity is not None:
            self.country = None
        if not self.profiler.available:
            self.note = f"unavailable: {self.profiler._reason or 'NVML unavailable'}"

    @contextlib.contextmanager
    def regions(self, tag: str, store: dict[str, Any]) -> Iterator[Any]:
        """A ``region(name, tokens)`` factory recording each region's record into ``store[name]``."""

        @contextlib.contextmanager
        def region(name: str, tokens: int) -> Iterator[None]:
            if self.profiler is None:
                yield
                return
            with self.profiler.profile(f"{tag}_{name}", tokens=tokens) as ctx:
                yield
            store[name] = ctx.record

        yield region

    def fields(self, store: dict[str, Any], generated: int) -> dict[str, Any]:
        out: dict[str, Any] = {k: None for k in ENERGY_FIELDS}
        out["country"] = self.country
        out["energy_available"] = False
        out["energy_note"] = self.note
        pre, dec = store.get("prefill"), store.get("decode")
        if self.profiler is None or pre is None:
            return out
        out["grid_intensity_g_per_kwh"] = self.profiler.grid_intensity_g_per_kwh
        out["energy_method"] = pre.get("method")
        recs = [r for r in (pre, dec) if r is not None]
        if not all(r.get("energy_j") is not None for r in recs):
            reasons = {r.get("reason") for r in recs if r.get("reason")}
            out["energy_note"] = "unavailable: " + ("; ".join(sorted(reasons)) or "no energy reading")
            return out
        e_pre = float(pre["energy_j"])
        e_dec = float(dec["energy_j"]) if dec is not None else 0.0
        energy = e_pre + e_dec
        duration = sum(float(r.get("duration_s") or 0.0) for r in recs)
        out.update(energy_available=True, energy_note=None, prefill_energy_j=e_pre,
                   decode_energy_j=e_dec if dec is not None else None, energy_j=energy,
                   j_per_token=energy / generated if generated else None,
                   prefill_j_per_token=pre.get("j_per_token"),
                   decode_j_per_token=dec.get("j_per_token") if dec is not None else None,
                   mean_power_w=energy / duration if duration else None,
                   peak_power_w=max((r.get("peak_power_w") or 0.0) for r in recs) or None)
        intensity = self.profiler.grid_intensity_g_per_kwh
        if intensity is not None:
            from kvquant.energy import co2_from_energy

            co2 = co2_from_energy(energy, intensity)
            out["co2_g"] = co2
            out["co2_g_per_1k_tokens"] = co2 / generated * 1000.0 if generated else None
        return out

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
