"""Encoding tokens into codes + scales + outliers, and decoding them back (the PyTorch reference).

Keys are normalised per channel with ranges fixed at prefill (or calibration): a normalised value outside
``[-1, 1]`` is an outlier. Values are normalised per token and head; their outliers are per token over all heads:
the ``k`` smallest and the ``k`` largest of the token's ``H * D`` entries, ``k = round(f / 2 * H * D)``
(:func:`values_per_side`; fewer when equal values straddle a boundary). A stored value's scale and zero take 8 bits
each against a reference per (page, head) (:func:`page_scales`). An outlier's dense code is the level nearest zero,
and its exact value goes to the sparse store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant.quant.codebook import Codebook

_EPS = 1e-6


@dataclass
class Encoded:
    """Keys of ``N`` tokens of ``H`` heads and ``D`` dims, encoded.

    Attributes:
        codes: ``[N, H, D]`` uint8.
        outliers: ``[N, H, D]`` bool, where the exact value must be kept.
    """

    codes: torch.Tensor
    outliers: torch.Tensor


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


def inlier_range(xf: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(outliers, vmin, vmax)`` of values ``xf [..., D]`` (float32) against thresholds ``lo, hi`` (broadcast to
    ``xf``): ``xf < lo`` or ``xf > hi`` are outliers, ``vmin, vmax [...]`` the min and max of the rest along the last
    dim (0 where every value is an outlier)."""
    out = (xf < lo) | (xf > hi)
    vmin = xf.masked_fill(out, float("inf")).amin(-1)
    vmax = xf.masked_fill(out, float("-inf")).amax(-1)
    empty = ~torch.isfinite(vmin)
    return out, vmin.masked_fill(empty, 0.0), vmax.masked_fill(empty, 0.0)


def normalize_values(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value normalisation: outliers beyond the token's thresholds, each head scaled to the min/max of
    its remaining inliers.

    Args:
        x: ``[N, H, D]`` values. lo, hi: ``[N]`` thresholds (:func:`value_thresholds`).

    Returns:
        ``(x_norm [N, H, D] float32, outliers [N, H, D] bool, scale [N, H], zero [N, H])``, scale and zero rounded
        to ``scale_dtype`` before normalising (calibration fits codebooks to these; the stores use
        :func:`encode_value_pages`).
    """
    xf = x.float()
    out, vmin, vmax = inlier_range(xf, lo[:, None, None], hi[:, None, None])
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


ZERO_STEPS = 255  # a value zero's code: steps of a power of two from the page's smallest zero


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= x`` (float32 ``x >= 0``; at least ``2**-126``), exactly, from the bits."""
    bits = x.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def scale_code_value(code: torch.Tensor) -> torch.Tensor:
    """The fraction of the page's largest scale that a scale code stands for: ``2**-E * (1 + M / 16)`` for the
    code byte ``E << 4 | M`` (float32, exact)."""
    c = code.to(torch.int32)
    return (((127 - (c >> 4)) << 23) | ((c & 15) << 19)).view(torch.float32)


def scale_code(q: torch.Tensor) -> torch.Tensor:
    """The code byte of the smallest representable fraction ``>= q`` (float32 ``0 < q <= 1``; below ``2**-15``:
    ``2**-15``), as uint8: exponent and top mantissa bits of ``q``, rounded up."""
    bits = q.float().contiguous().view(torch.int32)
    e = 127 - ((bits >> 23) & 0xFF)
    m = ((bits & 0x7FFFFF) + (1 << 19) - 1) >> 19
    carry = m == 16
    e = torch.where(carry, e - 1, e)
    m = torch.where(carry, 0, m)
    small = e > 15
    e = torch.where(small, 15, e).clamp_min(0)
    m = torch.where(small, 0, m)
    return ((e << 4) | m).to(torch.uint8)


@dataclass
class PageScales:
    """The per-token scales and zeros of value pages in 16 bits a (token, head), against a reference per (page,
    head): ``zero = zmin + zero_code * zstep`` (``zstep`` a power of two, so the product is exact) and ``scale =
    smax * scale_code_value(scale_code)``, the scale rounded up from what the token's inliers need around its
    stored zero (so its range is covered).

    Attributes:
        scale_code, zero_code: ``[..., T]`` uint8.
        ref: ``[..., 3]`` float32, ``(smax, zmin, zstep)``.
        scale, zero: ``[..., T]`` float32, what the codes decode to (what the values were normalised with).
    """

    scale_code: torch.Tensor
    zero_code: torch.Tensor
    ref: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def page_scales(vmin: torch.Tensor, vmax: torch.Tensor) -> PageScales:
    """Scales and zeros of value pages from each token's inlier range ``vmin, vmax [..., T]`` (float32, per (page,
    head) along the last dim); the Triton writer computes the same bits."""
    z = (vmax + vmin) * 0.5
    zmin = z.amin(-1, keepdim=True)
    zstep = _pow2_ceil((z.amax(-1, keepdim=True) - zmin) / ZERO_STEPS)
    zc = torch.floor((z - zmin) / zstep + 0.5).clamp(0, ZERO_STEPS)
    zero = zmin + zc * zstep
    need = torch.maximum(torch.maximum(vmax - zero, zero - vmin), torch.full_like(zero, _EPS))
    smax = need.amax(-1, keepdim=True)
    code = scale_code(need / smax)
    scale = smax * scale_code_value(code)
    ref = torch.cat([smax, zmin, zstep], -1)
    return PageScales(code, zc.to(torch.uint8), ref, scale, zero)


def decode_page_scales(scale_code: torch.Tensor, zero_code: torch.Tensor, ref: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` float32 ``[..., T]`` of codes ``[..., T]`` against their pages' ``ref [..., 3]``."""
    scale = ref[..., 0:1] * scale_code_value(scale_code)
    zero = ref[..., 1:2] + zero_code.float() * ref[..., 2:3]
    return scale, zero


@dataclass
class EncodedPages:
    """Values of ``n`` pages ``[n, H, T, D]`` encoded: ``codes [n, H, T, D]`` uint8, ``outliers [n, H, T, D]``
    bool and the pages' :class:`PageScales` (``[n, H, T]``, ``ref [n, H, 3]``)."""

    codes: torch.Tensor
    outliers: torch.Tensor
    scales: PageScales


def encode_value_pages(x: torch.Tensor, codebook: Codebook, outlier_fraction: float) -> EncodedPages:
    """Value pages ``x [n, H, T, D]``: each token's outliers over its ``H * D`` values (:func:`value_thresholds`),
    each (token, head) normalised to the range of its inliers with :func:`page_scales`, then coded."""
    n, h, t, d = x.shape
    xf = x.float()
    tok = xf.transpose(1, 2).reshape(n * t, h * d)
    lo, hi = value_thresholds(tok, values_per_side(outlier_fraction, h * d))
    out, vmin, vmax = inlier_range(xf, lo.reshape(n, 1, t, 1), hi.reshape(n, 1, t, 1))
    ps = page_scales(vmin, vmax)
    xn = torch.div(xf - ps.zero[..., None], ps.scale[..., None])
    codes = codebook.encode(xn).masked_fill(out, codebook.zero_code)
    return EncodedPages(codes, out, ps)


def decode(codes: torch.Tensor, codebook: Codebook, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``level[code] * scale + zero`` in float32; scale and zero broadcast against ``codes``."""
    return codebook.decode(codes) * scale.float() + zero.float()
