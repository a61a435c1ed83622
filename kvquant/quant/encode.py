"""Encoding tokens into codes + scales + outliers, and decoding them back (the PyTorch reference).

Keys are normalised per channel with ranges fixed at prefill (or calibration); values per token and
head with ranges from the token itself. Values outside the range (keys) or the token's outlier
thresholds (values) are outliers: their dense code is the level nearest zero, and their exact value
goes to the sparse store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant.quant.codebook import Codebook
from kvquant.quant.stats import masked_quantile_pair

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
    xn = (x.float() - zero) / scale
    codes = codebook.encode(xn)
    if not keep_outliers:
        return Encoded(codes, torch.zeros_like(codes, dtype=torch.bool))
    out = (xn < -1.0) | (xn > 1.0)
    codes = codes.masked_fill(out, codebook.zero_code)
    return Encoded(codes, out)


def normalize_values(
    x: torch.Tensor, outlier_fraction: float, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value normalisation.

    Outlier thresholds are the ``f/2`` and ``1-f/2`` quantiles over all ``H*D`` entries of the token
    (KVQuant's per-token outliers); each head is then scaled to the min/max of its remaining inliers.

    Args:
        x: ``[N, H, D]`` values.

    Returns:
        ``(x_norm [N, H, D] float32, outliers [N, H, D] bool, scale [N, H], zero [N, H])``, the scale and
        zero rounded to ``scale_dtype`` (what is stored) before normalising.
    """
    n, h, d = x.shape
    xf = x.float()
    if outlier_fraction > 0:
        lo, hi = masked_quantile_pair(xf.reshape(n, h * d), None, outlier_fraction / 2, 1 - outlier_fraction / 2)
        out = (xf < lo[:, None, None]) | (xf > hi[:, None, None])
    else:
        out = torch.zeros_like(xf, dtype=torch.bool)
    vmin = xf.masked_fill(out, float("inf")).amin(-1)
    vmax = xf.masked_fill(out, float("-inf")).amax(-1)
    empty = ~torch.isfinite(vmin)
    vmin = vmin.masked_fill(empty, 0.0)
    vmax = vmax.masked_fill(empty, 0.0)
    scale, zero = range_to_scale_zero(vmin, vmax)
    scale, zero = scale.to(scale_dtype), zero.to(scale_dtype)
    xn = (xf - zero.float()[..., None]) / scale.float()[..., None]
    return xn, out, scale, zero


def encode_values(
    x: torch.Tensor, codebook: Codebook, outlier_fraction: float, scale_dtype: torch.dtype
) -> Encoded:
    """Per-token value encoding (see :func:`normalize_values`); ``x [N, H, D]``."""
    xn, out, scale, zero = normalize_values(x, outlier_fraction, scale_dtype)
    codes = codebook.encode(xn).masked_fill(out, codebook.zero_code)
    return Encoded(codes, out, scale, zero)


def decode(codes: torch.Tensor, codebook: Codebook, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``level[code] * scale + zero`` in float32; scale and zero broadcast against ``codes``."""
    return codebook.decode(codes) * scale.float() + zero.float()
