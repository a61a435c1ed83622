"""Rotary position embedding helpers for pre-RoPE key quantization.

Keys reach the cache after the rotary embedding. KVQuant quantizes them *before* it (per-channel
structure is much cleaner there), so the cache un-rotates incoming keys with the exact ``cos``/``sin``
the model used and re-rotates stored keys when they are read.
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


class RotaryTables:
    """``cos``/``sin`` for arbitrary positions, computed by the model's own rotary module.

    Args:
        rotary_emb: the model's rotary embedding module (``model.model.rotary_emb`` for Llama, Mistral,
            Qwen2, ...), called as ``rotary_emb(x, position_ids) -> (cos, sin)``.
    """

    def __init__(self, rotary_emb: torch.nn.Module) -> None:
        self.rotary_emb = rotary_emb

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [B, S]`` -> ``(cos, sin)`` each ``[B, S, D]`` float32."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        cos, sin = self.rotary_emb(probe, position_ids)
        return cos.float(), sin.float()


def find_rotary_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model-level rotary module (``rotary_emb`` on the decoder), or None if there is none."""
    base = getattr(model, "model", model)
    for owner in (base, model, getattr(base, "language_model", None)):
        if owner is not None and isinstance(getattr(owner, "rotary_emb", None), torch.nn.Module):
            return owner.rotary_emb
    return None
