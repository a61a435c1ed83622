"""Pure-PyTorch references of the kernels (the "dequantize everything, then attend" path)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvquant.quant.rope import apply_rope as rotate_with
from kvquant.quant.store import QuantizedKVCache

Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def full_rope_tables(cos: torch.Tensor, sin: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max_pos, D]`` tables from ``[max_pos, D]`` or half tables ``[max_pos, D/2]`` (equal halves)."""
    if cos.shape[-1] == D // 2 and D % 2 == 0:
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    if cos.shape[-1] != D:
        raise ValueError(f"rope tables must have {D} or {D // 2} columns, got {cos.shape[-1]}")
    return cos, sin


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos_offset: torch.Tensor) -> torch.Tensor:
    """Rotate compact keys: token ``j`` of sequence ``b`` at position ``pos_offset[b] + j``.

    Args:
        k: ``[B, H, L, D]``; cos, sin: ``[max_pos, D]`` float32 tables (or ``[max_pos, D/2]`` half tables, see
            :func:`full_rope_tables`); pos_offset: ``[B]`` int.

    Returns:
        ``[B, H, L, D]`` float32 (positions past ``max_pos - 1`` are clamped; they only occur at padding).
    """
    L = k.shape[2]
    cos, sin = full_rope_tables(cos, sin, k.shape[-1])
    pos = pos_offset.to(k.device, torch.long)[:, None] + torch.arange(L, device=k.device)[None, :]
    pos = pos.clamp(0, cos.shape[0] - 1)
    return rotate_with(k.float(), cos.to(k.device)[pos], sin.to(k.device)[pos])  # tables gathered to [B, L, D]


def check_decode_inputs(q: torch.Tensor, key_cache: QuantizedKVCache, value_cache: QuantizedKVCache,
                        extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Refuse, with the reason, a query and cache pair (and extra token) that decode attention cannot take."""
    if key_cache.kind != "key" or value_cache.kind != "value":
        raise ValueError("pass the key cache then the value cache")
    key_cache.check_readable()  # NaN/Inf an append has not reported yet: an error, never attention over it
    value_cache.check_readable()
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    B, Hq, D = q.shape
    H = key_cache.num_heads
    if (key_cache.batch, key_cache.head_dim) != (B, D) or (value_cache.batch, value_cache.head_dim) != (B, D):
        raise ValueError(f"q {tuple(q.shape)} does not match the caches (B={key_cache.batch}, "
                         f"D={key_cache.head_dim})")
    if value_cache.num_heads != H or Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({H}, values {value_cache.num_heads})")
    if extra_kv is not None:
        ek, ev = extra_kv
        if ek.shape != (B, H, D) or ev.shape != (B, H, D):
            raise ValueError(f"extra_kv must be two [B, Hkv, D] = {(B, H, D)} tensors, got "
                             f"{tuple(ek.shape)}, {tuple(ev.shape)}")


def decode_attention_reference(
    q: torch.Tensor,
    key_cache: QuantizedKVCache,
    value_cache: QuantizedKVCache,
    softmax_scale: float | None = None,
    rope: Rope | None = None,
    compute_dtype: torch.dtype = torch.float32,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention by dequantizing the whole cache (what a dequantize-then-attend cache does).

    Args:
        q: ``[B, Hq, D]`` one query token per sequence; ``Hq`` a multiple of the caches' ``H``.
        key_cache, value_cache: the keys and values of the same sequences (same lengths).
        softmax_scale: default ``1/sqrt(D)``.
        rope: optional ``(cos [max_pos, D], sin [max_pos, D], pos_offset [B])``: keys are stored pre-RoPE and
            key token ``k`` of sequence ``b`` is rotated to position ``pos_offset[b] + k``.
        compute_dtype: dtype of the attention (float32 for a reference, float16 to mimic a fast path).
        extra_kv: optional ``(k, v)`` each ``[B, H, D]``: one more exact token per sequence (already rotated),
            attended after the cached tokens.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype``. A sequence with no token gives NaN.
    """
    B, Hq, D = q.shape
    H = key_cache.num_heads
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({H})")
    k, mask = key_cache.dequantize()
    v, _ = value_cache.dequantize()
    if rope is not None:
        cos, sin, pos_offset = rope
        k = apply_rope(k, cos, sin, pos_offset)
    if extra_kv is not None:
        ek, ev = extra_kv
        k = torch.cat([k.to(compute_dtype), ek.to(k.device, compute_dtype)[:, :, None]], 2)
        v = torch.cat([v.to(compute_dtype), ev.to(v.device, compute_dtype)[:, :, None]], 2)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    n_rep = Hq // H
    k = k.to(compute_dtype)
    v = v.to(compute_dtype)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(q.to(compute_dtype)[:, :, None], k, v, attn_mask=mask[:, None, None, :],
                                         scale=scale)
    return out[:, :, 0].to(q.dtype)
