"""Thin wrapper around NVML (``pynvml``, shipped by the ``nvidia-ml-py`` package).

This module is the single boundary between :mod:`kvquant.energy` and the NVIDIA driver: everything else
talks to :class:`NvmlBackend`, so tests can replace ``pynvml`` with a fake module in ``sys.modules``.
``pynvml`` is imported lazily, only when a backend is opened.

GPU indices are NVML indices, i.e. the order of ``nvidia-smi``; they ignore ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from ._warn import warn_once

__all__ = ["NvmlBackend", "NvmlUnavailableError", "open_backend", "normalize_gpu_ids"]

# NVML return codes that mean "this device has no such counter" (nvml.h: NVML_ERROR_NOT_SUPPORTED = 3,
# NVML_ERROR_FUNCTION_NOT_FOUND = 13, the latter for drivers older than the function).
_NOT_SUPPORTED_CODES = (3, 13)

# nvmlValueType_t -> member of the nvmlValue_t union (nvml.h)
_VALUE_TYPE_ATTR = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class NvmlUnavailableError(RuntimeError):
    """NVML cannot be used on this machine (no ``pynvml``, no driver, or no NVIDIA GPU)."""


def normalize_gpu_ids(gpu_id: int | list[int] | tuple[int, ...]) -> list[int]:
    """Turn ``0`` or ``[0, 1]`` into a non-empty list of distinct non-negative ints (order preserved).

    Raises:
        ValueError: if the list is empty, holds a negative / non-integer id, or repeats an id.
    """
    ids = [gpu_id] if isinstance(gpu_id, int) else list(gpu_id)
    if not ids:
        raise ValueError("gpu_id must be an int or a non-empty list of ints")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"invalid gpu_id {i!r}: GPU ids are non-negative ints")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate gpu_id in {ids}")
    return ids


class NvmlBackend:
    """An initialised NVML connection: device names, power (W) and the total-energy counter (J).

    Opening calls ``nvmlInit()`` (reference counted by NVML, so several backends may coexist); call
    :meth:`close` (or use as a context manager) to call ``nvmlShutdown()``.

    Raises:
        NvmlUnavailableError: ``pynvml`` is not installed, ``nvmlInit`` failed, or no GPU is present.
    """

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailableError(
                f"pynvml could not be imported ({exc}); install it with pip install kvquant[energy]"
            ) from exc
        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError (driver/library missing) or an OSError from ctypes
            raise NvmlUnavailableError(f"nvmlInit failed: {exc}") from exc
        self._closed = False
        self._lock = threading.Lock()
        self._handles: dict[int, Any] = {}
        self._instant_ok: dict[int, bool] = {}
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.close()
            raise NvmlUnavailableError(f"nvmlDeviceGetCount failed: {exc}") from exc
        if count <= 0:
            self.close()
            raise NvmlUnavailableError("NVML found no NVIDIA GPU on this machine")
        self._count = count

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Call ``nvmlShutdown()`` once; further calls do nothing."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with contextlib.suppress(Exception):  # shutting down must never raise
            self._nvml.nvmlShutdown()

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -----------------------------------------------------------------------------------
    def device_count(self) -> int:
        """Number of GPUs NVML sees."""
        return self._count

    def validate(self, gpu_ids: list[int]) -> None:
        """Raise ``ValueError`` naming the first id that is not a valid NVML index."""
        for i in gpu_ids:
            if not 0 <= i < self._count:
                raise ValueError(
                    f"gpu_id {i} is out of range: NVML sees {self._count} GPU(s) "
                    f"(valid ids 0..{self._count - 1})"
                )

    def _handle(self, i: int) -> Any:
        with self._lock:
            h = self._handles.get(i)
            if h is None:
                self.validate([i])
                h = self._nvml.nvmlDeviceGetHandleByIndex(i)
                self._handles[i] = h
            return h

    def name(self, i: int) -> str:
        """Device name, e.g. ``"NVIDIA H100 80GB HBM3"``."""
        name = self._nvml.nvmlDeviceGetName(self._handle(i))
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)

    def power_w(self, i: int) -> float:
        """Current board power draw in watts.

        Prefers the instantaneous reading (``nvmlDeviceGetFieldValues`` with ``NVML_FI_DEV_POWER_INSTANT``):
        on Ampere (except GA100) and newer GPUs, H100 included, ``nvmlDeviceGetPowerUsage`` returns power
        averaged over the last second, which smooths peaks and lags behind load changes. Falls back to
        ``nvmlDeviceGetPowerUsage`` (milliwatts) where the field is not supported. :meth:`power_source`
        tells which one a GPU uses.
        """
        h = self._handle(i)
        if self._instant_ok.get(i, True):
            mw = self._instant_power_mw(h)
            if i not in self._instant_ok:
                self._instant_ok[i] = mw is not None
            if mw is not None:
                return mw / 1000.0
        return float(self._nvml.nvmlDeviceGetPowerUsage(h)) / 1000.0

    def power_source(self, i: int) -> str:
        """``"instant"`` (NVML_FI_DEV_POWER_INSTANT) or ``"average"`` (nvmlDeviceGetPowerUsage) for GPU i."""
        if i not in self._instant_ok:
            self.power_w(i)
        return "instant" if self._instant_ok[i] else "average"

    def _instant_power_mw(self, handle: Any) -> float | None:
        """Instantaneous power in mW from the NVML field API, or None if unavailable on this GPU/driver."""
        field = getattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        get = getattr(self._nvml, "nvmlDeviceGetFieldValues", None)
        if field is None or get is None:
            return None
        try:
            v = get(handle, [field])[0]
        except Exception:  # not supported by this driver / device
            return None
        if getattr(v, "nvmlReturn", 1) != 0:
            return None
        attr = _VALUE_TYPE_ATTR.get(getattr(v, "valueType", -1))
        if attr is None:
            return None
        value = getattr(v.value, attr, None)
        return float(value) if isinstance(value, (int, float)) and value >= 0 else None

    def energy_j(self, i: int) -> float | None:
        """Total energy since the driver was loaded, in joules, or None if the GPU has no such counter.

        Uses ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules; Volta and newer).
        ``NVMLError_NotSupported`` (and "function not found" on old drivers) give None; other NVML errors
        propagate.
        """
        try:
            mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle(i))
        except Exception as exc:
            if self._is_not_supported(exc):
                return None
            raise
        return float(mj) / 1000.0

    def _is_not_supported(self, exc: BaseException) -> bool:
        for cls_name in ("NVMLError_NotSupported", "NVMLError_FunctionNotFound"):
            cls = getattr(self._nvml, cls_name, None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
        base = getattr(self._nvml, "NVMLError", None)
        return (
            isinstance(base, type)
            and isinstance(exc, base)
            and getattr(exc, "value", None) in _NOT_SUPPORTED_CODES
        )


def open_backend(gpu_ids: list[int]) -> tuple[NvmlBackend | None, str | None]:
    """Open NVML for ``gpu_ids``.

    Returns ``(backend, None)`` on success, or ``(None, reason)`` when NVML is unavailable, in which case one
    :class:`~kvquant.energy.EnergyUnavailableWarning` is emitted per process.

    Raises:
        ValueError: NVML works but one of ``gpu_ids`` is out of range (the backend is closed first).
    """
    try:
        backend = NvmlBackend()
    except NvmlUnavailableError as exc:
        reason = str(exc)
        warn_once(
            "nvml",
            f"kvquant.energy: GPU energy measurement unavailable ({reason}); "
            "results will have available=False and no energy numbers.",
            stacklevel=4,
        )
        return None, reason
    try:
        backend.validate(gpu_ids)
    except ValueError:
        backend.close()
        raise
    return backend, None
