"""Prefill-quantization and decode-append rows of ``kvquant bench kernels`` (see :mod:`kvquant.bench.kernels`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from kvquant.bench.cuda import do_bench
from kvquant.bench.kernel_rows import flush, format_row
from kvquant.flags import quant_config_from_args
from kvquant.quant.store import QuantizedKVCache

PREFILL_SHAPES = {"mha": 32, "gqa": 8}  # name -> KV heads (head dim 128)


def _prefill_bytes(x: torch.Tensor, cache: QuantizedKVCache) -> int:
    """Bytes an append must move at least: the fp16 tokens read once, and everything the cache holds written."""
    return int(x.numel() * x.element_size() + cache.memory_report()["total"])


def same_storage(a: QuantizedKVCache, b: QuantizedKVCache) -> bool:
    """Whether two stores hold the same bytes (pools, outliers, open pages)."""
    P = a.pages.n_pages
    if b.pages.n_pages != P or not all(torch.equal(a.pages.pools[n][:P], b.pages.pools[n][:P]) for n in a.pages.pools):
        return False
    if a.kind == "key" and a.keep_outliers:
        n = a.outliers.nnz
        return n == b.outliers.nnz and torch.equal(a.outliers.values[:n], b.outliers.values[:n]) and \
            torch.equal(a.outliers.indices[:n], b.outliers.indices[:n])
    if a.kind == "value" and a.keep_outliers:
        fields = ("values", "tokens", "counts", "head_start")
        return all(torch.equal(getattr(a.outliers, f)[:P], getattr(b.outliers, f)[:P]) for f in fields) and \
            torch.equal(a.open, b.open)
    return True


def bench_prefill(args, bw: float, rows: list, out_path: Path | None) -> None:
    """Prefill quantization: the whole ``quantize_keys`` / ``quantize_values`` of a prompt on both backends (same
    bytes checked), as time and as a fraction of the copy bandwidth; then decode appends, eager and static."""
    from dataclasses import replace

    from kvquant.bench.cuda import graph_bench
    from kvquant.bench.kernels_decode import heavy_tailed
    from kvquant.quant.quantizer import BatchedKVQuantizer

    dev = "cuda"
    D = 128
    base = quant_config_from_args(args, datatype=args.datatype, residual_length=0)
    for shape in args.prefill_shapes:
        H = PREFILL_SHAPES[shape]
        for S in args.prefill_lengths:
            torch.cuda.empty_cache()
            x = heavy_tailed((1, H, S, D), S, torch.float16, dev)
            for kind in ("keys", "values"):
                row = {"kind": "prefill", "what": kind, "shape": shape, "tokens": S, "H": H, "D": D,
                       "datatype": base.datatype, "outliers": base.outlier_fraction}
                caches = {}
                for backend in ("triton", "torch"):
                    qz = BatchedKVQuantizer(replace(base, backend=backend))
                    fn = partial(qz.quantize_keys if kind == "keys" else qz.quantize_values, x)
                    caches[backend] = fn()
                    torch.cuda.synchronize()
                    row[f"append_{backend}_ms"] = do_bench(fn, warmup=3, rep=30)
                row["identical"] = same_storage(caches["torch"], caches["triton"])
                nbytes = _prefill_bytes(x, caches["triton"])
                row["bytes"] = nbytes
                for k in ("append_triton", "append_torch"):
                    row[f"{k}_GBps"] = nbytes / row[f"{k}_ms"] / 1e6
                    row[f"{k}_frac_bw"] = nbytes / (row[f"{k}_ms"] * 1e-3) / bw
                del caches
                rows.append(row)
                flush(rows, out_path)
                print(format_row(row), flush=True)
    # decode appends: one token per sequence into a cache holding a 4K prompt (eager, and static + graph-replayed)
    for shape, B in (("mha", 1), ("gqa", 8)):
        H = PREFILL_SHAPES[shape]
        x = heavy_tailed((B, H, 4096, D), 7, torch.float16, dev)
        step = heavy_tailed((B, H, 1, D), 8, torch.float16, dev)
        for kind in ("keys", "values"):
            row = {"kind": "decode_append", "what": kind, "shape": shape, "batch": B, "H": H, "prompt": 4096}
            for backend in ("triton", "torch"):
                qz = BatchedKVQuantizer(replace(base, backend=backend))
                c = (qz.quantize_keys if kind == "keys" else qz.quantize_values)(x)
                c.reserve(4096)
                row[f"{backend}_ms"] = do_bench(partial(c.append, step), warmup=5, rep=50)
                if backend == "triton":
                    c.begin_static(4096)
                    row["triton_static_graph_ms"] = graph_bench(partial(c.append, step), reps=10, warmup=5, rep=20)
                    c.end_static()
                del c
            rows.append(row)
            flush(rows, out_path)
            print(format_row(row), flush=True)
