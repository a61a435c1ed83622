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


def _prefill_bytes(N: int, H: int, D: int, bits: int, kind: str, nnz: int) -> int:
    """Bytes an append must move at least: tokens read (fp16), codes written, value scale/zero (fp16),
    outlier entries (fp16 value + int16 channel) and per-slot (start int32, count int16)."""
    scales = N * H * 4 if kind == "values" else 0
    return int(N * H * D * 2 + N * H * D * bits / 8 + scales + nnz * 4 + N * 6)


def bench_prefill(args, bw: float, rows: list, out_path: Path | None) -> None:
    """Prefill quantization: the fused Triton kernel alone, the fused write (thresholds + kernel + outlier
    scatter), and the whole ``quantize_keys`` / ``quantize_values`` on both backends; plus decode appends."""
    from dataclasses import replace

    from kvquant.kernels import quantize_append as qa
    from kvquant.kernels.quantize_append import QuantizeAppend, quantize_append
    from kvquant.quant.quantizer import BatchedKVQuantizer

    dev = "cuda"
    D = 128
    base = quant_config_from_args(args, datatype=args.datatype, residual_length=0)
    for shape in args.prefill_shapes:
        H = PREFILL_SHAPES[shape]
        for S in args.prefill_lengths:
            torch.cuda.empty_cache()
            g = torch.Generator(device=dev).manual_seed(S)
            x = (torch.randn(1, H, S, D, device=dev, generator=g)
                 * (0.5 + torch.rand(1, H, 1, D, device=dev, generator=g))).half()
            tokens = x[0].transpose(0, 1).contiguous()  # [N, H, D]
            counts = torch.tensor([S], device=dev)
            for kind in ("keys", "values"):
                row = {"kind": "prefill", "what": kind, "shape": shape, "tokens": S, "H": H, "D": D,
                       "datatype": base.datatype, "outliers": base.outlier_fraction,
                       "tuning": {"block_n": qa.BLOCK_N, "num_warps": qa.NUM_WARPS, "code_tree": qa.CODE_TREE,
                                  "thresholds": qa.THRESHOLDS}}
                caches = {}
                for backend in ("triton", "torch"):
                    qz = BatchedKVQuantizer(replace(base, backend=backend))
                    fn = partial(qz.quantize_keys if kind == "keys" else qz.quantize_values, x)
                    caches[backend] = fn()
                    torch.cuda.synchronize()
                    row[f"append_{backend}_ms"] = do_bench(fn, warmup=5, rep=60)
                ref = caches["torch"]
                row["identical"] = bool(all(torch.equal(a, b) for a, b in (
                    (ref.pages.pools["planes"][: ref.pages.n_pages],
                     caches["triton"].pages.pools["planes"][: ref.pages.n_pages]),
                    (ref.outliers.values[: ref.outliers.nnz], caches["triton"].outliers.values[: ref.outliers.nnz]),
                    (ref.outliers.indices[: ref.outliers.nnz],
                     caches["triton"].outliers.indices[: ref.outliers.nnz]))))
                # the fused path on its own: a fresh cache with the pages reserved, all S tokens quantized
                cache = QuantizedKVCache(kind[:-1], replace(base, backend="triton"), 1, H, D, torch.float16, dev,
                                         ref.codebook, ref.channel_scale, ref.channel_zero)
                cache.pages.reserve(counts)
                cache.outliers.reserve(slots=cache.pages.capacity * base.page_size)
                del caches, ref

                def write(cache=cache, counts=counts, tokens=tokens):
                    cache.outliers.nnz = cache.outliers.n_slots = 0  # rewrite the same slots each time
                    quantize_append(cache, counts, tokens)

                write()
                nnz = cache.outliers.nnz
                nbytes = _prefill_bytes(S, H, D, cache.bits, kind, nnz)
                row.update(nnz=nnz, bytes=nbytes, write_ms=do_bench(write, warmup=10, rep=100))
                if kind == "values":  # the two ways to find the per-token thresholds (same result, bit for bit)
                    for method in ("sort", "topk"):
                        def write_with(cache=cache, counts=counts, tokens=tokens, method=method):
                            cache.outliers.nnz = cache.outliers.n_slots = 0
                            quantize_append(cache, counts, tokens, thresholds=method)

                        write_with()
                        row[f"write_thresholds_{method}_ms"] = do_bench(write_with, warmup=10, rep=100)
                plan = QuantizeAppend(cache, counts, tokens)
                row["kernel_ms"] = do_bench(plan.run_kernel, warmup=10, rep=100)
                sweep_rows = []
                if args.prefill_sweep:
                    for tree in (True, False):
                        for bn in (32, 64):
                            for nw in (2, 4, 8):
                                try:
                                    p = QuantizeAppend(cache, counts, tokens, block_n=bn, num_warps=nw,
                                                       code_tree=tree)
                                    p.run_kernel()
                                    ms = do_bench(p.run_kernel, warmup=10, rep=100)
                                except Exception as e:  # a launch variant that does not compile is reported
                                    sweep_rows.append({"code_tree": tree, "block_n": bn, "num_warps": nw,
                                                       "error": repr(e)[:300]})
                                    continue
                                sweep_rows.append({"code_tree": tree, "block_n": bn, "num_warps": nw, "ms": ms,
                                                   "GBps": nbytes / ms / 1e6})
                    row["sweep"] = sweep_rows
                for k in ("kernel", "write", "append_triton", "append_torch"):
                    row[f"{k}_GBps"] = nbytes / row[f"{k}_ms"] / 1e6
                    row[f"{k}_frac_bw"] = nbytes / (row[f"{k}_ms"] * 1e-3) / bw
                rows.append(row)
                flush(rows, out_path)
                print(format_row(row), flush=True)
                for r in sweep_rows:
                    res = r["error"] if "error" in r else f"{r['ms']:.3f} ms {r['GBps']:.0f} GB/s"
                    print(f"   sweep code_tree={r['code_tree']:d} block_n={r['block_n']} num_warps={r['num_warps']}: "
                          f"{res}", flush=True)
                del cache, plan
    # decode appends: one token per sequence into a cache holding a 4K prompt
    for shape, B in (("mha", 1), ("gqa", 8)):
        H = PREFILL_SHAPES[shape]
        x = torch.randn(B, H, 4096, D, device=dev).half()
        step = torch.randn(B, H, 1, D, device=dev).half()
        for kind in ("keys", "values"):
            row = {"kind": "decode_append", "what": kind, "shape": shape, "batch": B, "H": H, "prompt": 4096}
            for backend in ("triton", "torch"):
                qz = BatchedKVQuantizer(replace(base, backend=backend))
                c = (qz.quantize_keys if kind == "keys" else qz.quantize_values)(x)
                c.reserve(4096)
                row[f"{backend}_ms"] = do_bench(partial(c.append, step), warmup=5, rep=50)
                del c
            rows.append(row)
            flush(rows, out_path)
            print(format_row(row), flush=True)
