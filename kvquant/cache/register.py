"""``model.generate(..., cache_implementation="kvquant")`` for one model.

transformers validates ``cache_implementation`` against a fixed tuple of its own names (there is no
registry a library can add to, in 4.5x or 5.x), so kvquant does not patch transformers globally. Instead
:func:`register_cache_implementation` wraps the ``generate`` of *one model instance*: the name ``"kvquant"``
is turned into ``past_key_values=KVQuantCache(model, ...)`` built from ``cache_config``, every other call
goes to transformers untouched::

    import kvquant
    kvquant.register_cache_implementation(model)
    out = model.generate(**batch, max_new_tokens=64, cache_implementation="kvquant",
                         cache_config={"datatype": "nuq3", "calibration": "cal.safetensors"})

``cache_config`` takes :class:`~kvquant.config.QuantConfig` fields plus ``calibration`` (a path or a
:class:`~kvquant.calibration.Calibration`) and any other keyword :class:`KVQuantCache` accepts.
The cache built for the last call is kept as ``model.kvquant_last_cache`` (for ``memory_report()``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.hf_compat import cache_in, cache_kwargs
from kvquant.config import QuantConfig

CACHE_IMPLEMENTATION = "kvquant"
_ORIGINAL = "_kvquant_original_generate"


def _cache_from_config(model: torch.nn.Module, cache_config: dict[str, Any] | QuantConfig | None) -> KVQuantCache:
    if isinstance(cache_config, QuantConfig):
        return KVQuantCache(model, cache_config)
    if cache_config is not None and not isinstance(cache_config, dict):
        raise TypeError(f"cache_config for cache_implementation='kvquant' must be a dict or QuantConfig, "
                        f"got {type(cache_config).__name__}")
    options = dict(cache_config or {})
    calibration = options.pop("calibration", None)
    fields = set(QuantConfig.__dataclass_fields__)
    config = QuantConfig(**{k: options.pop(k) for k in list(options) if k in fields})
    return KVQuantCache(model, config, calibration=calibration, **options)


def register_cache_implementation(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model.generate`` accept ``cache_implementation="kvquant"`` (see the module docstring).

    Idempotent; returns ``model``. :func:`unregister_cache_implementation` restores the original method.
    """
    if getattr(model, _ORIGINAL, None) is not None:
        return model
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, cache_implementation: str | None = None, cache_config: Any = None, **kwargs: Any):
        if cache_implementation != CACHE_IMPLEMENTATION:
            if cache_implementation is not None:
                kwargs["cache_implementation"] = cache_implementation
            if cache_config is not None:
                kwargs["cache_config"] = cache_config
            return original(*args, **kwargs)
        if cache_in(kwargs) is not None:
            raise ValueError("pass either cache_implementation='kvquant' or a cache (cache= / past_key_values=), "
                             "not both")
        cache = _cache_from_config(model, cache_config)
        model.kvquant_last_cache = cache
        return original(*args, **cache_kwargs(model, cache), **kwargs)

    setattr(model, _ORIGINAL, original)
    model.generate = generate
    return model


def unregister_cache_implementation(model: torch.nn.Module) -> None:
    """Undo :func:`register_cache_implementation` (no-op when not registered)."""
    if getattr(model, _ORIGINAL, None) is None:
        return
    del model.generate  # the instance attribute; the class method shows through again
    setattr(model, _ORIGINAL, None)
