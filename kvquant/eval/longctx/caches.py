"""The caches a long-context run compares, by name.

* ``fp16``: transformers' ``DynamicCache`` in the model's dtype (the reference);
* ``nuq2|3|4``, ``int2|3|4``, ``k<K>v<V>``, ``int-k<K>v<V>``, ``nuq-alloc``:
  :class:`~kvquant.cache.hf_cache.KVQuantCache` with that datatype (:mod:`kvquant.datatypes`; calibrated when a
  calibration is given);
* ``quanto2|4[k]``, ``hqq2|4``: transformers' KIVI-style ``QuantizedCache`` (:mod:`kvquant.eval.baselines`;
  ``quanto4k``/``quanto2k`` group keys per channel, as KIVI does);
* ``PRESS@DATATYPE`` (``snapkv@nuq3``) or ``PRESS:RATIO`` (``knorm:0.75``): KV eviction by a ``kvpress`` press
  (SnapKV, expected attention, knorm, ...) over a ``DynamicCache``. ``@DATATYPE`` evicts down to the bytes of that
  kvquant cache: compression ratio ``1 - bits/16``, with ``bits`` the kvquant cache's measured bits per element
  (kept tokens stored in 16 bits, as a deployment would). The press compresses the context when it is prefilled;
  the question and the answer are kept, as in kvpress's own pipeline.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.config import QuantConfig
from kvquant.datatypes import DATATYPE_HELP, parse_datatype
from kvquant.eval.baselines import (
    baseline_available,
    baseline_memory,
    make_baseline_cache,
    parse_baseline,
    tensor_bytes,
)
from kvquant.quant.calibration_file import Calibration


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache name.

    Attributes:
        name: as given (``"nuq3"``, ``"snapkv@nuq3"``).
        kind: ``"dynamic"``, ``"kvquant"``, ``"baseline"`` or ``"press"``.
        press: the kvpress press name (``"snapkv"``), for ``kind == "press"``.
        match: the kvquant datatype whose memory the press matches (``"nuq3"``), or ``None``.
        ratio: the press's fixed compression ratio, or ``None``.
    """

    name: str
    kind: str
    press: str | None = None
    match: str | None = None
    ratio: float | None = None


def parse_cache(name: str) -> CacheSpec:
    """Parse one cache name (see the module docstring).

    Raises:
        ValueError: an unknown name, a bad ratio, or ``@`` naming no quantized kvquant datatype.
    """
    key = name.strip().lower()
    if key == "fp16":
        return CacheSpec(key, "dynamic")
    if _is_datatype(key):
        return CacheSpec(key, "kvquant")
    if parse_baseline(key) is not None:
        return CacheSpec(key, "baseline")
    for sep in ("@", ":"):
        if sep in key:
            press, _, arg = key.partition(sep)
            if not press:
                break
            if sep == "@":
                if not _is_datatype(arg) or arg == "fp16":
                    raise ValueError(f"cache {name!r}: {arg!r} after '@' must be a quantized datatype "
                                     f"({DATATYPE_HELP.removeprefix('fp16, ')})")
                return CacheSpec(key, "press", press=press, match=arg)
            try:
                ratio = float(arg)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"cache {name!r}: the ratio after ':' must be a number in [0, 1)")
            return CacheSpec(key, "press", press=press, ratio=ratio)
    kinds = DATATYPE_HELP.removeprefix("fp16, ")
    raise ValueError(f"unknown cache {name!r}: expected fp16, a kvquant datatype ({kinds}), a "
                     "baseline (quanto2, quanto4, quanto2k, quanto4k, hqq2, hqq4) or a kvpress press as PRESS@DATATYPE "
                     "or PRESS:RATIO (snapkv@nuq3, knorm:0.75)")


def _is_datatype(name: str) -> bool:
    try:
        parse_datatype(name)
    except ValueError:
        return False
    return True


def parse_caches(text: str) -> list[CacheSpec]:
    """Comma list of cache names, order kept, duplicates dropped."""
    specs = [parse_cache(n) for n in dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip())]
    if not specs:
        raise ValueError("no cache given")
    return specs


def cache_available(spec: CacheSpec) -> tuple[bool, str]:
    """Whether ``spec`` can run here, and why not (a missing package, an unknown press)."""
    if spec.kind == "baseline":
        return baseline_available(spec.name)
    if spec.kind == "press":
        if importlib.util.find_spec("kvpress") is None:
            return False, "kvpress is not installed (pip install kvquant[longctx])"
        try:
            press_class(spec.press or "")
        except (ImportError, ValueError) as exc:
            return False, str(exc)
    return True, ""


# ----------------------------------------------------------------------------------------------------
# building caches


