"""What the decode-attention kernels compile to, without a GPU: registers, spills, shared memory, layout conversions
and the SASS instruction mix of each loop, per element of the tile it streams.

Triton compiles for a CUDA target on any machine (the pip wheel carries ``ptxas`` and ``cuobjdump``), so a kernel
change can be read before it is timed: a loop that loses its shared-memory round trips (``STS``/``LDS``/``BAR``) or
half its instructions per element is worth a GPU run; one that spills is not. Compare with the Triton version the GPU
runs (``pip install triton==X`` in a separate environment; the counts differ between versions).

    python scripts/kernel_stats.py                      # sm_90 (H100/H200), the shapes of the decode table
    python scripts/kernel_stats.py --arch 80 --bits 2 --json stats.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvquant.kernels.jit.decode_attention import (
    key_corr_kernel,
    keys_kernel,
    value_outliers_kernel,
    values_kernel,
)

POINTERS = {  # pointer arguments and their element types; every other non-constexpr argument is an i32
    "keys": dict(Q="*fp32", SC="*fp32", KC="*i32", KLUT="*i32", KLEV="*fp32", KCS="*fp32", KCZ="*fp32", KTAB="*i32",
                 QLEN="*i32", SLEN="*i32", POS="*i32", COS="*fp32", SIN="*fp32", RC="*fp32", RS="*fp32"),
    "values": dict(OP="*fp32", MP="*fp32", LP="*fp32", SC="*fp32", VC="*i32", VLUT="*i32", VLEV="*fp32", VSC="*u8",
                   VZR="*u8", VREF="*fp32", VTAB="*i32", VOPEN="*fp16", QLEN="*i32"),
    "key_corr": dict(Q="*fp32", CORR="*fp32", KTAB="*i32", KSS="*i32", KHC="*u8", KOV="*fp16", KOI="*u8",
                     KDZ="*fp32", QLEN="*i32", SLEN="*i32", POS="*i32", COS="*fp32", SIN="*fp32"),
    "value_outliers": dict(OUT="*fp32", MF="*fp32", LF="*fp32", SC="*fp32", VSC="*u8", VZR="*u8", VREF="*fp32",
                           VTAB="*i32", VOV="*fp16", VOT="*u8", VOC="*u8", VOH="*i32", v_zero_level="fp32",
                           QLEN="*i32"),
}
KERNELS = {"keys": keys_kernel, "values": values_kernel, "key_corr": key_corr_kernel,
           "value_outliers": value_outliers_kernel}


def compile_kernel(kind: str, consts: dict, arch: int, num_warps: int, num_stages: int = 2):
    """Compile as a real launch is specialised: every pointer and integer argument a multiple of 16 (Triton marks
    them so when they are: aligned tensors, model-sized heads, lengths and strides), which changes the index
    arithmetic, the vector widths and so the registers."""
    fn = KERNELS[kind]
    sig = {name: "constexpr" if name in consts else POINTERS[kind].get(name, "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in consts and (sig[name].startswith("*") or sig[name] == "i32")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_stats(cubin: bytes) -> tuple[dict, list[dict]]:
    """Resource usage and, for every backward branch (a loop), its instruction count and mix."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(.*?);", sass)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
            body = [t for _, t in ins[index[int(m.group(1), 16)]: i + 1]]
            mix = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            loops.append({"instructions": len(body), "mix": dict(mix.most_common())})
    return usage, loops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    D, T = args.head_dim, args.page
    common = dict(D=D, T=T, USE_ASM=True, DT=tl.float16, PREC="tf32")
    cases = [  # (label, kind, constexprs, warps, tile tokens)
        ("keys MHA, row sums", "keys", dict(common, G=1, GP=1, BT=32, KBITS=args.bits, ROPE=True, RED=True), 2, 32),
        ("keys GQA 4, dots", "keys", dict(common, G=4, GP=4, BT=32, KBITS=args.bits, ROPE=True, RED=False), 2, 32),
        ("values MHA, elementwise at a fixed max", "values", dict(common, G=1, GP=1, BT=32, VBITS=args.bits), 2, 32),
        ("values MHA, elementwise, 4 warps x 64", "values", dict(common, G=1, GP=1, BT=64, VBITS=args.bits), 4, 64),
        ("values GQA 4, dots", "values", dict(common, G=4, GP=4, BT=32, VBITS=args.bits), 2, 32),
        # the outlier passes: a lane per stored entry; their loop is one round of entries, so the per-element
        # count does not apply
        ("key corrections MHA 32 heads, 32 tokens x 16 entries", "key_corr",
         dict(D=D, T=T, G=1, GQ=1, HP=32, LOGH=5, BLK=32, JJ=16, ROPE=True), 4, None),
        ("key corrections GQA 8 x 4, 32 tokens x 16 entries", "key_corr",
         dict(D=D, T=T, G=4, GQ=4, HP=8, LOGH=3, BLK=32, JJ=16, ROPE=True), 4, None),
        ("value outliers MHA, 4 pages x 64", "value_outliers", dict(D=D, T=T, G=1, GQ=1, PP=4, BE=64), 4, None),
    ]
    stages = {"keys": 2, "values": 2, "key_corr": 3, "value_outliers": 3}  # as decode_attention launches them
    rows = []
    for label, kind, consts, warps, bt in cases:
        c = compile_kernel(kind, consts, args.arch, warps, stages[kind])
        usage, loops = sass_stats(c.asm["cubin"])
        ttgir = c.asm["ttgir"]
        per_page = T * D / (32 * warps)  # elements of one page each thread handles (the page loop's body)
        main_loop = max(loops, key=lambda lp: lp["instructions"]) if loops else None
        row = {"kernel": label, "registers": usage.get("reg"), "stack": usage.get("stack"),
               "shared": c.metadata.shared, "convert_layouts": ttgir.count("convert_layout"), "num_warps": warps,
               "tile_tokens": bt, "page_loop": main_loop,
               "instructions_per_element": main_loop["instructions"] / per_page if main_loop and bt else None}
        rows.append(row)
        mix = main_loop["mix"] if main_loop else {}
        smem = sum(mix.get(k, 0) for k in ("STS", "LDS", "LDSM", "BAR", "SHFL"))
        per = f"{row['instructions_per_element']:.2f}/element" if row["instructions_per_element"] else \
            f"{mix.get('LDG', 0)} global loads"
        print(f"{label:42s} regs {row['registers']:>3} stack {row['stack']:>3} smem {row['shared']:>6} "
              f"cvt {row['convert_layouts']:>3} | loop {main_loop['instructions'] if main_loop else '-':>5} "
              f"instr, {per}, shared/shuffle/barrier {smem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "bits": args.bits, "head_dim": D, "page": T,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
