"""The Triton body of the RoPE inversion (launched by :func:`kvquant.kernels.unrope.invert_rope_triton`)."""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton

if triton is not None:
    from kvquant.kernels.jit.encode import to_storage as _to_storage

    @triton.jit
    def _unrope_kernel(X, sxb, sxh, sxs, C, scb, scs, S, ssb, sss, OUT, H, NS,
                       D: tl.constexpr, HP: tl.constexpr, BS: tl.constexpr, BF16: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # BS positions of one sequence per program, all heads
        nblk = tl.cdiv(NS, BS)
        b = pid // nblk
        si = (pid % nblk) * BS + tl.arange(0, BS)[:, None, None]
        hh = tl.arange(0, HP)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        half: tl.constexpr = D // 2
        ms = si < NS
        m = ms & (hh < H)
        base = X + b * sxb + hh * sxh + si * sxs
        x = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(base + (d + half) % D, mask=m, other=0.0).to(tl.float32)
        rot = tl.where(d < half, -xr, xr)  # rotate_half: [x1, x2] -> [-x2, x1]
        c = tl.load(C + b * scb + si * scs + d, mask=ms, other=1.0).to(tl.float32)
        s = tl.load(S + b * ssb + si * sss + d, mask=ms, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x * c - rot * s, c * c + s * s)
        if BF16:  # round to nearest even by hand (the interpreter's cast truncates)
            y = _to_storage(y, True)
        tl.store(OUT + ((b * H + hh) * NS + si) * D + d, y.to(OUT.dtype.element_ty), mask=m)
