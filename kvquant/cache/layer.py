"""``KVQuantLayer``: one decoder layer's quantized keys and values inside a
:class:`~kvquant.cache.hf_cache.KVQuantCache` (the ``transformers`` cache-layer API).

A prefill is quantized in one vectorised pass over the padded batch; later steps append to the layer's two
:class:`~kvquant.quant.store.QuantizedKVCache` stores. ``update`` returns the exact K/V during a prefill and
afterwards the dequantized past followed by the exact new tokens, laid out to match the model's padded attention
mask; on the Triton backend a single-token decode step is held back instead and attended by :meth:`kernel_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvquant.quant.store import QuantizedKVCache

if TYPE_CHECKING:
    from kvquant.cache.hf_cache import KVQuantCache


@dataclass
class _PendingDecode:
    """A decode token held back by ``update`` until the kernel attention has read the past."""

    key: torch.Tensor  # [B, Hkv, 1, D] as the model made it (post-RoPE): attended exactly
    value: torch.Tensor  # [B, Hkv, 1, D]
    key_store: torch.Tensor  # [B, Hkv, 1, D] what is stored (pre-RoPE when the cache un-rotates)


class KVQuantLayer(CacheLayerMixin):
    """One decoder layer's quantized keys and values."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: KVQuantCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.qkeys: QuantizedKVCache | None = None
        self.qvalues: QuantizedKVCache | None = None
        self.cumulative_length = 0
        self.seen_mask: torch.Tensor | None = None  # [B, cumulative_length] bool, padding = False
        self.pos_offset: torch.Tensor | None = None  # [B] position of each sequence's first real token
        self._pos_offset_i32: torch.Tensor | None = None
        self._pending: _PendingDecode | None = None
        self.static_from: tuple[int, int] | None = None  # (cumulative length, stored tokens) when static mode began

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # -- the cache API ----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states``/``value_states [B, H_kv, s, D]`` (post-RoPE, as the model made them) and
        return the K/V attention must use, ``[B, H_kv, past + s, D]``."""
        if self._pending is not None:
            raise RuntimeError(f"layer {self.layer_idx}: the previous decode token was never attended (the model's "
                               "attention implementation is no longer the kvquant wrapper?)")
        B, _, s, _ = key_states.shape
        self.owner._checkpoint(self, s)  # undone if this forward fails in any layer
        step_mask, positions = self.owner._step_inputs(B, s, self.cumulative_length, key_states.device)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pre_rope = self.owner.pre_rope
        k_store = key_states
        if pre_rope:
            cos, sin = self.owner._step_rotary(B, s, self.cumulative_length, positions)
            k_store = self.owner.ops.invert_rope(key_states, cos, sin)  # triton: one launch instead of ~8, same bits

        if self.qkeys is not None and self.owner._kernel_step(self, s):
            # triton backend, one real token per sequence: keep it pending, the attention wrapper runs the
            # kernel over the stored past plus this exact token, then appends it (kernel_decode)
            self._pending = _PendingDecode(key_states, value_states, k_store)
            if not self.owner.static:  # (static steps never read it; end_static extends it)
                self.seen_mask = torch.cat([self.seen_mask, step_mask], 1)
            self.cumulative_length += s
            return key_states, value_states

        if self.qkeys is None:  # prefill: quantize the whole padded batch at once (a row of padding only: refused)
            # this layer's calibration on its own device, for the heads it receives (tensor parallelism: a slice)
            quantizer = self.owner.quantizer_for(self.layer_idx, key_states.device, key_states.shape[1])
            self.qkeys = quantizer.quantize_keys(k_store, step_mask)
            self.qvalues = quantizer.quantize_values(value_states, step_mask, hold_tokens=self.qkeys.hold_tokens)
            if self.owner.reserve_tokens:  # the decode budget, allocated once and exactly
                self.qkeys.reserve(self.owner.reserve_tokens)
                self.qvalues.reserve(self.owner.reserve_tokens)
            first = step_mask.long().argmax(1)
            self.pos_offset = positions.gather(1, first[:, None]).squeeze(1)
            self._pos_offset_i32 = self.pos_offset.to(torch.int32)  # what the kernel reads, converted once
            out_k, out_v = key_states, value_states
        else:
            past_mask = self.seen_mask
            out_k, out_v = self._read_past(key_states, value_states, past_mask)
            self.owner._check_step_positions(self, step_mask, positions)
            self.qkeys.append(k_store, step_mask)
            self.qvalues.append(value_states, step_mask)
        self.seen_mask = step_mask if self.seen_mask is None else torch.cat([self.seen_mask, step_mask], 1)
        self.cumulative_length += s
        return out_k, out_v

    def _read_past(self, key_states: torch.Tensor, value_states: torch.Tensor, past_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[past | new]`` keys and values ``[B, H_kv, past + s, D]`` in the model's dtype for a multi-token step:
        the stored past read straight into the output by the cache's ops (keys re-rotated; the Triton backend in one
        launch per store, the torch reference a group of heads at a time, see :func:`kvquant.quant.read.read_past`)."""
        B, H, s, D = key_states.shape
        Lp = past_mask.shape[1]
        mask = past_mask  # (the layer's own record of the stored tokens: [B, Lp] bool, row b with lengths[b] real)
        out_k = key_states.new_empty(B, H, Lp + s, D)
        out_v = value_states.new_empty(B, H, Lp + s, D)
        rope = self.owner._past_rotary(mask, self.pos_offset) if self.owner.pre_rope else None
        ops = self.owner.ops
        ops.read_past(self.qkeys, mask, out_k[:, :, :Lp], rope)
        ops.read_past(self.qvalues, mask, out_v[:, :, :Lp])
        out_k[:, :, Lp:] = key_states
        out_v[:, :, Lp:] = value_states
        return out_k, out_v

    def checkpoint(self, tokens: int) -> tuple:
        """This layer's state before an update of ``tokens`` tokens per sequence (see :meth:`restore`)."""
        stores = None if self.qkeys is None else (self.qkeys.checkpoint(tokens), self.qvalues.checkpoint(tokens))
        return (self.cumulative_length, self.seen_mask, self.pos_offset, self._pos_offset_i32, self.is_initialized,
                self.qkeys, self.qvalues, stores)

    def restore(self, ck: tuple) -> None:
        """Back to a :meth:`checkpoint` of this layer (a forward that failed after writing here)."""
        (self.cumulative_length, self.seen_mask, self.pos_offset, self._pos_offset_i32, self.is_initialized,
         self.qkeys, self.qvalues, stores) = ck
        if stores is not None:
            self.qkeys.restore(stores[0])
            self.qvalues.restore(stores[1])
        self._pending = None

    def has_pending_decode(self, key: torch.Tensor) -> bool:
        """Whether ``key`` is the token ``update`` just held back for :meth:`kernel_decode`."""
        return self._pending is not None and self._pending.key is key

    def kernel_decode(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of the pending decode step with the Triton kernel, then append the pending token.

        Args:
            query: ``[B, Hq, 1, D]`` (already rotated); scaling: the softmax scale (``None``: ``1/sqrt(D)``).

        Returns:
            ``[B, 1, Hq, D]`` (transformers' attention-output layout), softmax over ``[past, new token]``.
        """
        pend = self._pending
        if pend is None:
            raise RuntimeError(f"layer {self.layer_idx}: no pending decode token")
        self._pending = None
        if query.shape[2] != 1:
            raise ValueError(f"kernel decode needs one query token per sequence, got {query.shape[2]}")
        rope = None
        if self.owner.pre_rope:
            cos, sin = self.owner.kernel_rope_tables(query.device)
            rope = (cos, sin, self._pos_offset_i32)
        out = self.owner.ops.decode_attention(query[:, :, 0], self.qkeys, self.qvalues, softmax_scale=scaling,
                                              rope=rope, extra_kv=(pend.key[:, :, 0], pend.value[:, :, 0]))
        # the step's tokens are all real (_kernel_step checked the mask once per step): no mask, no device sync
        self.qkeys.append(pend.key_store)
        self.qvalues.append(pend.value)
        return out[:, None]

    def get_seq_length(self, *args: Any) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.cumulative_length + q, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.5x name
        return -1

    def reset(self) -> None:
        self._pending = None
        self.qkeys = self.qvalues = None
        self.seen_mask = self.pos_offset = None
        self.cumulative_length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (pages are copied, never shared)."""
        if self.qkeys is None:
            return
        idx = beam_idx.to(self.qkeys.device)
        self.qkeys, self.qvalues = self.qkeys.select(idx), self.qvalues.select(idx)
        self.seen_mask, self.pos_offset = self.seen_mask[idx], self.pos_offset[idx]
        self._pos_offset_i32 = self.pos_offset.to(torch.int32)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.qkeys is not None:
            self.reorder_cache(torch.arange(self.qkeys.batch, device=self.qkeys.device).repeat_interleave(repeats))

    def offload(self) -> None:  # quantized storage stays where it is
        return None

    def prefetch(self) -> None:
        return None

    def memory_report(self) -> dict[str, float]:
        if self.qkeys is None:
            return {}
        rk, rv = self.qkeys.memory_report(), self.qvalues.memory_report()
        return {f"key_{k}": v for k, v in rk.items()} | {f"value_{k}": v for k, v in rv.items()}

    def buffers(self) -> list[torch.Tensor]:
        """The layer's own tensors besides its stores: the padding mask ``[B, S]``, position offsets ``[B]`` and the
        channel rotation ``[D, D]`` its stores read back with (one tensor per device shared by every layer: counted
        once by :meth:`KVQuantCache.memory_report`)."""
        rot = None if self.qkeys is None else self.qkeys.rotation
        return [t for t in (self.seen_mask, self.pos_offset, self._pos_offset_i32, rot) if t is not None]
