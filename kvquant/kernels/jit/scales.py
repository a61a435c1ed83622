"""Value scales and zeros in 16 bits per (token, head) against a reference per (page, head), in Triton: the same
bits as :func:`kvquant.quant.encode.page_scales` (writers) and their decoding (readers)."""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton

if triton is not None:

    @triton.jit
    def pow2_ceil(x):
        """The smallest power of two ``>= x`` (float32 ``x >= 0``; at least ``2**-126``), from the bits."""
        bits = x.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        e = tl.minimum(tl.maximum(e, 1), 254)
        return (e << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def scale_code_value(c):
        """``2**-E * (1 + M / 16)`` (float32, exact) for code bytes ``c = E << 4 | M`` (int32)."""
        return (((127 - (c >> 4)) << 23) | ((c & 15) << 19)).to(tl.float32, bitcast=True)

    @triton.jit
    def page_scales(vmin, vmax):
        """Scale and zero codes of one (page, head) from its tokens' inlier ranges ``vmin, vmax [T, 1]`` (float32):
        ``(scale_code, zero_code)`` int32 ``[T, 1]``, ``(smax, zmin, zstep)`` scalars and the decoded ``(scale,
        zero)`` ``[T, 1]`` the tokens are normalised with."""
        z = (vmax + vmin) * 0.5
        zmin = tl.min(z, axis=0, keep_dims=True)  # [1, 1]
        zstep = pow2_ceil(tl.math.div_rn(tl.max(z, axis=0, keep_dims=True) - zmin, 255.0))
        zc = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(z - zmin, zstep) + 0.5), 0.0), 255.0)
        zero = zmin + zc * zstep  # zc * zstep is exact (zstep a power of two)
        need = tl.maximum(tl.maximum(vmax - zero, zero - vmin), 1e-6)
        smax = tl.max(need, axis=0, keep_dims=True)
        bits = tl.math.div_rn(need, smax).to(tl.int32, bitcast=True)
        e = 127 - ((bits >> 23) & 0xFF)
        m = ((bits & 0x7FFFFF) + (1 << 19) - 1) >> 19
        carry = m == 16
        e = tl.where(carry, e - 1, e)
        m = tl.where(carry, 0, m)
        small = e > 15
        e = tl.maximum(tl.where(small, 15, e), 0)
        m = tl.where(small, 0, m)
        sc = (e << 4) | m
        return sc, zc.to(tl.int32), smax, zmin, zstep, smax * scale_code_value(sc), zero

    @triton.jit
    def token_scale_zero(VSC, VZR, ph, t, T: tl.constexpr, mask, smax, zmin, zstep):
        """``(scale, zero)`` float32 of tokens ``t`` of (page, head) rows ``ph = page * H + head`` (broadcast
        together, like ``mask``) from their codes ``VSC``/``VZR [pages, H, T]`` (uint8) and their rows' reference
        ``(smax, zmin, zstep)`` (:func:`page_ref`)."""
        c = tl.load(VSC + ph * T + t, mask=mask, other=0).to(tl.int32)
        zc = tl.load(VZR + ph * T + t, mask=mask, other=0).to(tl.float32)
        return smax * scale_code_value(c), zmin + zc * zstep

    @triton.jit
    def page_ref(VREF, ph):
        """``(smax, zmin, zstep)`` of (page, head) row(s) ``ph`` (``VREF [pages, H, 3]`` float32): once per page in
        a loop over its tiles."""
        r = VREF + ph * 3
        return tl.load(r), tl.load(r + 1), tl.load(r + 2)

    @triton.jit
    def value_scale_zero(VSC, VZR, VREF, ph, t, T: tl.constexpr, mask):
        """:func:`token_scale_zero` with each token's reference loaded beside it (tokens of many pages at once)."""
        r = VREF + ph * 3 + t * 0
        smax = tl.load(r, mask=mask, other=0.0)
        zmin = tl.load(r + 1, mask=mask, other=0.0)
        zstep = tl.load(r + 2, mask=mask, other=0.0)
        return token_scale_zero(VSC, VZR, ph, t, T, mask, smax, zmin, zstep)
