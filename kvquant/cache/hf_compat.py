"""The keyword a Hugging Face model takes its cache by.

transformers 5.2x renamed ``past_key_values`` to ``cache`` in the models' ``forward`` and in ``generate`` (the
old name still works there, with a deprecation warning, until 5.40 for ``forward`` and 6.0 for ``generate``);
4.5x knows only ``past_key_values``. Everything in kvquant that hands a cache to a model, or reads the cache a
model was handed, goes through these two functions, so both generations of transformers take the same path.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@functools.cache
def _forward_takes_new_name(cls: type) -> bool:
    try:
        return NEW_NAME in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # no introspectable forward: keep the name every version accepts today
        return False


def cache_kwarg(model: torch.nn.Module) -> str:
    """``"cache"`` when ``model.forward`` takes a parameter of that name, else ``"past_key_values"``."""
    return NEW_NAME if _forward_takes_new_name(type(model)) else OLD_NAME


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``, with the name this transformers uses."""
    return {cache_kwarg(model): cache}


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache passed in ``kwargs`` under either name (``None`` when there is none)."""
    cache = kwargs.get(NEW_NAME)
    return cache if cache is not None else kwargs.get(OLD_NAME)
