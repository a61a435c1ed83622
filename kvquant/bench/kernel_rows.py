"""Rows of ``kvquant bench kernels``: the JSON file rewritten after every row, and one printed line per row."""

from __future__ import annotations

import json
from pathlib import Path


def flush(rows: list, out_path: Path | None) -> None:
    if out_path is not None:
        out_path.write_text(json.dumps(rows, indent=1))


def format_row(r: dict) -> str:
    if r["kind"] == "prefill":
        return (f"prefill {r['shape']} {r['what']:6s} S={r['tokens']:6d} | kernel {r['kernel_ms']:7.3f} ms "
                f"{r['kernel_GBps']:6.0f} GB/s ({100 * r['kernel_frac_bw']:3.0f}%) | write {r['write_ms']:7.3f} ms "
                f"{r['write_GBps']:6.0f} GB/s ({100 * r['write_frac_bw']:3.0f}%) | append triton "
                f"{r['append_triton_ms']:7.3f} ms {r['append_triton_GBps']:6.0f} GB/s "
                f"({100 * r['append_triton_frac_bw']:3.0f}%) | torch {r['append_torch_ms']:8.3f} ms "
                f"{r['append_torch_GBps']:5.0f} GB/s | x{r['append_torch_ms'] / r['append_triton_ms']:.0f} "
                f"identical={r['identical']}"
                + "".join(f" | write, thresholds by {m} {r[k]:.3f} ms" for m in ("sort", "topk")
                          if (k := f"write_thresholds_{m}_ms") in r))
    if r["kind"] == "decode_append":
        return (f"decode append {r['shape']} B={r['batch']} {r['what']:6s} | triton {r['triton_ms']:.3f} ms | "
                f"torch {r['torch_ms']:.3f} ms")
    if "skipped" in r:
        return f"{r['shape']} L={r['context']} B={r['batch']}: skipped ({r['skipped']})"

    def f(k, fmt="{:8.3f}"):
        v = r.get(k)
        return fmt.format(v) if isinstance(v, (int, float)) else f"{'-':>8s}"

    return (f"{r['shape']:3s} L={r['context']:6d} B={r['batch']:2d} | fp16 {f('fp16_ms')} | dequant {f('dequant_ms')}"
            f" | kernel {f('kernel_ms')} (floor {f('kernel_floor_ms')}, {f('kernel_frac_floor', '{:4.2f}')}) | "
            f"x fp16 {f('speedup_vs_fp16', '{:5.2f}')} x deq {f('speedup_vs_dequant', '{:6.1f}')} "
            f"err {f('rel_err', '{:.1e}')}"
            + "".join(f" | hf {k[3:-3]} {f(k)}" for k in r if k.startswith("hf_") and k.endswith("_ms")))
