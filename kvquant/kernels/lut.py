"""The PTX of the codes-to-levels lookup (the decode kernels' inner step; Triton body in
:mod:`kvquant.kernels.jit.lut`): a byte-permute lookup table (``prmt``) on the GPU, a gather under Triton's interpreter.

A unit of 32 codes (:mod:`kvquant.quant.packing`) becomes 32 levels in about 1.5 instructions per code: four
selector words (a nibble per code) are cut from the unit's words with shifts and masks, and each ``prmt`` looks up
the low or high bytes of four levels at once from two registers holding a byte of each of eight levels (three
more for 4-bit codes, whose sixteen levels need a second table and a select on the code's top bit). The
interpreter cannot run inline assembly, so it decodes the same words with shifts and a gather from the level
table; :func:`ptx_lookup` is checked against a small emulator of these instructions on every machine.
"""

from __future__ import annotations


def _quad(o: int, tables: tuple[str, str, str, str]) -> str:
    """Four codes (selector nibbles in ``s[15:0]``) -> two 32-bit registers of two 16-bit levels each."""
    lo0, lo1, hi0, hi1 = tables
    return (f"prmt.b32 lo, {lo0}, {lo1}, s;\nprmt.b32 hi, {hi0}, {hi1}, s;\n"
            f"prmt.b32 ${o}, lo, hi, 0x5140;\nprmt.b32 ${o + 1}, lo, hi, 0x7362;\n")


def ptx_lookup(bits: int) -> str:
    """PTX of one unit: outputs ``$0..$15`` (levels of codes ``2r, 2r+1`` in ``$r``), inputs ``$16..`` = the
    unit's ``bits`` words, then the tables (2/3 bits: low bytes of levels 0-3, 4-7, high bytes of 0-3, 4-7; 4 bits:
    low bytes of levels 0-3 .. 12-15, then their high bytes)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"no lookup for {bits}-bit codes")
    if bits == 4:
        code = "{\n.reg .b32 s, m, w4, a, b, lo, hi;\n"
        for g in range(4):
            w = f"${16 + g}"
            code += f"shl.b32 w4, {w}, 4;\nand.b32 s, {w}, 0x77777777;\n"
            for half in range(2):
                o = 4 * g + 2 * half
                sel = "0x9D8C" if half == 0 else "0xBFAE"  # sign-replicate the byte holding each code's bit 3
                code += (f"prmt.b32 m, {w}, w4, {sel};\n"
                         "prmt.b32 a, $20, $21, s;\nprmt.b32 b, $22, $23, s;\nlop3.b32 lo, b, a, m, 0xE4;\n"
                         "prmt.b32 a, $24, $25, s;\nprmt.b32 b, $26, $27, s;\nlop3.b32 hi, b, a, m, 0xE4;\n"
                         f"prmt.b32 ${o}, lo, hi, 0x5140;\nprmt.b32 ${o + 1}, lo, hi, 0x7362;\n")
                if half == 0:
                    code += "shr.b32 s, s, 16;\n"
        return code + "}"
    w = [f"${16 + j}" for j in range(bits)]
    t0 = 16 + bits
    tables = (f"${t0}", f"${t0 + 1}", f"${t0 + 2}", f"${t0 + 3}")
    if bits == 2:
        sels = [f"and.b32 s, {w[0]}, 0x33333333;\n", f"shr.b32 s, {w[0]}, 2;\nand.b32 s, s, 0x33333333;\n",
                f"and.b32 s, {w[1]}, 0x33333333;\n", f"shr.b32 s, {w[1]}, 2;\nand.b32 s, s, 0x33333333;\n"]
    else:
        sels = [
            f"shl.b32 t, {w[2]}, 2;\nand.b32 t, t, 0x44444444;\nlop3.b32 s, {w[0]}, 0x33333333, t, 0xEA;\n",
            f"shr.b32 v, {w[0]}, 2;\nshl.b32 t, {w[2]}, 1;\nand.b32 t, t, 0x44444444;\n"
            "lop3.b32 s, v, 0x33333333, t, 0xEA;\n",
            f"and.b32 t, {w[2]}, 0x44444444;\nlop3.b32 s, {w[1]}, 0x33333333, t, 0xEA;\n",
            f"shr.b32 v, {w[1]}, 2;\nshr.b32 t, {w[2]}, 1;\nand.b32 t, t, 0x44444444;\n"
            "lop3.b32 s, v, 0x33333333, t, 0xEA;\n",
        ]
    code = "{\n.reg .b32 s, t, v, lo, hi;\n"
    for g in range(4):
        code += sels[g] + _quad(4 * g, tables) + "shr.b32 s, s, 16;\n" + _quad(4 * g + 2, tables)
    return code + "}"


PTX = {b: ptx_lookup(b) for b in (2, 3, 4)}
