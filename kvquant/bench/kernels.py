"""Kernel benchmarks: decode attention over the packed KV cache, and prefill quantization throughput.

Decode rows compare, per (context, batch, heads) config:

* ``fp16_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over a dense fp16 cache;
* ``dequant``: :func:`~kvquant.kernels.reference.decode_attention_reference` (dequantize everything, then
  attend: what a dequantize-then-attend cache such as transformers' ``QuantizedCache`` does);
* ``kernel``: :func:`~kvquant.kernels.decode_attention.decode_attention` (Triton);
* ``hf_<name>`` (``--hf-baselines quanto4,hqq4``, where the backend installs): one decode step of transformers'
  own ``QuantizedCache`` (append the token, dequantize the whole layer, concatenate, then SDPA), the path users
  of ``cache_implementation="quantized"`` run today.

Each row: median time (``triton.testing.do_bench``, warm-up, inputs rotated over several cache copies when
the cache is small enough to sit in L2), ratio vs fp16, bytes moved, and the fraction of the bandwidth floor
(bytes / measured device-to-device copy bandwidth) reached. Caches are synthetic (random codes, scales and
sorted outlier channels at the configured density): timing does not depend on the values.

Prefill rows (``[1, H, S, 128]`` fp16, H = 32 or 8 KV heads), keys and values, per row: the fused Triton
quantize kernel alone, the fused write (value thresholds by torch ``topk`` + kernel + outlier scatter), and
the whole ``quantize_keys`` / ``quantize_values`` (checks, key channel ranges, page allocation, token
gather included) on the triton and torch backends, each as GB/s of the bytes an append must move (tokens
read, codes + scales + outliers written) and as a fraction of the copy bandwidth. Decode-append rows time
one appended token per sequence.

Run: ``python -m kvquant.bench.kernels [--quick] [--out results.json]``; prefill only:
``--skip-decode [--prefill-sweep]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from kvquant.config import QuantConfig
from kvquant.quant.codebook import codebook_for
from kvquant.quant.store import QuantizedKVCache

SHAPES = {"mha": (32, 32, 128), "gqa": (32, 8, 128)}  # name -> (q heads, kv heads, head dim)


def synthetic_caches(
    B: int, Hkv: int, D: int, L: int, cfg: QuantConfig, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[QuantizedKVCache, QuantizedKVCache]:
    """A (keys, values) cache pair of ``L`` tokens per sequence filled directly with random contents.

    ``cfg.n_sink`` sinks and ``cfg.residual_length`` residual tokens, the rest in pages with random codes,
    random scales and ``cfg.outlier_fraction`` outliers per token (sorted, distinct channels).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    n_sink, R = cfg.n_sink, cfg.residual_length
    q = L - n_sink - R
    if q < 0:
        raise ValueError("context shorter than sinks + residual")
    T = cfg.page_size
    cs = 0.1 + torch.rand(Hkv, D, device=device, generator=g)
    cz = 0.1 * torch.randn(Hkv, D, device=device, generator=g)
    cb = codebook_for(cfg.datatype)
    kc = QuantizedKVCache("key", cfg, B, Hkv, D, dtype, device, cb, cs, cz)
    vc = QuantizedKVCache("value", cfg, B, Hkv, D, dtype, device, cb)
    n_id = Hkv * D
    cnt = int(round(cfg.outlier_fraction * n_id))
    for c in (kc, vc):
        c.sink = torch.randn(B, Hkv, n_sink, D, device=device, generator=g).to(dtype)
        c.residual = torch.randn(B, Hkv, R, D, device=device, generator=g).to(dtype)
        c.sink_len.fill_(n_sink)
        c.res_len.fill_(R)
        c.q_len.fill_(q)
        c.pages.reserve(c.q_len)
        P = c.pages.n_pages
        pl = c.pages.pools["planes"]
        pl[:P] = torch.randint(-(2**31), 2**31 - 1, (P, *pl.shape[1:]), device=device, dtype=torch.int32,
                               generator=g)
        if c.kind == "value":
            c.pages.pools["scale"][:P] = (0.05 + 0.1 * torch.rand(P, Hkv, T, device=device, generator=g)).to(
                c.pages.pools["scale"].dtype)
            c.pages.pools["zero"][:P] = (0.01 * torch.randn(P, Hkv, T, device=device, generator=g)).to(
                c.pages.pools["zero"].dtype)
        if cnt and q:
            i = torch.arange(q, device=device)
            b = torch.arange(B, device=device)
            page, off = c.pages.locate(b.repeat_interleave(q), i.repeat(B))
            slots = page * T + off
            stride = n_id // cnt
            ch = torch.arange(cnt, device=device) * stride
            ch = ch[None, :] + torch.randint(0, stride, (slots.numel(), cnt), device=device, generator=g)
            vals = 4.0 * torch.randn(slots.numel(), cnt, device=device, generator=g)
            c.outliers.reserve(nnz=slots.numel() * cnt, slots=P * T)
            c.outliers.append_slots(slots, torch.full_like(slots, cnt), vals.reshape(-1), ch.reshape(-1))
    return kc, vc


