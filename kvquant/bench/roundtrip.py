"""Round-trip error table on heavy-tailed synthetic K/V: ``python -m kvquant.bench.roundtrip``.

For every datatype, with and without 1 % outliers: relative L2 error of keys (per-channel) and values
(per-token) after quantize -> dequantize, and the measured bits per element.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvquant.bench.synthetic import heavy_tailed_kv
from kvquant.flags import ArgumentParser
from kvquant.quant.quantizer import BatchedKVQuantizer


def run(shape: tuple[int, int, int, int], seed: int, fractions: tuple[float, ...]) -> list[dict]:
    x = heavy_tailed_kv(shape, seed, dtype=torch.float16)
    rows = []
    for datatype in ("nuq4", "int4", "nuq3", "int3", "nuq2", "int2"):
        for frac in fractions:
            q = BatchedKVQuantizer(datatype=datatype, outlier_fraction=frac)
            k, v = q.quantize_keys(x), q.quantize_values(x)
            row = {"datatype": datatype, "outlier_fraction": frac}
            for name, c in (("key", k), ("value", v)):
                xd = c.dequantize()[0].float()
                row[f"{name}_rel_err"] = float((xd - x.float()).norm() / x.float().norm())
                row[f"{name}_bits"] = c.bits_per_element
            rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``kvquant bench roundtrip``."""
    p = ArgumentParser(prog="kvquant bench roundtrip", description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=[1, 8, 2048, 128], metavar=("B", "H", "S", "D"),
                   help="batch, KV heads, tokens, head size of the synthetic K/V")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic K/V")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Entry point of ``kvquant bench roundtrip``: prints the table and returns its rows."""
    p = build_parser()
    a = p.parse_args(argv)
    if min(a.shape) < 1:
        p.error(f"--shape sizes must be >= 1, got {a.shape}")
    rows = run(tuple(a.shape), a.seed, (0.0, 0.01))
    print(f"Round trip on Student-t(4) K/V {tuple(a.shape)} fp16, 2 outlier channels per head (seed {a.seed})")
    print("| datatype | outliers | key rel. err | value rel. err | key bits | value bits |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['datatype']} | {r['outlier_fraction']:.0%} | {r['key_rel_err']:.4f} | {r['value_rel_err']:.4f} "
              f"| {r['key_bits']:.2f} | {r['value_bits']:.2f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
