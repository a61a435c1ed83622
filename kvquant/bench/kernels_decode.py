"""Decode-attention rows of ``kvquant bench kernels`` (see :mod:`kvquant.bench.kernels`): synthetic caches, the
kernel vs fp16 SDPA, the dequantize-everything reference and transformers' ``QuantizedCache``, and the launch sweep."""

from __future__ import annotations

import importlib
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from kvquant.bench.cuda import do_bench, graph_bench, rotating
from kvquant.bench.kernel_rows import flush, format_row
from kvquant.config import QuantConfig
from kvquant.flags import quant_config_from_args
from kvquant.quant.store import QuantizedKVCache

SHAPES = {"mha": (32, 32, 128), "gqa": (32, 8, 128)}  # name -> (q heads, kv heads, head dim)


def heavy_tailed(shape: tuple[int, int, int, int], seed: int, dtype: torch.dtype, device: str,
                 channel_seed: int | None = None) -> torch.Tensor:
    """Keys/values with the statistics that make KV quantization hard, generated on ``device``: Student-t(4) samples
    with per-channel scales and 2 outlier channels per head (x15). ``channel_seed`` draws the channel scales and
    outlier channels apart from the samples, so pieces of one stream (different ``seed``) share them."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, S, D = shape
    x = torch.randn(shape, generator=g, device=device)
    x /= torch.randn((B, H, S, D, 4), generator=g, device=device).pow(2).mean(-1).sqrt()  # t(4)
    gc = g if channel_seed is None else torch.Generator(device=device).manual_seed(channel_seed)
    x *= 0.2 + 2.0 * torch.rand(1, H, 1, D, generator=gc, device=device)
    gain = torch.ones(H, D, device=device)
    gain.scatter_(1, torch.randint(0, D, (H, 2), generator=gc, device=device), 15.0)
    return (x * gain[None, :, None, :]).to(dtype)


#: Elements (batch x heads x tokens x head size) generated and quantized at once by :func:`synthetic_caches`: a
#: larger cache is prefilled with its first tokens and the rest appended in pieces of this size, so the generator's
#: float32 temporaries (about 20 bytes per element) stay near 5 GB (MHA at batch 32 x 32K would need ~90 GB at once).
SYNTH_CHUNK_ELEMENTS = 1 << 28


def synthetic_caches(
    B: int, Hkv: int, D: int, L: int, cfg: QuantConfig, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[QuantizedKVCache, QuantizedKVCache]:
    """A (keys, values) cache pair of ``L`` tokens per sequence: heavy-tailed K/V (:func:`heavy_tailed`) quantized
    by the cache's own writers (keys per channel with ranges from the data, values per token, ``cfg``'s outliers,
    sinks and residual window), plus one decode token, so every part of the format is present. Past
    :data:`SYNTH_CHUNK_ELEMENTS` the tokens after the first piece are appended piece by piece (the key ranges then
    come from the first piece; every piece of a stream has the same channel scales and outlier channels, so the
    outlier fraction is the configured one however the cache is built)."""
    from kvquant.quant.quantizer import BatchedKVQuantizer

    qz = BatchedKVQuantizer(cfg)
    step = max(1, SYNTH_CHUNK_ELEMENTS // (B * Hkv * D))
    n = L - 1
    first = min(n, step)

    def keys(shape: tuple[int, int, int, int], s: int) -> torch.Tensor:  # one stream: the same channels throughout
        return heavy_tailed(shape, s, dtype, device, channel_seed=seed + 10_000)

    def values(shape: tuple[int, int, int, int], s: int) -> torch.Tensor:
        return heavy_tailed(shape, s, dtype, device, channel_seed=seed + 10_001)

    kc = qz.quantize_keys(keys((B, Hkv, first, D), seed))
    vc = qz.quantize_values(values((B, Hkv, first, D), seed + 1))
    for i, t0 in enumerate(range(first, n, step)):
        t = min(step, n - t0)
        kc.append(keys((B, Hkv, t, D), seed + 4 + 2 * i))
        vc.append(values((B, Hkv, t, D), seed + 5 + 2 * i))
    kc.append(keys((B, Hkv, 1, D), seed + 2))
    vc.append(values((B, Hkv, 1, D), seed + 3))
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


def quant_bytes(kc: QuantizedKVCache, vc: QuantizedKVCache) -> int:
    """Bytes the kernel must read at least: everything the two caches hold (measured, ``memory_report``)."""
    return int(kc.memory_report()["total"] + vc.memory_report()["total"])


def rope_tables(L: int, D: int, device: str, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's ``cos, sin`` for positions ``0 .. L-1``, half tables ``[L, D/2]`` (the two halves are equal)."""
    inv = 1.0 / (base ** (torch.arange(0, D, 2, device=device).float() / D))
    f = torch.outer(torch.arange(L, device=device).float(), inv)
    return f.cos().contiguous(), f.sin().contiguous()


