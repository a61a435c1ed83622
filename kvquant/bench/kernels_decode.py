"""Decode-attention rows of ``kvquant bench kernels`` (see :mod:`kvquant.bench.kernels`): synthetic caches, the
kernel vs fp16 SDPA, the dequantize-everything reference and transformers' ``QuantizedCache``, and the launch sweep."""

from __future__ import annotations

import importlib
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from kvquant.bench.cuda import do_bench, rotating
from kvquant.bench.kernel_rows import flush, format_row
from kvquant.config import QuantConfig
from kvquant.flags import quant_config_from_args
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


def quant_bytes(B: int, Hkv: int, D: int, L: int, cfg: QuantConfig, dtype_bytes: int = 2) -> int:
    """Bytes the kernel must read: codes, value scales, outliers (values, indices, slot start/count),
    sinks/residual (the query/output are negligible)."""
    q = L - cfg.n_sink - cfg.residual_length
    per_tok_head = 2 * D * cfg.bits / 8 + 2 * 2  # K+V codes, value scale+zero (fp16)
    outl = 2 * (q * cfg.outlier_fraction * Hkv * D * 4 + q * 6)  # entries + per-slot (start, count)
    exact = 2 * (cfg.n_sink + cfg.residual_length) * Hkv * D * dtype_bytes
    return int(B * (q * Hkv * per_tok_head + outl + exact))


def bench_decode(args, bw: float, rows: list, out_path: Path | None, launch: dict | None = None) -> None:
    """Decode rows for every (shape, context, batch) of ``args``; ``launch``: the page kernel's launch settings
    (default: :mod:`kvquant.kernels.decode_attention`'s)."""
    from kvquant.kernels.decode_attention import decode_attention
    from kvquant.kernels.reference import decode_attention_reference

    dev = "cuda"
    dtype = torch.float16
    cfg = quant_config_from_args(args, datatype=args.datatype)
    for shape in args.shapes:
        Hq, Hkv, D = SHAPES[shape]
        for L in args.contexts:
            for B in args.batches:
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0]
                qbytes = quant_bytes(B, Hkv, D, L, cfg)
                fbytes = 2 * B * Hkv * L * D * 2
                row = {"kind": "decode", "shape": shape, "Hq": Hq, "Hkv": Hkv, "D": D, "context": L, "batch": B,
                       "datatype": cfg.datatype, "outliers": cfg.outlier_fraction, "rope": args.rope,
                       "quant_bytes": qbytes, "fp16_bytes": fbytes}
                if 3 * qbytes > 0.8 * free:
                    row["skipped"] = "quantized cache does not fit"
                    rows.append(row)
                    flush(rows, out_path)
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
                fns = [partial(decode_attention, qs[i], *caches[i], rope=rope, **(launch or {}))
                       for i in range(n_sets)]
                out = fns[0]()
                torch.cuda.synchronize()
                row["kernel_ms"] = do_bench(rotating(fns))
                row["kernel_floor_ms"] = qbytes / bw * 1e3
                row["kernel_frac_floor"] = row["kernel_floor_ms"] / row["kernel_ms"]
                # dequantize-everything path (memory hungry: ~40 B of temporaries per element)
                if B * Hkv * L * D * 48 < 0.7 * torch.cuda.mem_get_info()[0] and not args.no_dequant:
                    try:
                        ref = decode_attention_reference(qs[0], *caches[0], rope=rope)
                        row["rel_err"] = float((out.float() - ref.float()).norm() / ref.float().norm())
                        row["dequant_ms"] = do_bench(
                            rotating([partial(decode_attention_reference, qs[i], *caches[i], rope=rope,
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
                    row["fp16_ms"] = do_bench(rotating(sd))
                    row["fp16_floor_ms"] = fbytes / bw * 1e3
                    row["speedup_vs_fp16"] = row["fp16_ms"] / row["kernel_ms"]
                    del kv, q4
                if row.get("dequant_ms"):
                    row["speedup_vs_dequant"] = row["dequant_ms"] / row["kernel_ms"]
                for name in args.hf_baselines:
                    bench_hf(name, row, B, Hq, Hkv, L, D, dev, dtype)
                rows.append(row)
                flush(rows, out_path)
                print(format_row(row), flush=True)
                torch.cuda.empty_cache()


def sweep(args, bw: float, rows: list, out_path: Path | None) -> dict:
    """Launch-parameter sweep of the decode kernel at 32K context; returns the best setting (``num_warps``,
    ``block_t``, ``programs_per_sm``: what ``bench_decode`` then launches with)."""
    da = importlib.import_module("kvquant.kernels.decode_attention")

    dev = "cuda"
    best: dict = {}
    for shape, B in (("mha", 1), ("gqa", 8)):
        Hq, Hkv, D = SHAPES[shape]
        L = 32768
        for outl, rope_on in ((0.01, False), (0.0, False), (0.01, True)):
            cfg = quant_config_from_args(args, datatype=args.datatype, outlier_fraction=outl)
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
                fn = partial(da.decode_attention, q, kc, vc, rope=rope, num_warps=w, block_t=bt,
                             programs_per_sm=pps)
                fn()
                ms = do_bench(fn)
                row = {"kind": "sweep", "shape": shape, "batch": B, "context": L, "outliers": outl, "rope": rope_on,
                       "num_warps": w, "block_t": bt, "programs_per_sm": pps, "ms": ms,
                       "frac_floor": quant_bytes(B, Hkv, D, L, cfg) / bw / (ms * 1e-3)}
                rows.append(row)
                flush(rows, out_path)
                print(f"sweep {shape} B={B} outl={outl} rope={rope_on} warps={w} bt={bt} pps={pps}: {ms:.3f} ms "
                      f"({row['frac_floor']:.2f} of floor)", flush=True)
                if outl > 0 and not rope_on:
                    key = (w, bt, pps)
                    best[key] = best.get(key, 0.0) + math.log(ms)
            del kc, vc
            torch.cuda.empty_cache()
    w, bt, pps = min(best, key=best.get)
    print(f"best launch: num_warps={w} block_t={bt} programs_per_sm={pps}", flush=True)
    return {"num_warps": w, "block_t": bt, "programs_per_sm": pps}


def bench_hf(name: str, row: dict, B: int, Hq: int, Hkv: int, L: int, D: int, dev: str, dtype: torch.dtype) -> None:
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
        row[f"hf_{name}_ms"] = do_bench(step, warmup=5, rep=50)
        row[f"speedup_vs_hf_{name}"] = row[f"hf_{name}_ms"] / row["kernel_ms"]
    except torch.OutOfMemoryError:
        row[f"hf_{name}_ms"] = None
        row[f"hf_{name}_note"] = "out of memory"
    torch.cuda.empty_cache()
