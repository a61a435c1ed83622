"""The kernels a cache runs, as one object: :class:`TorchOps` (the PyTorch reference) or :class:`TritonOps`.

:func:`resolve_ops` holds the one rule that picks them (``torch`` always works; ``triton`` says why it cannot;
``auto`` picks Triton on CUDA when nothing stops it). :class:`~kvquant.cache.hf_cache.KVQuantCache` calls it once
when it is built and hands the result to its layers (decode attention, un-rotation of incoming keys) and to every
:class:`~kvquant.quant.store.QuantizedKVCache` it makes (quantized writes). A store built on its own resolves its
ops once, in its constructor, through :func:`store_ops` (installed in :mod:`kvquant.quant.backend` when this module
is imported). Both objects write byte-identical storage.

Methods (the same on both):

* ``write_keys(store, seq, pos, tokens, nonfinite=None, static=False)``: quantize keys ``tokens [N, H, D]`` into
  ``store`` as quantized token ``pos[i]`` of sequence ``seq[i]`` (pages reserved by the caller; an ``fp16`` store
  copies them). ``nonfinite``: a ``[1]`` float32 flag turned NaN when the tokens hold NaN/Inf (no sync).
  ``static``: a captured decode step (capacity reserved ahead, counts on the device);
* ``write_value_pages(store, page, page_tokens)``: quantize whole pages of values ``[n, H, T, D]`` into pages
  ``page [n]``;
* ``seal_open_pages(store)``: a static decode step's seal of the open value pages it fills;
* ``decode_attention(q, kstore, vstore, softmax_scale=None, rope=None, extra_kv=None)``: one query token per
  sequence over a key/value store pair;
* ``invert_rope(keys, cos, sin)``: pre-RoPE keys (in the keys' dtype) from post-RoPE ones;
* ``read_past(store, mask, out, rope=None)``: a multi-token step's past, every stored token written at the real
  positions of ``mask [B, S]`` into ``out [B, H, S, D]`` (rotated by ``rope = (cos, sin) [B, S, D]``);
* ``write_problem(store)`` / ``decode_problem(q, kstore, vstore, rope)``: why these ops cannot serve a store or a
  decode step (``None`` if they can).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch

from kvquant.config import BACKENDS
from kvquant.kernels.reference import Rope, check_decode_inputs, decode_attention_reference
from kvquant.quant import backend as _backend
from kvquant.quant import read as _read
from kvquant.quant import write as _write
from kvquant.quant.rope import invert_rope


class TorchOps:
    """The PyTorch reference of every kernel (dequantize the past, then attend)."""

    name = "torch"

    def write_keys(self, store: Any, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
                   nonfinite: torch.Tensor | None = None, static: bool = False) -> None:
        _write.write_key_tokens(store, seq, pos.clone() if static else pos, tokens)
        if nonfinite is not None:
            nonfinite += (tokens - tokens).sum()

    def write_value_pages(self, store: Any, page: torch.Tensor, page_tokens: torch.Tensor) -> None:
        _write.write_value_pages(store, page, page_tokens)

    def seal_open_pages(self, store: Any) -> None:
        _write.seal_open_pages(store)

    def decode_attention(self, q: torch.Tensor, kstore: Any, vstore: Any, softmax_scale: float | None = None,
                         rope: Rope | None = None, extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> torch.Tensor:
        check_decode_inputs(q, kstore, vstore, extra_kv)
        return decode_attention_reference(q, kstore, vstore, softmax_scale, rope, extra_kv=extra_kv)

    def invert_rope(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return invert_rope(keys, cos, sin).to(keys.dtype)

    def read_past(self, store: Any, mask: torch.Tensor, out: torch.Tensor,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        _read.read_past(store, mask, out, rope)

    def write_problem(self, store: Any) -> str | None:
        return None

    def decode_problem(self, q: torch.Tensor, kstore: Any, vstore: Any, rope: Rope | None = None) -> str | None:
        return None

    def __repr__(self) -> str:
        return "TorchOps()"


@contextlib.contextmanager
def on_device(device: torch.device | str) -> Iterator[None]:
    """Run the enclosed kernel launches on ``device``: Triton launches on the *current* CUDA device, so a layer whose
    tensors are on ``cuda:1`` (``device_map="auto"``) must make ``cuda:1`` current. Nothing off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


