"""Masked quantile statistics: outlier thresholds and per-channel ranges."""

from __future__ import annotations

import numpy as np
import torch


def masked_quantile_pair(
    x: torch.Tensor, mask: torch.Tensor | None, q_lo: float, q_hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two quantiles along the last axis, counting only entries where ``mask`` is True.

    Linear interpolation between order statistics (``torch.quantile``'s default). Rows with no valid
    entry give NaN. Tail quantiles (a few percent, the outlier thresholds) select their two order
    statistics with ``torch.topk`` instead of a full sort; the result is bit-identical (the same order
    statistics, the same float32 interpolation).

    Args:
        x: ``[..., N]`` float.
        mask: ``[..., N]`` bool broadcastable to ``x``, or None (all valid).

    Returns:
        ``(lo, hi)``, each ``[...]`` float32.
    """
    n_all = x.shape[-1]
    # Upper bounds (with a margin for float32 rounding) of how far from each end the order statistics lie.
    k_lo = min(n_all, int(q_lo * max(n_all - 1, 0)) + 3)
    k_hi = min(n_all, int((1.0 - q_hi) * max(n_all - 1, 0)) + 3)
    if n_all >= 64 and 0.0 <= q_lo <= q_hi <= 1.0 and 8 * max(k_lo, k_hi) <= n_all:
        return _quantile_pair_topk(x, mask, q_lo, q_hi, k_lo, k_hi)
    return _quantile_pair_sort(x, mask, q_lo, q_hi)


def quantile_position(n: int, q: float) -> tuple[int, int, float]:
    """Where quantile ``q`` of ``n >= 1`` sorted values lies: order statistics ``i0 <= i1`` and the weight
    ``frac`` of the second (``torch.quantile``'s linear rule, worked out in float32 as it does)."""
    pos = max(np.float32(q) * np.float32(n - 1), np.float32(0.0))
    i0 = int(np.floor(pos))
    return i0, min(i0 + 1, n - 1), float(pos - np.float32(i0))


def _interpolate(n: torch.Tensor | int, q: float, pick) -> torch.Tensor:
    """Quantile ``q`` of rows holding ``n`` valid entries; ``pick(i)`` gives order statistic ``i`` (float32).

    ``n`` is a ``[...]`` tensor, or an int when every row is full (no mask): the position is then worked out on
    the host, in the same float32 arithmetic (bit-identical), which saves a dozen small device ops per call."""
    if isinstance(n, int):
        if n == 0:
            return pick(0) * float("nan")
        i0, i1, frac = quantile_position(n, q)
        v0, v1 = pick(i0), pick(i1)
        return v0 + (v1 - v0) * frac
    pos = (q * (n - 1)).clamp_min(0)
    i0 = pos.floor().long()
    i1 = torch.minimum(i0 + 1, (n - 1).clamp_min(0).long())
    frac = pos - i0.float()
    v0, v1 = pick(i0), pick(i1)
    val = v0 + (v1 - v0) * frac
    return torch.where(n > 0, val, torch.full_like(val, float("nan")))


def _quantile_pair_sort(
    x: torch.Tensor, mask: torch.Tensor | None, q_lo: float, q_hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_quantile_pair` by a full sort (the reference)."""
    x = x.float()
    n: torch.Tensor | int
    if mask is None:
        xs, _ = torch.sort(x, dim=-1)
        n = x.shape[-1]
    else:
        mask = mask.expand_as(x)
        xs, _ = torch.sort(x.masked_fill(~mask, float("inf")), dim=-1)  # valid entries first
        n = mask.sum(-1).float()

    def pick(i: torch.Tensor | int) -> torch.Tensor:
        if isinstance(i, int):
            return xs[..., i]
        return xs.gather(-1, i.unsqueeze(-1)).squeeze(-1)

    return _interpolate(n, q_lo, pick), _interpolate(n, q_hi, pick)


def _quantile_pair_topk(
    x: torch.Tensor, mask: torch.Tensor | None, q_lo: float, q_hi: float, k_lo: int, k_hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_quantile_pair` from the ``k_lo`` smallest and ``k_hi`` largest entries of each row."""
    n: torch.Tensor | int
    if mask is None:
        n = x.shape[-1]
        low_src = high_src = x
    else:
        mask = mask.expand_as(x)
        n = mask.sum(-1).float()
        low_src = x.masked_fill(~mask, float("inf"))  # invalid entries sort last
        high_src = x.masked_fill(~mask, float("-inf"))
    small = torch.topk(low_src, k_lo, dim=-1, largest=False, sorted=True).values.float()  # ascending
    large = torch.topk(high_src, k_hi, dim=-1, largest=True, sorted=True).values.float()  # descending
    n_long = n if isinstance(n, int) else n.long()

    def pick_small(i: torch.Tensor | int) -> torch.Tensor:
        if isinstance(i, int):
            return small[..., min(i, k_lo - 1)]
        return small.gather(-1, i.clamp_max(k_lo - 1).unsqueeze(-1)).squeeze(-1)

    def pick_large(i: torch.Tensor | int) -> torch.Tensor:  # ascending statistic i = descending n - 1 - i
        if isinstance(i, int):
            return large[..., min(max(n_long - 1 - i, 0), k_hi - 1)]
        r = (n_long - 1 - i).clamp(0, k_hi - 1)
        return large.gather(-1, r.unsqueeze(-1)).squeeze(-1)

    return _interpolate(n, q_lo, pick_small), _interpolate(n, q_hi, pick_large)


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
