"""Where a decode-attention call's device time goes: per-kernel device time (torch.profiler) of
``kvquant.kernels.decode_attention`` over synthetic nuq caches, with and without outliers, beside fp16 SDPA.

    PYTHONPATH=$PWD python scripts/profile_decode.py --out results.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F

import kvquant.kernels.decode_attention as da
from kvquant.bench.cuda import graph_bench
from kvquant.bench.kernels_decode import SHAPES, rope_tables, synthetic_caches
from kvquant.config import QuantConfig
from kvquant.kernels.decode_attention import decode_attention
from kvquant.kernels.reference import decode_attention_reference


def kernel_times(fn, iters: int = 20, plain: bool = False) -> dict[str, float]:
    """Mean device microseconds per call of every kernel ``fn`` launches (``plain``: only call it, for ncu)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if plain:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            acc[ev.name[:60]] += ev.device_time / iters
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile_decode.json")
    ap.add_argument("--cases", nargs="*", default=["mha:1:32768", "gqa:8:32768", "mha:8:32768"])
    ap.add_argument("--variants", nargs="*", default=[],
                    help="variants to time (graph-replayed, 1 %% outliers), e.g. w=2,bt=32,st=2,OUTLIER_SPLIT=16: "
                         "page-kernel warps/tile/stages and module constants of kvquant.kernels.decode_attention")
    ap.add_argument("--plain", action="store_true",
                    help="call the kernels without torch.profiler (no times, no variants), e.g. under "
                         "ncu -k 'regex:^(keys|values|key_corr|value_outliers|exact)_kernel$' (not reduce_kernel: "
                         "PyTorch's reductions share that name)")
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        shape, B, L = case.split(":")
        B, L = int(B), int(L)
        Hq, Hkv, D = SHAPES[shape]
        cos, sin = rope_tables(L + 64, D, "cuda")
        for f in (0.01, 0.0):
            cfg = QuantConfig(datatype="nuq3", outlier_fraction=f, residual_length=0, min_range_tokens=1)
            kc, vc = synthetic_caches(B, Hkv, D, L, cfg, torch.float16, "cuda")
            q = torch.randn(B, Hq, D, device="cuda", dtype=torch.float16)
            rope = (cos, sin, torch.zeros(B, dtype=torch.int32, device="cuda"))
            t = kernel_times(partial(decode_attention, q, kc, vc, rope=rope), plain=args.plain)
            row = {"shape": shape, "batch": B, "context": L, "outliers": f, "kernels_us": t,
                   "total_us": sum(t.values())}
            if B * Hkv * L * D * 48 < 0.5 * torch.cuda.mem_get_info()[0]:
                out = decode_attention(q, kc, vc, rope=rope).float()
                ref = decode_attention_reference(q, kc, vc, rope=rope).float()
                row["rel_err"] = float((out - ref).norm() / ref.norm())
                del out, ref
            for v in args.variants if f > 0 and not args.plain else []:
                kw, saved = {}, {}
                for item in v.split(","):
                    name, val = item.split("=")
                    if name.isupper():
                        saved[name] = getattr(da, name)
                        setattr(da, name, int(val))
                    else:
                        kw[{"w": "num_warps", "bt": "block_t", "st": "num_stages"}[name]] = int(val)
                fn = partial(decode_attention, q, kc, vc, rope=rope, **kw)
                try:
                    out = fn().float()
                    ref = decode_attention_reference(q, kc, vc, rope=rope).float()
                    err = float((out - ref).norm() / ref.norm())
                    row.setdefault("variants_ms", {})[v] = (graph_bench(fn), err)
                except Exception as exc:  # a variant Triton cannot compile: recorded, the others still run
                    row.setdefault("variants_failed", {})[v] = str(exc).splitlines()[-1][:200]
                finally:
                    for name, val in saved.items():
                        setattr(da, name, val)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as fh:  # after every case: a crash loses nothing measured
                json.dump(rows, fh, indent=1)
            del kc, vc
            torch.cuda.empty_cache()
        k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        q4 = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
        t = kernel_times(partial(F.scaled_dot_product_attention, q4, k, v, enable_gqa=Hq != Hkv), plain=args.plain)
        rows.append({"shape": shape, "batch": B, "context": L, "fp16_sdpa_us": sum(t.values())})
        print(json.dumps(rows[-1]), flush=True)
        del k, v
        torch.cuda.empty_cache()
    from kvquant.kernels.jit import decode_attention as jit
    for name in ("keys_kernel", "values_kernel", "key_corr_kernel", "value_outliers_kernel", "exact_kernel",
                 "reduce_kernel"):
        fn = getattr(jit, name)
        try:
            for cache in fn.device_caches.values():
                for ker in cache[0].values():
                    ker._init_handles()
                    info = {"kernel": name, "n_regs": ker.n_regs, "n_spills": ker.n_spills,
                            "shared": ker.metadata.shared, "num_warps": ker.metadata.num_warps}
                    rows.append(info)
                    print(json.dumps(info), flush=True)
        except Exception as exc:  # best effort: Triton's internals move
            print(name, "no resource report:", exc)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