def hf_quantized_step(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """One decode step through transformers' ``QuantizedCache`` (baseline ``name``, e.g. ``"quanto4"``).

    Args:
        q: ``[B, Hq, 1, D]`` the step's query; k, v: ``[B, Hkv, L, D]`` the context, quantized once here (as a
            prefill would be).

    Returns:
        ``(step, cache)``: ``step()`` appends one more token (the last context token again) and attends over
        everything the cache returns (``[B, Hq, 1, D]``); each call grows the cache by one token, as decoding does.
    """
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from kvquant.eval.baselines import make_baseline_cache

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    cfg = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
                      num_hidden_layers=1, intermediate_size=4 * Hq * D, vocab_size=32)
    cache = make_baseline_cache(name, SimpleNamespace(config=cfg))
    cache.update(k, v, 0)
    k1, v1 = k[:, :, -1:].clone(), v[:, :, -1:].clone()

    def step() -> torch.Tensor:
        kk, vv = cache.update(k1, v1, 0)
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=Hq != Hkv)

    return step, cache


def _bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds (device events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = _bench(partial(y.copy_, x))
    return 2 * nbytes / (ms * 1e-3)


def _rotating(fns):
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return call


def _quant_bytes(B: int, Hkv: int, D: int, L: int, cfg: QuantConfig, dtype_bytes: int = 2) -> int:
    """Bytes the kernel must read: codes, value scales, outliers (values, indices, slot start/count),
    sinks/residual (the query/output are negligible)."""
    q = L - cfg.n_sink - cfg.residual_length
    per_tok_head = 2 * D * cfg.bits / 8 + 2 * 2  # K+V codes, value scale+zero (fp16)
    outl = 2 * (q * cfg.outlier_fraction * Hkv * D * 4 + q * 6)  # entries + per-slot (start, count)
    exact = 2 * (cfg.n_sink + cfg.residual_length) * Hkv * D * dtype_bytes
    return int(B * (q * Hkv * per_tok_head + outl + exact))


def bench_decode(args, bw: float, rows: list, out_path: Path | None) -> None:
    from kvquant.kernels.decode_attention import decode_attention
    from kvquant.kernels.reference import decode_attention_reference

    dev = "cuda"
    dtype = torch.float16
    cfg = QuantConfig(datatype=args.datatype, outlier_fraction=args.outliers, n_sink=args.n_sink,
                      residual_length=args.residual, page_size=args.page_size)
    for shape in args.shapes:
        Hq, Hkv, D = SHAPES[shape]
        for L in args.contexts:
            for B in args.batches:
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0]
                qbytes = _quant_bytes(B, Hkv, D, L, cfg)
                fbytes = 2 * B * Hkv * L * D * 2
                row = {"kind": "decode", "shape": shape, "Hq": Hq, "Hkv": Hkv, "D": D, "context": L, "batch": B,
                       "datatype": cfg.datatype, "outliers": cfg.outlier_fraction, "rope": args.rope,
                       "quant_bytes": qbytes, "fp16_bytes": fbytes}
                if 3 * qbytes > 0.8 * free:
                    row["skipped"] = "quantized cache does not fit"
                    rows.append(row)
                    _flush(rows, out_path)
                    continue
                n_sets = max(1, min(4, math.ceil(200e6 / qbytes)))
                caches = [synthetic_caches(B, Hkv, D, L, cfg, dtype, dev, seed=s) for s in range(n_sets)]
                qs = [torch.randn(B, Hq, D, device=dev, dtype=dtype) for _ in range(n_sets)]
                rope = None
                if args.rope:
                    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D))
                    f = torch.outer(torch.arange(L + 64, device=dev).float(), inv)
                    e = torch.cat([f, f], -1)
                    rope = (e.cos(), e.sin(), torch.zeros(B, dtype=torch.int64, device=dev))
                fns = [partial(decode_attention, qs[i], *caches[i], rope=rope, backend="triton")
                       for i in range(n_sets)]
                out = fns[0]()
                torch.cuda.synchronize()
                row["kernel_ms"] = _bench(_rotating(fns))
                row["kernel_floor_ms"] = qbytes / bw * 1e3
                row["kernel_frac_floor"] = row["kernel_floor_ms"] / row["kernel_ms"]
                # dequantize-everything path (memory hungry: ~40 B of temporaries per element)
                if B * Hkv * L * D * 48 < 0.7 * torch.cuda.mem_get_info()[0] and not args.no_dequant:
                    try:
                        ref = decode_attention_reference(qs[0], *caches[0], rope=rope)
                        row["rel_err"] = float((out.float() - ref.float()).norm() / ref.float().norm())
                        row["dequant_ms"] = _bench(
                            _rotating([partial(decode_attention_reference, qs[i], *caches[i], rope=rope,
                                               compute_dtype=dtype) for i in range(n_sets)]), warmup=5, rep=50)
                        del ref
                    except torch.OutOfMemoryError:
                        row["dequant_ms"] = None
                    torch.cuda.empty_cache()
                del caches, fns
                torch.cuda.empty_cache()
                # fp16 SDPA over a dense fp16 cache
                n16 = max(1, min(4, math.ceil(200e6 / fbytes)))
                if n16 * fbytes < 0.8 * torch.cuda.mem_get_info()[0]:
                    kv = [(torch.randn(B, Hkv, L, D, device=dev, dtype=dtype),
                           torch.randn(B, Hkv, L, D, device=dev, dtype=dtype)) for _ in range(n16)]
                    q4 = [torch.randn(B, Hq, 1, D, device=dev, dtype=dtype) for _ in range(n16)]
                    sd = [partial(F.scaled_dot_product_attention, q4[i], kv[i][0], kv[i][1],
                                  enable_gqa=Hq != Hkv) for i in range(n16)]
                    row["fp16_ms"] = _bench(_rotating(sd))
                    row["fp16_floor_ms"] = fbytes / bw * 1e3
                    row["speedup_vs_fp16"] = row["fp16_ms"] / row["kernel_ms"]
                    del kv, q4
                if row.get("dequant_ms"):
                    row["speedup_vs_dequant"] = row["dequant_ms"] / row["kernel_ms"]
                for name in args.hf_baselines:
                    _bench_hf(name, row, B, Hq, Hkv, L, D, dev, dtype)
                rows.append(row)
                _flush(rows, out_path)
                print(_fmt(row), flush=True)
                torch.cuda.empty_cache()


