"""Encoding tokens into codes + scales + outliers, and decoding them back (the PyTorch reference).

Keys are normalised per channel with ranges fixed at prefill (or calibration): a normalised value outside
``[-1, 1]`` is an outlier. Values are normalised per token and head; their outliers are per token over all heads:
the ``k`` smallest and the ``k`` largest of the token's ``H * D`` entries, ``k = round(f / 2 * H * D)``
(:func:`values_per_side`; fewer when equal values straddle a boundary). An outlier's dense code is the level
nearest zero, and its exact value goes to the sparse store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant.quant.codebook import Codebook

_EPS = 1e-6


@dataclass
class Encoded:
    """Result of encoding ``N`` tokens of ``H`` heads and ``D`` dims.

    Attributes:
        codes: ``[N, H, D]`` uint8.
        outliers: ``[N, H, D]`` bool, where the exact value must be kept.
        scale, zero: per token and head ``[N, H]`` (values only, else None), already rounded to the
            storage dtype so decoding reproduces exactly what is stored.
    """

    codes: torch.Tensor
    outliers: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


def range_to_scale_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine map of ``[lo, hi]`` onto ``[-1, 1]``: ``x_norm = (x - zero) / scale``."""
    return ((hi - lo) * 0.5).clamp_min(_EPS), (hi + lo) * 0.5


def encode_keys(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, codebook: Codebook, keep_outliers: bool
) -> Encoded:
    """Per-channel key encoding.

    Args:
        x: ``[N, H, D]`` keys. scale, zero: ``[N, H, D]`` (or broadcastable) float32 channel ranges.
        keep_outliers: if False, out-of-range values are clamped instead of kept exactly.
    """
    xn = torch.div(x.float() - zero, scale)
    codes = codebook.encode(xn)
    if not keep_outliers:
        return Encoded(codes, torch.zeros_like(codes, dtype=torch.bool))
    out = (xn < -1.0) | (xn > 1.0)
    codes = codes.masked_fill(out, codebook.zero_code)
    return Encoded(codes, out)


def values_per_side(outlier_fraction: float, n: int) -> int:
    """Outliers a token keeps on each side (smallest and largest) among its ``n = H * D`` values."""
    return min(int(round(outlier_fraction * 0.5 * n)), (n - 1) // 2) if outlier_fraction > 0 else 0


def value_thresholds(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x [N, n]``: ``lo`` = the ``(k+1)``-th smallest and ``hi`` = the ``(k+1)``-th largest entry, as
    float32 ``[N]``; the outliers are ``x < lo`` and ``x > hi`` (``-inf`` / ``inf`` when ``k == 0``)."""
    n_rows = x.shape[0]
    if k == 0 or x.shape[1] == 0:
        inf = torch.full((n_rows,), float("inf"), device=x.device)
        return -inf, inf
    xf = x.float()
    lo = torch.topk(xf, k + 1, dim=1, largest=False, sorted=True).values[:, k]
    hi = torch.topk(xf, k + 1, dim=1, largest=True, sorted=True).values[:, k]
    return lo.contiguous(), hi.contiguous()  # (columns of the top-k results: strided views)


def normalize_values(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value normalisation: outliers beyond the token's thresholds, each head scaled to the min/max of
    its remaining inliers.

    Args:
        x: ``[N, H, D]`` values. lo, hi: ``[N]`` thresholds (:func:`value_thresholds`).

    Returns:
        ``(x_norm [N, H, D] float32, outliers [N, H, D] bool, scale [N, H], zero [N, H])``, scale and zero rounded
        to ``scale_dtype`` (what is stored) before normalising.
    """
    xf = x.float()
    out = (xf < lo[:, None, None]) | (xf > hi[:, None, None])
    vmin = xf.masked_fill(out, float("inf")).amin(-1)
    vmax = xf.masked_fill(out, float("-inf")).amax(-1)
    empty = ~torch.isfinite(vmin)
    vmin = vmin.masked_fill(empty, 0.0)
    vmax = vmax.masked_fill(empty, 0.0)
    scale, zero = range_to_scale_zero(vmin, vmax)
    scale, zero = scale.to(scale_dtype), zero.to(scale_dtype)
    xn = torch.div(xf - zero.float()[..., None], scale.float()[..., None])
    return xn, out, scale, zero


def normalize_value_tokens(x: torch.Tensor, outlier_fraction: float, scale_dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`normalize_values` of ``x [N, H, D]`` with each token's thresholds (``outlier_fraction`` of its
    ``H * D`` values, half on each side); what the stores quantize and what calibration fits codebooks to."""
    n, h, d = x.shape
    lo, hi = value_thresholds(x.reshape(n, h * d), values_per_side(outlier_fraction, h * d))
    return normalize_values(x, lo, hi, scale_dtype)


def encode_values(x: torch.Tensor, codebook: Codebook, outlier_fraction: float, scale_dtype: torch.dtype
                  ) -> Encoded:
    """Per-token value encoding of ``x [N, H, D]`` (see :func:`normalize_value_tokens`)."""
    xn, out, scale, zero = normalize_value_tokens(x, outlier_fraction, scale_dtype)
    codes = codebook.encode(xn).masked_fill(out, codebook.zero_code)
    return Encoded(codes, out, scale, zero)


def decode(codes: torch.Tensor, codebook: Codebook, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``level[code] * scale + zero`` in float32; scale and zero broadcast against ``codes``."""
    return codebook.decode(codes) * scale.float() + zero.float()
