"""One warning per process, shared by the energy modules."""

from __future__ import annotations

import threading
import warnings

__all__ = ["EnergyUnavailableWarning", "warn_once"]


class EnergyUnavailableWarning(UserWarning):
    """Emitted (once per process and cause) when energy or carbon measurement is unavailable."""


_WARNED_KEYS: set[str] = set()
_LOCK = threading.Lock()


def warn_once(key: str, message: str, stacklevel: int = 3) -> bool:
    """Emit ``message`` as an :class:`EnergyUnavailableWarning` the first time ``key`` is seen.

    Returns True when the warning was emitted, False when it had already been emitted in this process.
    """
    with _LOCK:
        if key in _WARNED_KEYS:
            return False
        _WARNED_KEYS.add(key)
    warnings.warn(message, EnergyUnavailableWarning, stacklevel=stacklevel)
    return True