def bench_decode(args, bw: float, rows: list, out_path: Path | None, launch: dict | None = None) -> None:
    """Decode rows for every (shape, context, batch) of ``args``; ``launch``: the key and value passes' launch settings
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
                # an estimate, replaced by the measured one
                qbytes = int(B * Hkv * L * D * (cfg.key_bits + cfg.value_bits + 2) / 8)
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
                qbytes = quant_bytes(*caches[0])
                row["quant_bytes"] = qbytes
                row["bits_per_element"] = 8 * qbytes / (2 * B * Hkv * L * D)
                qs = [torch.randn(B, Hq, D, device=dev, dtype=dtype) for _ in range(n_sets)]
                extra = [(torch.randn(B, Hkv, D, device=dev, dtype=dtype), torch.randn(B, Hkv, D, device=dev,
                                                                                       dtype=dtype))
                         for _ in range(n_sets)]
                rope = None
                if args.rope:
                    cos, sin = rope_tables(L + 64, D, dev)
                    rope = (cos, sin, torch.zeros(B, dtype=torch.int32, device=dev))
                fns = [partial(decode_attention, qs[i], *caches[i], rope=rope, extra_kv=extra[i], **(launch or {}))
                       for i in range(n_sets)]
                out = fns[0]()
                for fn in fns[1:]:  # every cache's first read (lazy tables) before any graph capture
                    fn()
                torch.cuda.synchronize()
                row["kernel_ms"] = graph_bench(rotating(fns))  # device time: what a captured decode step pays
                row["kernel_eager_ms"] = do_bench(rotating(fns))  # with the host's launch cost
                row["kernel_floor_ms"] = qbytes / bw * 1e3
                row["kernel_frac_floor"] = row["kernel_floor_ms"] / row["kernel_ms"]
                # dequantize-everything path (memory hungry: ~40 B of temporaries per element)
                if B * Hkv * L * D * 48 < 0.7 * torch.cuda.mem_get_info()[0] and not args.no_dequant:
                    try:
                        ref = decode_attention_reference(qs[0], *caches[0], rope=rope, extra_kv=extra[0])
                        row["rel_err"] = float((out.float() - ref.float()).norm() / ref.float().norm())
                        row["dequant_ms"] = do_bench(
                            rotating([partial(decode_attention_reference, qs[i], *caches[i], rope=rope,
                                              extra_kv=extra[i], compute_dtype=dtype) for i in range(n_sets)]),
                            warmup=5, rep=50)
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
                    row["fp16_ms"] = graph_bench(rotating(sd))
                    row["fp16_eager_ms"] = do_bench(rotating(sd))
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
    """Launch-parameter sweep of the decode kernel at 32K context (graph-replayed device time); returns the best
    setting (``num_warps``, ``block_t``, ``num_stages``: what ``bench_decode`` then launches with)."""
    da = importlib.import_module("kvquant.kernels.decode_attention")

    dev = "cuda"
    best: dict = {}
    for shape, B in (("mha", 1), ("gqa", 8)):
        Hq, Hkv, D = SHAPES[shape]
        L = 32768
        cos, sin = rope_tables(L + 64, D, dev)
        for outl in (0.01, 0.0):
            cfg = quant_config_from_args(args, datatype=args.datatype, outlier_fraction=outl)
            kc, vc = synthetic_caches(B, Hkv, D, L, cfg, torch.float16, dev)
            q = torch.randn(B, Hq, D, device=dev, dtype=torch.float16)
            rope = (cos, sin, torch.zeros(B, dtype=torch.int32, device=dev))
            for w, bt, st in [(2, 32, 2), (2, 32, 3), (1, 16, 2), (4, 64, 2)]:
                fn = partial(da.decode_attention, q, kc, vc, rope=rope, num_warps=w, block_t=bt, num_stages=st)
                fn()
                ms = graph_bench(fn)
                row = {"kind": "sweep", "shape": shape, "batch": B, "context": L, "outliers": outl, "rope": True,
                       "num_warps": w, "block_t": bt, "num_stages": st, "ms": ms,
                       "frac_floor": quant_bytes(kc, vc) / bw / (ms * 1e-3)}
                rows.append(row)
                flush(rows, out_path)
                print(f"sweep {shape} B={B} outl={outl} warps={w} bt={bt} stages={st}: {ms:.3f} ms "
                      f"({row['frac_floor']:.2f} of floor)", flush=True)
                key = (w, bt, st)
                best[key] = best.get(key, 0.0) + math.log(ms)
            del kc, vc
            torch.cuda.empty_cache()
    w, bt, st = min(best, key=best.get)
    print(f"best launch: num_warps={w} block_t={bt} num_stages={st}", flush=True)
    return {"num_warps": w, "block_t": bt, "num_stages": st}


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
        row[f"hf_{name}_ms"] = do_bench(step, warmup=5, rep=50)  # (eager: its update is not graph-safe)
        row[f"speedup_vs_hf_{name}"] = row[f"hf_{name}_ms"] / row["kernel_eager_ms"]
    except torch.OutOfMemoryError:
        row[f"hf_{name}_ms"] = None
        row[f"hf_{name}_note"] = "out of memory"
    torch.cuda.empty_cache()
