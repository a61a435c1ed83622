"""Where a prefill quantization spends its time: ``torch.profiler`` over ``BatchedKVQuantizer.quantize_keys`` /
``quantize_values`` of one ``[B, H, S, D]`` input.

``kvquant bench kernels`` times the whole prefill append and the fused write inside it; on the H200 the whole
append took 5-10x the write (MHA keys at 32K: 12.3 ms against 1.9 ms). This names the rest: a table of the ops
by device time and by host time, the host-device syncs counted, and a JSON file of the same rows.

Run: ``kvquant bench profile --kind keys --heads 32 --tokens 32768 [--backend triton] [--out prof.json]``
(on CPU too, with the torch backend or the Triton interpreter; the device time column is then empty).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvquant.bench.common import parse_size, write_json_atomic
from kvquant.config import QuantConfig

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::repeat_interleave",
            "aten::masked_select", "aten::_unique2", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile_prefill(kind: str, batch: int, heads: int, tokens: int, head_dim: int, cfg: QuantConfig, device: str,
                    dtype: torch.dtype = torch.float16, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Profile one ``quantize_keys`` / ``quantize_values`` call after ``warmup`` untimed ones.

    Returns ``{"rows": [...], "syncs": {...}, "wall_ms": float}``; each row is one op name with its count and its
    total host and device (CUDA) time in ms (device time 0 on CPU).
    """
    from torch.profiler import ProfilerActivity, profile

    from kvquant.quant.quantizer import BatchedKVQuantizer

    if kind not in ("keys", "values"):
        raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(batch, heads, tokens, head_dim, device=device, generator=g)
         * (0.5 + torch.rand(batch, heads, 1, head_dim, device=device, generator=g))).to(dtype)
    qz = BatchedKVQuantizer(cfg)
    fn = qz.quantize_keys if kind == "keys" else qz.quantize_values
    for _ in range(warmup):
        fn(x)
    cuda = x.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn(x)
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3  # the whole call, profiler overhead included
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "cuda_time_total", 0.0)
        rows.append({"op": e.key, "count": int(e.count), "host_ms": e.self_cpu_time_total / 1e3,
                     "device_ms": (dev_us or 0.0) / 1e3})
    rows.sort(key=lambda r: (r["device_ms"], r["host_ms"]), reverse=True)
    syncs = {r["op"]: r["count"] for r in rows if r["op"] in SYNC_OPS}
    return {"rows": rows, "syncs": syncs, "wall_ms": wall_ms}


def format_rows(rows: list[dict[str, Any]], top: int, device_times: bool = True) -> str:
    """The ``top`` rows by device time (when ``device_times``), then the ``top`` by host time (Markdown)."""
    out = []
    tables = (("by device time", "device_ms"), ("by host time", "host_ms"))
    for title, key in tables if device_times else tables[1:]:
        out.append(f"\n{title}\n| op | count | device ms | host ms |\n|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r[key], reverse=True)[:top]:
            out.append(f"| {r['op'][:60]} | {r['count']} | {r['device_ms']:.3f} | {r['host_ms']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvquant bench profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kind", choices=["keys", "values"], default="keys")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="KV heads (32: Llama-2-7B, 8: GQA)")
    p.add_argument("--tokens", type=parse_size, default=32768, help="prompt length S (32K or 32768)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--datatype", default="nuq3")
    p.add_argument("--outlier-fraction", type=float, default=0.01)
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--top", type=int, default=15, help="rows printed per table")
    p.add_argument("--out", type=Path, default=None, help="JSON file for every row")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("batch", "heads", "tokens", "head_dim", "top"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    cfg = QuantConfig(datatype=a.datatype, outlier_fraction=a.outlier_fraction, n_sink=1, residual_length=0,
                      page_size=64, backend=a.backend)
    res = profile_prefill(a.kind, a.batch, a.heads, a.tokens, a.head_dim, cfg, device)
    head = (f"prefill {a.kind} [{a.batch}, {a.heads}, {a.tokens}, {a.head_dim}] {a.datatype} on {device} "
            f"({a.backend} backend): {res['wall_ms']:.2f} ms profiled, syncs {res['syncs'] or 'none'}")
    print(head + format_rows(res["rows"], a.top, device_times=device.startswith("cuda")))
    if a.out is not None:
        write_json_atomic(a.out, {"config": vars(a) | {"out": str(a.out), "device": device},
                                  **res})
        print(f"written to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
