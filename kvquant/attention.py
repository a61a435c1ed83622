"""Attention over a quantized KV cache: batched prefill that quantizes once, then incremental decode."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvquant.config import QuantConfig
from kvquant.quant.quantizer import BatchedKVQuantizer
from kvquant.quant.store import QuantizedKVCache
from kvquant.quant.validate import check_kv, check_mask


def repeat_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * n_rep, S, D]`` (grouped-query attention)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Reference attention in float32.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``.
        allowed: ``[B, Sq, Sk]`` bool; every query row must allow at least one key.

    Returns:
        ``[B, Hq, Sq, D]`` in ``q.dtype``.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    n_rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = F.scaled_dot_product_attention(
        q.float(), repeat_kv_heads(k, n_rep).float(), repeat_kv_heads(v, n_rep).float(),
        attn_mask=allowed[:, None], scale=scale,
    )
    return out.to(q.dtype)


class PrefillQuantizedAttention(torch.nn.Module):
    """Attention layer state for batched inference with a quantized KV cache.

    ``prefill`` quantizes the prompt's K/V once (vectorised over the padded batch) and attends;
    ``decode`` appends one token per sequence (nothing in the past is re-quantized) and attends over the
    cache.

    Args:
        config: quantization settings (or pass a ready ``quantizer``).
        softmax_scale: default ``1/sqrt(D)``.
        attend_quantized: in prefill, attend over the dequantized K/V instead of the exact ones (what
            every later token sees; useful for evaluation).
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        quantizer: BatchedKVQuantizer | None = None,
        softmax_scale: float | None = None,
        attend_quantized: bool = False,
    ) -> None:
        super().__init__()
        self.quantizer = quantizer or BatchedKVQuantizer(config or QuantConfig())
        self.softmax_scale = softmax_scale
        self.attend_quantized = attend_quantized
        self.keys: QuantizedKVCache | None = None
        self.values: QuantizedKVCache | None = None

    def reset(self) -> None:
        self.keys = self.values = None

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention over a padded prompt batch and quantization of its K/V.

        Args:
            q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, S, D]``; attention_mask: ``[B, S]`` (1 = real).

        Returns:
            ``[B, Hq, S, D]``; rows at padding positions are zero.
        """
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_kv(t, name)
        if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
        B, _, S, _ = q.shape
        mask = check_mask(attention_mask, B, S, q.device)
        self.keys = self.quantizer.quantize_keys(k, mask)
        self.values = self.quantizer.quantize_values(v, mask)
        if self.attend_quantized:
            k, v = self.keys.dequantize_aligned(mask), self.values.dequantize_aligned(mask)
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        allowed = causal[None] & mask[:, None, :]
        allowed |= torch.eye(S, dtype=torch.bool, device=q.device)[None] & ~mask[:, :, None]  # padding rows
        out = masked_attention(q, k, v, allowed, self.softmax_scale)
        return out * mask[:, None, :, None].to(out.dtype)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: append its K/V, attend over everything cached.

        Args:
            q: ``[B, Hq, 1, D]``; k, v: ``[B, Hkv, 1, D]``.

        Returns:
            ``[B, Hq, 1, D]``.
        """
        if self.keys is None or self.values is None:
            raise RuntimeError("decode() called before prefill()")
        check_kv(q, "q")
        if q.shape[2] != 1:
            raise ValueError(f"decode takes one query token per sequence, got {q.shape[2]}")
        self.keys.append(k)
        self.values.append(v)
        kd, mask = self.keys.dequantize()
        vd, _ = self.values.dequantize()
        return masked_attention(q, kd, vd, mask[:, None, :], self.softmax_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``prefill`` on the first call, ``decode`` afterwards."""
        if self.keys is None:
            return self.prefill(q, k, v, attention_mask)
        return self.decode(q, k, v)
