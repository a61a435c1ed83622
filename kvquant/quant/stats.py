"""Masked quantile statistics: outlier thresholds and per-channel ranges."""

from __future__ import annotations

import torch


def masked_quantile_pair(
    x: torch.Tensor, mask: torch.Tensor | None, q_lo: float, q_hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two quantiles along the last axis, counting only entries where ``mask`` is True.

    Linear interpolation between order statistics (``torch.quantile``'s default). Rows with no valid
    entry give NaN.

    Args:
        x: ``[..., N]`` float.
        mask: ``[..., N]`` bool broadcastable to ``x``, or None (all valid).

    Returns:
        ``(lo, hi)``, each ``[...]`` float32.
    """
    x = x.float()
    if mask is None:
        xs, _ = torch.sort(x, dim=-1)
        n = torch.full(x.shape[:-1], x.shape[-1], device=x.device, dtype=torch.float32)
    else:
        mask = mask.expand_as(x)
        xs, _ = torch.sort(x.masked_fill(~mask, float("inf")), dim=-1)  # valid entries first
        n = mask.sum(-1).float()
    out = []
    for q in (q_lo, q_hi):
        pos = (q * (n - 1)).clamp_min(0)
        i0 = pos.floor().long()
        i1 = torch.minimum(i0 + 1, (n - 1).clamp_min(0).long())
        frac = pos - i0.float()
        v0 = xs.gather(-1, i0.unsqueeze(-1)).squeeze(-1)
        v1 = xs.gather(-1, i1.unsqueeze(-1)).squeeze(-1)
        val = v0 + (v1 - v0) * frac
        out.append(torch.where(n > 0, val, torch.full_like(val, float("nan"))))
    return out[0], out[1]


def channel_ranges(
    x: torch.Tensor, mask: torch.Tensor, outlier_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel dense range of keys, from the prompt itself.

    Args:
        x: ``[B, H, S, D]``.
        mask: ``[B, S]`` bool, the tokens that count (real, non-sink).

    Returns:
        ``(lo, hi)`` each ``[B, H, D]`` float32: the ``f/2`` and ``1-f/2`` quantiles over tokens (min and
        max when ``f == 0``). Rows with no counted token are NaN.
    """
    xt = x.transpose(-1, -2)  # [B, H, D, S]
    f = outlier_fraction
    return masked_quantile_pair(xt, mask[:, None, None, :], f / 2, 1 - f / 2)
