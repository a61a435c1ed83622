"""A tiny emulator of the PTX subset the lookup-table decoders use (shl, shr, and, or, lop3, prmt, mov), to check
the inline assembly's logic on machines without a GPU."""
import re

M32 = 0xFFFFFFFF

def _prmt(a, b, c):
    src = (a & M32) | ((b & M32) << 32)
    out = 0
    for k in range(4):
        n = (c >> (4 * k)) & 0xF
        byte = (src >> (8 * (n & 7))) & 0xFF
        if n & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out

def _lop3(a, b, c, lut):
    out = 0
    for i in range(32):
        x = ((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1)
        # lut index: a=0xF0, b=0xCC, c=0xAA -> bit position = a*4 + b*2 + c
        out |= ((lut >> x) & 1) << i
    return out

def run(asm: str, operands: dict):
    """Execute ``asm`` with ``operands`` (``{'$16': value, ...}``); returns the dict of all registers."""
    regs = dict(operands)
    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0) & M32
    for raw in asm.replace("{", "\n").replace("}", "\n").split(";"):
        line = raw.strip()
        if not line or line.startswith(".reg"):
            continue
        m = re.match(r"([\w.]+)\s+(.*)", line, re.S)
        op, rest = m.group(1), m.group(2)
        args = [x.strip() for x in re.split(r",(?![^{]*})", rest)]
        if op.startswith("mov.b32") and args[0].startswith("{"):
            lo_hi = args[0].strip("{}").split(",")
            v = val(args[1])
            regs[lo_hi[0].strip()] = v & 0xFFFF
            regs[lo_hi[1].strip()] = v >> 16
            continue
        d = args[0]
        if op == "shl.b32":
            r = (val(args[1]) << val(args[2])) & M32
        elif op == "shr.b32" or op == "shr.u32":
            r = (val(args[1]) & M32) >> val(args[2])
        elif op == "and.b32":
            r = val(args[1]) & val(args[2])
        elif op == "or.b32":
            r = val(args[1]) | val(args[2])
        elif op == "lop3.b32":
            r = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif op == "prmt.b32":
            r = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "mov.b32":
            r = val(args[1])
        else:
            raise ValueError(f"unsupported instruction {op}")
        regs[d] = r & M32
    return regs
