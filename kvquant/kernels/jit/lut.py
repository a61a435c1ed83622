"""The ``@triton.jit`` codes-to-levels step shared by the decode kernels (PTX in :mod:`kvquant.kernels.lut`)."""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton
from kvquant.kernels.lut import PTX

if triton is not None:

    @triton.jit
    def _join16(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15):
        """16 tensors ``[R, C]`` -> ``[R, C, 2, 2, 2, 2]`` whose row-major flattening is ``o0, o1, .., o15``."""
        a0 = tl.join(o0, o8)
        a1 = tl.join(o4, o12)
        a2 = tl.join(o2, o10)
        a3 = tl.join(o6, o14)
        a4 = tl.join(o1, o9)
        a5 = tl.join(o5, o13)
        a6 = tl.join(o3, o11)
        a7 = tl.join(o7, o15)
        return tl.join(tl.join(tl.join(a0, a1), tl.join(a2, a3)), tl.join(tl.join(a4, a5), tl.join(a6, a7)))

    @triton.jit
    def unit_levels(w0, w1, w2, w3, LUT, LEV, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                    USE_ASM: tl.constexpr, DT: tl.constexpr):
        """Levels of units ``[R, C]`` given by their words ``w0..w3`` (int32 ``[R, C]``; the first ``BITS``
        used) -> ``[R, C * 32]`` in ``DT`` (float16/bfloat16). ``LUT``: the 8 table words
        (:func:`kvquant.quant.packing.lut_words`); ``LEV``: the levels rounded to ``DT``, as float32 (gather path)."""
        if USE_ASM:
            l0 = tl.load(LUT)
            l1 = tl.load(LUT + 1)
            l2 = tl.load(LUT + 2)
            l3 = tl.load(LUT + 3)
            h0 = tl.load(LUT + 4)
            h1 = tl.load(LUT + 5)
            h2 = tl.load(LUT + 6)
            h3 = tl.load(LUT + 7)
            if BITS == 2:
                o = tl.inline_asm_elementwise(PTX_2, "=r," * 16 + "r,r,r,r,r,r", [w0, w1, l0, l1, h0, h1],
                                              dtype=(tl.int32,) * 16, is_pure=True, pack=1)
            elif BITS == 3:
                o = tl.inline_asm_elementwise(PTX_3, "=r," * 16 + "r,r,r,r,r,r,r", [w0, w1, w2, l0, l1, h0, h1],
                                              dtype=(tl.int32,) * 16, is_pure=True, pack=1)
            else:
                o = tl.inline_asm_elementwise(PTX_4, "=r," * 16 + "r," * 11 + "r",
                                              [w0, w1, w2, w3, l0, l1, l2, l3, h0, h1, h2, h3],
                                              dtype=(tl.int32,) * 16, is_pure=True, pack=1)
            x = tl.reshape(_join16(*o), [R, C * 16])  # 16-bit pairs
            if tl.bfloat16 == DT:
                lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [x],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
            else:
                lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [x],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
            return tl.reshape(tl.join(lo, hi), [R, C * 32])
        else:
            k = tl.arange(0, 32)[None, None, :]
            g = k // 8
            i = k % 8
            if BITS == 4:
                w = tl.where(g == 0, w0[:, :, None], tl.where(g == 1, w1[:, :, None],
                                                              tl.where(g == 2, w2[:, :, None], w3[:, :, None])))
                code = (w >> (4 * i)) & 15
            else:
                w = tl.where(g < 2, w0[:, :, None], w1[:, :, None])
                code = (w >> (4 * i + 2 * (g % 2))) & 3
                if BITS == 3:
                    code = code | (((w2[:, :, None] >> (4 * i + g)) & 1) << 2)
            return tl.reshape(tl.load(LEV + code).to(DT), [R, C * 32])

    PTX_2 = tl.constexpr(PTX[2])
    PTX_3 = tl.constexpr(PTX[3])
    PTX_4 = tl.constexpr(PTX[4])