def sweep(args, bw: float, rows: list, out_path: Path | None) -> dict:
    """Launch-parameter sweep of the decode kernel at 32K context; returns the best setting (also applied)."""
    da = importlib.import_module("kvquant.kernels.decode_attention")

    dev = "cuda"
    best: dict = {}
    for shape, B in (("mha", 1), ("gqa", 8)):
        Hq, Hkv, D = SHAPES[shape]
        L = 32768
        for outl, rope_on in ((0.01, False), (0.0, False), (0.01, True)):
            cfg = QuantConfig(datatype=args.datatype, outlier_fraction=outl, n_sink=args.n_sink,
                              residual_length=args.residual, page_size=args.page_size)
            kc, vc = synthetic_caches(B, Hkv, D, L, cfg, torch.float16, dev)
            q = torch.randn(B, Hq, D, device=dev, dtype=torch.float16)
            rope = None
            if rope_on:
                e = torch.randn(L + 64, D, device=dev)
                rope = (e.cos(), e.sin(), torch.zeros(B, dtype=torch.int64, device=dev))
            grid = [(w, bt, pps) for w in (4, 8) for bt in (32, 64) for pps in (4, 16)]
            if outl == 0.0 or rope_on:
                grid = [(4, 64, 4), (8, 64, 16), (8, 32, 16)]
            for w, bt, pps in grid:
                fn = partial(da.decode_attention, q, kc, vc, rope=rope, backend="triton", num_warps=w, block_t=bt,
                             programs_per_sm=pps)
                fn()
                ms = _bench(fn)
                row = {"kind": "sweep", "shape": shape, "batch": B, "context": L, "outliers": outl, "rope": rope_on,
                       "num_warps": w, "block_t": bt, "programs_per_sm": pps, "ms": ms,
                       "frac_floor": _quant_bytes(B, Hkv, D, L, cfg) / bw / (ms * 1e-3)}
                rows.append(row)
                _flush(rows, out_path)
                print(f"sweep {shape} B={B} outl={outl} rope={rope_on} warps={w} bt={bt} pps={pps}: {ms:.3f} ms "
                      f"({row['frac_floor']:.2f} of floor)", flush=True)
                if outl > 0 and not rope_on:
                    key = (w, bt, pps)
                    best[key] = best.get(key, 0.0) + math.log(ms)
            del kc, vc
            torch.cuda.empty_cache()
    w, bt, pps = min(best, key=best.get)
    da.TUNING.update(num_warps=w, block_t=bt, programs_per_sm=pps)
    print(f"best launch: num_warps={w} block_t={bt} programs_per_sm={pps}", flush=True)
    return dict(da.TUNING)


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

    from kvquant.kernels.quantize_append import TUNING as QA_TUNING
    from kvquant.kernels.quantize_append import QuantizeAppend, quantize_append
    from kvquant.quant.quantizer import BatchedKVQuantizer

    dev = "cuda"
    D = 128
    base = QuantConfig(datatype=args.datatype, outlier_fraction=args.outliers, n_sink=args.n_sink,
                       residual_length=0, page_size=args.page_size)
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
                       "datatype": base.datatype, "outliers": base.outlier_fraction, "tuning": dict(QA_TUNING)}
                caches = {}
                for backend in ("triton", "torch"):
                    qz = BatchedKVQuantizer(replace(base, backend=backend))
                    fn = partial(qz.quantize_keys if kind == "keys" else qz.quantize_values, x)
                    caches[backend] = fn()
                    torch.cuda.synchronize()
                    row[f"append_{backend}_ms"] = _bench(fn, warmup=5, rep=60)
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
                row.update(nnz=nnz, bytes=nbytes, write_ms=_bench(write, warmup=10, rep=100))
                if kind == "values":  # the two ways to find the per-token thresholds (same result, bit for bit)
                    for method in ("sort", "topk"):
                        def write_with(cache=cache, counts=counts, tokens=tokens, method=method):
                            cache.outliers.nnz = cache.outliers.n_slots = 0
                            quantize_append(cache, counts, tokens, thresholds=method)

                        write_with()
                        row[f"write_thresholds_{method}_ms"] = _bench(write_with, warmup=10, rep=100)
                plan = QuantizeAppend(cache, counts, tokens)
                row["kernel_ms"] = _bench(plan.run_kernel, warmup=10, rep=100)
                sweep_rows = []
                if args.prefill_sweep:
                    for tree in (True, False):
                        for bn in (32, 64):
                            for nw in (2, 4, 8):
                                try:
                                    p = QuantizeAppend(cache, counts, tokens, block_n=bn, num_warps=nw,
                                                       code_tree=tree)
                                    p.run_kernel()
                                    ms = _bench(p.run_kernel, warmup=10, rep=100)
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
                _flush(rows, out_path)
                print(_fmt(row), flush=True)
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
                row[f"{backend}_ms"] = _bench(partial(c.append, step), warmup=5, rep=50)
                del c
            rows.append(row)
            _flush(rows, out_path)
            print(_fmt(row), flush=True)


