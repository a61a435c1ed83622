"""Decode attention straight from the packed cache inside ``model.generate`` (the ``"triton"`` cache backend).

How it is wired (one mechanism, nothing global that two models or caches could share by mistake):

* **Attention function.** :func:`install_kernel_attention` registers ``"kvquant_<base>"`` (``base`` = the
  model's current implementation, ``"sdpa"`` or ``"eager"``) with transformers' ``AttentionInterface`` and the
  same mask function as ``base`` with ``AttentionMaskInterface``, then switches the model to it with
  ``model.set_attn_implementation`` (remembering ``base``; :func:`uninstall_kernel_attention` switches back).
  The registered function *wraps* ``base``: every call that is not a kernel decode step (prefill, multi-token
  chunks, fp16 or torch-backend caches, :class:`~transformers.DynamicCache`, no cache) goes to ``base``
  unchanged, with the same mask, so the model computes exactly what it did before.
* **Finding the cache.** The decoder's forward pre-hook (``hf_cache.install_step_hook``), which already hands
  each step's padding mask and position ids to the :class:`~kvquant.cache.hf_cache.KVQuantCache`, also sets
  the context variable :data:`ACTIVE_CACHE` to that cache for the duration of the decoder's forward (a
  forward hook with ``always_call=True`` resets it, also on exceptions). The attention function reads it and
  takes layer ``module.layer_idx``. A context variable is per thread / per task and restored on exit, so
  two models or caches in one process (sequential, nested or in threads) each see their own cache.
* **Kernel decode step.** ``KVQuantLayer.update`` decides per layer and step: triton backend, a quantized
  store that already holds the past, one new token per sequence, every sequence real (no padding token in
  this step), :data:`ACTIVE_CACHE` is this cache and the model runs a ``kvquant_*`` implementation. Then it
  does *not* dequantize: it keeps the new token pending and returns it alone (``[B, Hkv, 1, D]``). The
  attention function checks that the key it receives is that pending token (identity) and calls
  :func:`kvquant.kernels.decode_attention` over the stored (past) tokens, keys rotated in the kernel
  (``pos_offset`` = each sequence's first real position; the store is compact per sequence, so left
  padding needs no mask), with the new token as ``extra_kv``: the result is the softmax over
  ``[past quantized, new exact]``, the torch backend's semantics. Only then is the new token appended to
  the store (so a token leaving the exact residual window this step is still read exactly, as with torch).
  The 4-D mask the model built is not used on this path: it would only hide padding, which the compact
  store does not hold (custom 4-D masks are therefore not supported with the triton backend).
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvquant.cache.hf_cache import KVQuantCache

ACTIVE_CACHE: contextvars.ContextVar[KVQuantCache | None] = contextvars.ContextVar("kvquant_active_cache",
                                                                                   default=None)
_TOKENS: contextvars.ContextVar[tuple[contextvars.Token, ...]] = contextvars.ContextVar("kvquant_active_tokens",
                                                                                      default=())
PREFIX = "kvquant_"
WRAPPABLE = ("sdpa", "eager")
_PREV_ATTR = "_kvquant_previous_attn_implementation"


def enter(cache: KVQuantCache | None) -> None:
    """Make ``cache`` the :data:`ACTIVE_CACHE` until the matching :func:`leave` (decoder pre-hook)."""
    _TOKENS.set((*_TOKENS.get(), ACTIVE_CACHE.set(cache)))


def leave() -> None:
    """Restore :data:`ACTIVE_CACHE` to its value before the last :func:`enter` (decoder forward hook)."""
    tokens = _TOKENS.get()
    if tokens:
        ACTIVE_CACHE.reset(tokens[-1])
        _TOKENS.set(tokens[:-1])


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    """The attention function ``base`` resolves to for ``module`` (eager: the model file's own)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}'s module has no eager_attention_forward to wrap")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_attention(base: str) -> Callable:
    def kvquant_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``query [B, Hq, s, D]``, ``key/value [B, Hkv, kv, D]`` -> ``([B, s, Hq, D], None)``. Arguments after the
        mask are the base function's own (transformers passes them by name; a wrapper such as kvpress's passes
        ``dropout`` by position) and reach it unchanged."""
        cache = ACTIVE_CACHE.get()
        layer_idx = getattr(module, "layer_idx", None)
        fn = _base_function(base, module)
        if cache is not None and layer_idx is not None:
            layer = cache.layers[layer_idx]
            if layer.has_pending_decode(key):
                scaling = kwargs["scaling"] if "scaling" in kwargs or not args else _bound_scaling(
                    fn, module, query, key, value, attention_mask, args, kwargs)
                return layer.kernel_decode(query, scaling), None
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    kvquant_attention.__name__ = f"{PREFIX}{base}_attention"
    return kvquant_attention


def _bound_scaling(fn: Callable, *call: Any) -> float | None:
    """The ``scaling`` a call of ``fn`` with positional arguments gets (None when it has none)."""
    module, query, key, value, mask, args, kwargs = call
    try:
        bound = inspect.signature(fn).bind(module, query, key, value, mask, *args, **kwargs)
    except TypeError:
        return kwargs.get("scaling")
    return bound.arguments.get("scaling")


def register(base: str) -> str:
    """Register ``"kvquant_<base>"`` (attention and mask functions); returns the name. Idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if base not in WRAPPABLE:
        raise ValueError(f"the triton cache backend wraps {WRAPPABLE} attention, not {base!r}")
    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(base))
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def current_implementation(model: torch.nn.Module) -> str | None:
    """``model.config._attn_implementation`` (of the text config for multimodal models)."""
    cfg = model.config
    return getattr(getattr(cfg, "text_config", None) or cfg, "_attn_implementation", None)


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name
    if current_implementation(model) != name:
        raise RuntimeError(f"could not switch {type(model).__name__} to attention {name!r} "
                           f"(it has {current_implementation(model)!r})")


def can_install(model: torch.nn.Module) -> bool:
    """Whether the model's attention can be wrapped (``sdpa``/``eager``, or already wrapped)."""
    impl = current_implementation(model) or ""
    return impl in WRAPPABLE or impl.startswith(PREFIX)


def install_kernel_attention(model: torch.nn.Module) -> str:
    """Switch ``model`` to the ``"kvquant_<base>"`` wrapper of its current attention; returns the name.

    Reversible with :func:`uninstall_kernel_attention`. Idempotent.
    """
    impl = current_implementation(model)
    if impl is not None and impl.startswith(PREFIX):
        return impl
    if impl not in WRAPPABLE:
        raise ValueError(f"the triton cache backend wraps {WRAPPABLE} attention; the model uses {impl!r} "
                         "(use backend='torch', or load the model with attn_implementation='sdpa')")
    name = register(impl)
    _set_implementation(model, name)
    setattr(model, _PREV_ATTR, impl)
    return name


def uninstall_kernel_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` back to the attention it had before :func:`install_kernel_attention`."""
    impl = current_implementation(model)
    if impl is None or not impl.startswith(PREFIX):
        return
    prev = getattr(model, _PREV_ATTR, None) or impl.removeprefix(PREFIX)
    _set_implementation(model, prev)


def is_installed(config: Any) -> bool:
    """Whether a (text) config runs a ``kvquant_*`` attention implementation."""
    impl = getattr(config, "_attn_implementation", None)
    return isinstance(impl, str) and impl.startswith(PREFIX)