class TritonOps:
    """The Triton kernels: quantizing writers, decode attention over the packed cache, RoPE inversion.

    Every launch runs under :func:`on_device` of the tensors it reads (the one place the device is set)."""

    name = "triton"

    def __init__(self) -> None:
        # the modules, not their functions: a function patched on its module (profiling, tests) is the one called
        self._enc = importlib.import_module("kvquant.kernels.encode")
        self._da = importlib.import_module("kvquant.kernels.decode_attention")
        self._unrope = importlib.import_module("kvquant.kernels.unrope")
        self._read = importlib.import_module("kvquant.kernels.read_past")

    def write_keys(self, store: Any, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
                   nonfinite: torch.Tensor | None = None, static: bool = False) -> None:
        with on_device(store.device):
            self._enc.write_keys(store, seq, pos, tokens, nonfinite=nonfinite, static=static)

    def write_value_pages(self, store: Any, page: torch.Tensor, page_tokens: torch.Tensor) -> None:
        with on_device(store.device):
            self._enc.write_value_pages(store, page, page_tokens)

    def seal_open_pages(self, store: Any) -> None:
        with on_device(store.device):
            self._enc.seal_open_pages(store)

    def decode_attention(self, q: torch.Tensor, kstore: Any, vstore: Any, softmax_scale: float | None = None,
                         rope: Rope | None = None, extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> torch.Tensor:
        with on_device(q.device):
            return self._da.decode_attention(q, kstore, vstore, softmax_scale=softmax_scale, rope=rope,
                                             extra_kv=extra_kv)

    def invert_rope(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        with on_device(keys.device):
            return self._unrope.invert_rope_triton(keys, cos, sin)

    def read_past(self, store: Any, mask: torch.Tensor, out: torch.Tensor,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if self._read.unsupported_reason(store):  # (a rotated store: the reference rotates it back)
            _read.read_past(store, mask, out, rope)
            return
        with on_device(store.device):
            self._read.read_past(store, mask, out, rope)

    def write_problem(self, store: Any) -> str | None:
        return self._enc.unsupported_reason(store)

    def decode_problem(self, q: torch.Tensor, kstore: Any, vstore: Any, rope: Rope | None = None) -> str | None:
        return self._da.unsupported_reason(q, kstore, vstore, rope)

    def __repr__(self) -> str:
        return "TritonOps()"


TORCH = TorchOps()
_TRITON: TritonOps | None = None


def resolve_ops(requested: str, device: torch.device | str, problems: list[str]) -> TorchOps | TritonOps:
    """The one rule every kvquant component's backend comes from.

    Args:
        requested: ``"torch"`` (the reference, always possible), ``"triton"`` (an error naming the problems if it
            cannot run) or ``"auto"`` (triton on CUDA when nothing stops it, else torch).
        device: where the data lives (``auto`` runs the kernels only on CUDA; elsewhere they would run under the
            interpreter).
        problems: reasons the caller's Triton path cannot run here (empty if it can); triton failing to import is
            added here.

    Returns:
        :data:`TORCH` or the (shared) :class:`TritonOps`.
    """
    global _TRITON
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return TORCH
    from kvquant.kernels._triton import TRITON_IMPORT_ERROR, triton_available

    if not triton_available():
        problems = [f"triton does not import ({TRITON_IMPORT_ERROR})", *problems]
    if requested == "triton" and problems:
        raise ValueError("backend='triton' is not possible: " + "; ".join(problems))
    if requested == "auto" and (torch.device(device).type != "cuda" or problems):
        return TORCH
    if _TRITON is None:
        _TRITON = TritonOps()
    return _TRITON


def store_ops(store: Any, ops: TorchOps | TritonOps | None = None) -> TorchOps | TritonOps:
    """The ops ``store`` writes with (called once, by its constructor).

    An ``fp16`` store is a copy: torch. Otherwise ``ops`` (the cache's), or when ``None`` the ops
    :func:`resolve_ops` gives for ``store.config.backend`` on the store's device. When those are Triton ops whose
    quantize kernel cannot write this store (head size, dtype, page size), ``backend="auto"`` falls back to torch
    and ``backend="triton"`` is an error naming the reason.
    """
    if not store.quantized:
        return TORCH
    requested = store.config.backend
    if ops is None:
        ops = resolve_ops(requested, store.device, [])
    reason = ops.write_problem(store)
    if reason is None:
        return ops
    if requested == "triton":
        raise ValueError(f"backend='triton' is not possible: {reason}")
    return TORCH


_backend.provide_store_ops(store_ops)
