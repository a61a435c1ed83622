"""transformers' own ``QuantizedCache`` (quanto / HQQ backends) as a baseline, with measured memory.

``quanto4``, ``quanto2``, ``hqq4`` and ``hqq2`` name transformers' KIVI-style ``QuantizedCache``: uniform
quantization in groups of ``q_group_size`` (default 64) with a scale and zero per group, plus an
unquantized residual window of up to ``residual_length`` (default 128) recent tokens, with transformers'
defaults otherwise (what ``cache_implementation="quantized"`` gives). quanto's default ``axis_key=0`` groups
each *token's* channels, which a key channel with a large offset (e.g. from a ``k_proj`` bias) ruins;
``quanto4k`` / ``quanto2k`` set ``axis_key=-1``: keys grouped per channel, as KIVI does (HQQ's default axis
already does that for keys). Whether a backend
runs depends on its package (``optimum-quanto``, ``hqq``) being installed; :func:`baseline_available`
says so without raising.

Any prompt length and batch runs: the backends group the flattened tensor, so quanto raised unless batch × KV heads
× tokens was a multiple of the group size (``Group size (64) must be a divisor of (4140)``) and, when it was, a
per-channel group could straddle two heads or sequences. Every layer here quantizes its tokens padded to a multiple
of the group size (the last token repeated, so no range widens) and drops the padding when it dequantizes: per-channel
groups then hold 64 consecutive tokens of one head of one sequence, as KIVI's do, and a sequence quantizes the same
whatever else is in the batch. The padding is stored, and counted in the measured bytes.

Bits per element are *measured*: every tensor the cache's layers hold (packed codes, scales, zeros, the
residual window) is counted, unwrapping tensor subclasses such as quanto's ``QBitsTensor``.
"""

from __future__ import annotations

import importlib.util

import torch

BASELINES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def parse_baseline(name: str) -> tuple[str, int] | None:
    """``"quanto4"`` → ``("quanto", 4)`` (``"quanto4k"`` too); ``None`` for a name that is not a baseline."""
    for backend in BASELINES:
        rest = name[len(backend):]
        if backend == "quanto" and rest.endswith("k"):
            rest = rest[:-1]
        if name.startswith(backend) and rest.isdigit():
            return backend, int(rest)
    return None


def _per_channel_keys(name: str) -> bool:
    return name.startswith("quanto") and name.endswith("k")


def baseline_available(name: str) -> tuple[bool, str]:
    """Whether baseline ``name`` can run here, and why not."""
    parsed = parse_baseline(name)
    if parsed is None:
        return False, f"{name!r} is not a baseline (quanto2, quanto4, quanto2k, quanto4k, hqq2, hqq4)"
    backend, nbits = parsed
    if nbits not in (2, 4):
        return False, f"transformers' QuantizedCache supports 2 and 4 bits, not {nbits}"
    module = BASELINES[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        pip = {"quanto": "optimum-quanto", "hqq": "hqq"}[backend]
        return False, f"{module} is not installed (pip install {pip})"
    return True, ""


def make_baseline_cache(name: str, model: torch.nn.Module, residual_length: int | None = None):
    """A fresh transformers ``QuantizedCache`` for baseline ``name`` (e.g. ``"hqq4"``)."""
    ok, why = baseline_available(name)
    if not ok:
        raise ValueError(f"baseline {name}: {why}")
    backend, nbits = parse_baseline(name)  # type: ignore[misc]
    from transformers import QuantizedCache

    extra = {} if residual_length is None else {"residual_length": residual_length}
    if _per_channel_keys(name):
        extra["axis_key"] = -1
    try:
        cache = QuantizedCache(backend=backend, config=model.config, nbits=nbits, **extra)
    except TypeError:  # transformers 4.5x signature
        from transformers import QuantizedCacheConfig

        return QuantizedCache(QuantizedCacheConfig(backend=backend, nbits=nbits, **extra))
    for layer in getattr(cache, "layers", []):
        pad_tokens_to_groups(layer)
    return cache


def pad_tokens_to_groups(layer: object) -> None:
    """Make a ``QuantizedLayer`` quantize ``[B, H, S, D]`` tensors of any ``S`` (see the module docstring).

    Its ``_quantize`` gets the tokens padded to a multiple of ``q_group_size`` (last token repeated) and returns
    ``(quantized, {"shape": (B, H, S, D)})``; its ``_dequantize`` returns the first ``S`` tokens again.
    """
    quantize, dequantize = layer._quantize, layer._dequantize  # type: ignore[attr-defined]
    group = int(getattr(layer, "q_group_size", 64) or 64)

    def padded_quantize(tensor: torch.Tensor, axis: int):
        S = tensor.shape[-2]
        extra = -S % group
        if extra:
            tensor = torch.cat([tensor, tensor[..., -1:, :].expand(*tensor.shape[:-2], extra, tensor.shape[-1])],
                               dim=-2).contiguous()
        return quantize(tensor, axis=axis), {"shape": (*tensor.shape[:-2], S, tensor.shape[-1])}

    def padded_dequantize(stored):
        quantized, meta = stored
        return dequantize(quantized)[..., : meta["shape"][-2], :]

    layer._quantize = padded_quantize  # type: ignore[attr-defined]
    layer._dequantize = padded_dequantize  # type: ignore[attr-defined]


def tensor_bytes(obj: object, _seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` (tensors, tensor subclasses, tuples, lists, dicts).

    A tensor subclass that wraps inner tensors (``__tensor_flatten__``) counts its inner tensors; each
    storage is counted once.
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        if obj.numel() == 0:
            return 0
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    return 0


def baseline_memory(cache: object) -> dict[str, float]:
    """Bytes held by a transformers ``QuantizedCache`` and its bits per cached element.

    Returns ``{}`` when nothing is cached yet. ``elements`` counts keys and values of every cached token.
    """
    quantized = residual = elements = 0
    for layer in getattr(cache, "layers", []):
        if not getattr(layer, "is_initialized", False):
            continue
        seen: set[int] = set()
        quantized += tensor_bytes(getattr(layer, "_quantized_keys", None), seen)
        quantized += tensor_bytes(getattr(layer, "_quantized_values", None), seen)
        residual += tensor_bytes(getattr(layer, "keys", None), seen)
        residual += tensor_bytes(getattr(layer, "values", None), seen)
        keys = layer.keys
        B, H, D = (keys.shape[0], keys.shape[1], keys.shape[-1]) if keys.dim() == 4 else (0, 0, 0)
        if not B:  # residual empty: take the shape from the layer's dtype/config-free bookkeeping
            shape = _quantized_shape(getattr(layer, "_quantized_keys", None))
            if shape is None:
                continue
            B, H, D = shape[0], shape[1], shape[-1]
        elements += 2 * B * H * D * int(layer.cumulative_length)
    if not elements:
        return {}
    total = quantized + residual
    return {"quantized_bytes": quantized, "residual_bytes": residual, "total_bytes": total,
            "fp16_bytes": 2 * elements, "bits_per_element": 8 * total / elements}


def _quantized_shape(q: object) -> tuple[int, ...] | None:
    if isinstance(q, torch.Tensor):
        return tuple(q.shape)
    if isinstance(q, tuple) and len(q) == 2 and isinstance(q[1], dict) and "shape" in q[1]:
        return tuple(q[1]["shape"])
    return None
