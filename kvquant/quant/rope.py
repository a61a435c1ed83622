"""The rotary position embedding on tensors, for pre-RoPE key quantization.

Keys reach the cache after the rotary embedding. KVQuant quantizes them *before* it (per-channel
structure is much cleaner there), so the cache un-rotates incoming keys with the exact ``cos``/``sin``
the model used (:func:`invert_rope`) and re-rotates stored keys when they are read (:func:`apply_rope`).
Finding the model's rotary module and its tables is :mod:`kvquant.cache.rope`'s job.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's convention: ``[x1, x2] -> [-x2, x1]`` over the two halves of the last axis."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` rotated by ``cos, sin [B, S, D]``, computed in float32, returned in ``x.dtype``."""
    xf = x.float()
    c, s = cos.float()[:, None], sin.float()[:, None]
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope`, also for scaled RoPE (``cos^2 + sin^2 != 1``). float32 out."""
    xf = x.float()
    c, s = cos.float()[:, None], sin.float()[:, None]
    return (xf * c - rotate_half(xf) * s) / (c * c + s * s)