def make_cache(spec: CacheSpec, model: torch.nn.Module, calibration: Calibration | None = None,
               base: QuantConfig | None = None, reserve_tokens: int = 0) -> Any:
    """A fresh cache for one batch (a ``DynamicCache`` for ``fp16`` and presses)."""
    if spec.kind == "kvquant":
        cfg = replace(base or QuantConfig(), datatype=spec.name)
        return KVQuantCache(model, cfg, calibration=calibration if cfg.is_quantized else None,
                            reserve_tokens=reserve_tokens)
    if spec.kind == "baseline":
        return make_baseline_cache(spec.name, model)
    from transformers import DynamicCache

    return DynamicCache()


def press_class(name: str) -> type:
    """The kvpress press class for ``name`` (``snapkv`` -> ``SnapKVPress``, ``expected_attention`` ->
    ``ExpectedAttentionPress``; case and underscores ignored).

    Raises:
        ImportError: kvpress is not installed.
        ValueError: no press of that name (the message lists them).
    """
    kvpress = importlib.import_module("kvpress")
    presses = {n.lower().removesuffix("press"): getattr(kvpress, n) for n in dir(kvpress)
               if n.endswith("Press") and isinstance(getattr(kvpress, n), type)}
    key = name.lower().replace("_", "").replace("-", "")
    if key not in presses:
        raise ValueError(f"kvpress has no press {name!r}; it has {', '.join(sorted(presses))}")
    return presses[key]


def ratio_for_bits(bits_per_element: float) -> float:
    """The compression ratio that keeps ``bits_per_element / 16`` of the tokens: equal bytes to a cache of that
    many bits per element, with the kept tokens in 16 bits."""
    return min(max(1.0 - bits_per_element / 16.0, 0.0), 0.99)


@contextlib.contextmanager
def apply_press(press: Any, model: torch.nn.Module) -> Iterator[None]:
    """Run ``press`` on every attention layer of ``model`` while the context is open, as kvpress's own
    ``with press(model):`` does, adapted to transformers versions that pass the cache as ``cache=`` and no
    ``cache_position`` (kvpress reads ``past_key_values`` and ``cache_position``). The press compresses the cache
    of a forward whose positions start at 0 (the prefill); later forwards are left alone.

    Shapes: the prefill must be one unpadded sequence (kvpress keeps the same number of tokens in every row).
    """
    press.post_init_from_model(model)
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        kw = dict(kwargs)
        if kw.get("past_key_values") is None:
            kw["past_key_values"] = kw.get("cache")
        if kw.get("cache_position") is None:
            positions = kw.get("position_ids")
            q_len = kw["hidden_states"].shape[1]
            kw["cache_position"] = positions[0] if positions is not None else torch.arange(q_len)
        return press.forward_hook(module, args, kw, output)

    rotary = getattr(base, "rotary_emb", None)
    handles = []
    try:
        for layer in base.layers:
            if rotary is not None and not hasattr(layer.self_attn, "rotary_emb"):
                layer.self_attn.rotary_emb = rotary  # presses that estimate future queries need it
            handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def make_press(spec: CacheSpec, ratio: float) -> Any:
    """The kvpress press of ``spec`` at compression ``ratio`` (fraction of context tokens evicted)."""
    return press_class(spec.press or "")(compression_ratio=ratio)


# ----------------------------------------------------------------------------------------------------
# memory


def dynamic_memory(cache: Any) -> dict[str, float]:
    """Bytes held by a ``DynamicCache`` (every layer's keys and values) and the number of cached elements."""
    held = elements = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                held += tensor_bytes(t)
                elements += t.numel()
    return {"total_bytes": held, "elements": elements}


def cache_memory(spec: CacheSpec, cache: Any, seen_elements: int) -> tuple[float, float]:
    """``(kv_bytes, bits_per_element)`` of a cache after a batch.

    ``seen_elements``: keys and values of every token the batch processed (``2 x layers x B x kv_heads x tokens x
    head_dim``), the denominator for eviction, whose cache holds fewer. A press's bits count its kept tokens at 16
    bits (:func:`ratio_for_bits`); ``kv_bytes`` is what the cache holds in the model's dtype.
    """
    if spec.kind == "kvquant":
        rep = cache.memory_report()
        return float(rep.get("total_bytes", 0.0)), float(rep.get("bits_per_element", float("nan")))
    if spec.kind == "baseline":
        rep = baseline_memory(cache)
        return float(rep.get("total_bytes", 0.0)), float(rep.get("bits_per_element", float("nan")))
    rep = dynamic_memory(cache)
    if spec.kind == "press":
        return rep["total_bytes"], 16.0 * rep["elements"] / seen_elements if seen_elements else float("nan")
    return rep["total_bytes"], 8.0 * rep["total_bytes"] / rep["elements"] if rep["elements"] else float("nan")
