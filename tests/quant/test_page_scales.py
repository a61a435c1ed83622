"""Value scales and zeros in 16 bits per (token, head) against a (page, head) reference
(:func:`kvquant.quant.encode.page_scales`): the codes decode to a range that covers every token's inliers, at most a
sixteenth wider than it needs, with the zero within a 255th of the page's spread of zeros."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant.quant.encode import (
    _pow2_ceil,
    decode_page_scales,
    page_scales,
    scale_code,
    scale_code_value,
)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-30, max_value=1.0, allow_nan=False, allow_infinity=False))
def test_scale_code_rounds_up_by_at_most_a_sixteenth(q: float) -> None:
    qt = torch.tensor([q], dtype=torch.float32)
    val = float(scale_code_value(scale_code(qt)))
    q32 = float(qt)
    assert val >= q32
    assert val <= max(q32 * (1 + 1 / 16), 2.0**-15)


def test_scale_codes_are_monotone_and_exact() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = scale_code_value(codes).double()
    e, m = codes.long() >> 4, codes.long() & 15
    assert torch.equal(vals, 2.0 ** (-e.double()) * (1 + m.double() / 16))
    # every code is its own value's code (the round-up is exact on representable fractions)
    assert torch.equal(scale_code(vals.float()), codes)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e30, allow_nan=False, allow_infinity=False))
def test_pow2_ceil(x: float) -> None:
    p = float(_pow2_ceil(torch.tensor([x], dtype=torch.float32)))
    x32 = float(torch.tensor(x, dtype=torch.float32))
    assert p >= x32 and p >= 2.0**-126
    assert math.log2(p) == int(math.log2(p))
    assert x32 <= 2.0**-126 or p < 2 * x32


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.sampled_from([1, 2, 16, 64]),
    offset=st.floats(-1e3, 1e3),
    spread=st.floats(1e-4, 1e2),
    skew=st.floats(0.0, 6.0),
)
def test_page_scales_cover_each_token(seed: int, T: int, offset: float, spread: float, skew: float) -> None:
    g = torch.Generator().manual_seed(seed)
    center = offset + spread * torch.randn(3, 2, T, generator=g)
    half = spread * torch.exp(skew * torch.randn(3, 2, T, generator=g)) * torch.rand(3, 2, T, generator=g)
    vmin, vmax = center - half, center + half
    ps = page_scales(vmin, vmax)
    assert ps.scale_code.dtype == torch.uint8 and ps.zero_code.dtype == torch.uint8
    assert ps.ref.shape == (3, 2, 3) and ps.ref.dtype == torch.float32
    scale, zero = decode_page_scales(ps.scale_code, ps.zero_code, ps.ref)
    assert torch.equal(scale, ps.scale) and torch.equal(zero, ps.zero)
    # covered: every inlier maps into [-1, 1] (up to float32 rounding)
    tol = 1e-5 * (vmax.abs() + vmin.abs()) / scale + 1e-5
    assert bool(((vmax - zero) / scale <= 1 + tol).all())
    assert bool(((zero - vmin) / scale <= 1 + tol).all())
    # not much wider than needed: the zero within a 255th of the page's spread of zeros (power-of-two step, so
    # within 2/255) and the scale within a sixteenth of what the stored zero needs
    z = (vmax + vmin) / 2
    zspread = z.amax(-1, keepdim=True) - z.amin(-1, keepdim=True)
    assert bool(((zero - z).abs() <= zspread / 255 + 1e-6 * (z.abs() + 1)).all())
    need = torch.maximum(torch.maximum(vmax - zero, zero - vmin), torch.tensor(1e-6))
    floor = ps.ref[..., 0:1] * 2.0**-15
    assert bool((scale <= torch.maximum(need * (1 + 1 / 16) * (1 + 1e-6), floor * (1 + 1e-6))).all())


def test_store_value_scales_decode_the_pools(seed: int) -> None:
    """``value_scales`` of a sealed page: what :func:`decode_page_scales` makes of its pools, and a key store (whose
    scales are per channel) is refused by name."""
    from kvquant import BatchedKVQuantizer
    from kvquant.bench.synthetic import heavy_tailed_kv

    x = heavy_tailed_kv((2, 3, 300, 16), seed)
    q = BatchedKVQuantizer(datatype="nuq3", page_size=32, outlier_fraction=0.02)
    vc = q.quantize_values(x)
    assert bool((vc.sealed_len >= 64).all())
    b, i = torch.meshgrid(torch.arange(2), torch.arange(64), indexing="ij")
    page, off = vc.pages.locate(b.flatten(), i.flatten())
    scale, zero = vc.value_scales(page, off)
    assert scale.shape == zero.shape == (128, 3) and bool((scale > 0).all())
    pools = vc.pages.pools
    ref_scale, ref_zero = decode_page_scales(pools["scale"][page, :, off][..., None],
                                             pools["zero"][page, :, off][..., None], pools["vref"][page])
    assert torch.equal(scale, ref_scale[..., 0]) and torch.equal(zero, ref_zero[..., 0])
    kc = q.quantize_keys(x)
    with pytest.raises(ValueError, match="value store"):
        kc.value_scales(page, off)
