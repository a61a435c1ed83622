"""The model side of pre-RoPE key quantization: a model's rotary module and the ``cos``/``sin`` it gives.

The math on tensors (rotate, un-rotate) is :mod:`kvquant.quant.rope`.
"""

from __future__ import annotations

import torch


class RotaryTables:
    """``cos``/``sin`` for arbitrary positions, computed by the model's own rotary module.

    Args:
        rotary_emb: the model's rotary embedding module (``model.model.rotary_emb`` for Llama, Mistral,
            Qwen2, ...), called as ``rotary_emb(x, position_ids) -> (cos, sin)``.
    """

    def __init__(self, rotary_emb: torch.nn.Module) -> None:
        self.rotary_emb = rotary_emb

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [B, S]`` -> ``(cos, sin)`` each ``[B, S, D]`` float32, on ``position_ids``' device."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        cos, sin = self.rotary_emb(probe, position_ids)
        # (under device_map the rotary module may run on another GPU than the layer asking: its tables go there)
        return cos.to(position_ids.device, torch.float32), sin.to(position_ids.device, torch.float32)


def find_rotary_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model-level rotary module (``rotary_emb`` on the decoder), or None if there is none."""
    base = getattr(model, "model", model)
    for owner in (base, model, getattr(base, "language_model", None)):
        if owner is not None and isinstance(getattr(owner, "rotary_emb", None), torch.nn.Module):
            return owner.rotary_emb
    return None