def _flush(rows: list, out_path: Path | None) -> None:
    if out_path is not None:
        out_path.write_text(json.dumps(rows, indent=1))


def _fmt(r: dict) -> str:
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


def _bench_hf(name: str, row: dict, B: int, Hq: int, Hkv: int, L: int, D: int, dev: str, dtype: torch.dtype) -> None:
    """Add ``hf_<name>_ms`` (and its speed-up) to a decode row, or why it was not measured."""
    from kvquant.eval.baselines import baseline_available, tensor_bytes

    ok, why = baseline_available(name)
    if not ok:
        row[f"hf_{name}_ms"] = None
        row[f"hf_{name}_note"] = why
        return
    if 3 * 2 * B * Hkv * L * D * 2 > 0.7 * torch.cuda.mem_get_info()[0]:
        row[f"hf_{name}_ms"] = None
        row[f"hf_{name}_note"] = "does not fit (it dequantizes the whole layer every step)"
        return
    try:
        k = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype)
        step, cache = hf_quantized_step(name, torch.randn(B, Hq, 1, D, device=dev, dtype=dtype), k, v)
        del k, v
        row[f"hf_{name}_bytes"] = tensor_bytes(cache.layers[0].__dict__)
        row[f"hf_{name}_ms"] = _bench(step, warmup=5, rep=50)
        row[f"speedup_vs_hf_{name}"] = row[f"hf_{name}_ms"] / row["kernel_ms"]
    except torch.OutOfMemoryError:
        row[f"hf_{name}_ms"] = None
        row[f"hf_{name}_note"] = "out of memory"
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Entry point (``kvquant bench kernels``). Returns a process exit code."""
    p = argparse.ArgumentParser(prog="kvquant bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer configs (a few minutes)")
    p.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after every row")
    p.add_argument("--contexts", type=int, nargs="*", default=None)
    p.add_argument("--batches", type=int, nargs="*", default=None)
    p.add_argument("--shapes", nargs="*", default=["mha", "gqa"], choices=sorted(SHAPES))
    p.add_argument("--datatype", default="nuq3")
    p.add_argument("--outliers", type=float, default=0.01)
    p.add_argument("--n-sink", type=int, default=1)
    p.add_argument("--residual", type=int, default=32)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--rope", action="store_true", help="rotate keys in the kernel")
    p.add_argument("--no-dequant", action="store_true", help="skip the (slow) dequantize-everything path")
    p.add_argument("--hf-baselines", default="quanto4,hqq4",
                   help="transformers QuantizedCache backends to time per decode row (comma list; '' for none)")
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=None)
    p.add_argument("--prefill-shapes", nargs="*", default=["mha", "gqa"], choices=sorted(PREFILL_SHAPES))
    p.add_argument("--prefill-sweep", action="store_true", help="time the quantize kernel's launch variants")
    p.add_argument("--sweep", action="store_true", help="tune the decode kernel's launch first (32K context)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    args = p.parse_args(argv)
    args.hf_baselines = [x.strip() for x in args.hf_baselines.split(",") if x.strip()]
    if not torch.cuda.is_available():
        print("kvquant bench kernels: needs a CUDA GPU")
        return 1
    if args.contexts is None:
        args.contexts = [1024, 4096, 32768, 131072] if args.quick else [1024, 4096, 8192, 16384, 32768, 65536,
                                                                         131072]
    if args.batches is None:
        args.batches = [1, 8, 32] if args.quick else [1, 4, 8, 16, 32]
    if args.prefill_lengths is None:
        args.prefill_lengths = [4096, 32768]
    rows: list = []
    bw = copy_bandwidth("cuda")
    props = torch.cuda.get_device_properties(0)
    rows.append({"kind": "device", "name": props.name, "sms": props.multi_processor_count,
                 "copy_bw_GBps": bw / 1e9, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M")})
    print(f"{props.name}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        rows.append({"kind": "tuning", **sweep(args, bw, rows, args.out)})
    if not args.skip_decode:
        bench_decode(args, bw, rows, args.out)
    if not args.skip_prefill:
        bench_prefill(args, bw, rows, args.out)
    print("\n".join(_fmt(r) for r in rows if r["kind"] in ("decode", "prefill", "decode_append")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
