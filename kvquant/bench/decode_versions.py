"""Decode-kernel versions side by side, and end-to-end greedy decoding with the torch vs triton cache backends.

Part 1 (``kernels``): at 32K context, MHA (32/32 heads) B=1 and GQA (32/8) B=8, head size 128, fp16, 3-bit with
1 % outliers: fp16 SDPA over a dense cache, and each page-kernel version / launch setting, with the fraction
of the bandwidth floor (bytes the kernel must read / measured copy bandwidth).

Part 2 (``e2e``): a random-weight Llama (``kvquant.models.tiny_llama``; 4 layers, 32/8 heads, head size 128,
fp16), batch 4 left-padded prompts of ~2K tokens, greedy ``generate``: the token sequences of both backends
(first divergence and logit gap if they differ) and decode tokens/s (prefill timed separately and removed).

Run: ``python -m kvquant.bench.decode_versions [--skip-e2e] [--skip-kernels] [--out results.json]``.
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

from kvquant.bench.kernels import SHAPES, _bench, _quant_bytes, _rotating, copy_bandwidth, synthetic_caches
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig

VARIANTS = [  # (label, version, num_warps, block_t, programs_per_sm)
    ("v2", 2, 4, 64, 4),
    ("v3", 3, 4, 64, 4),
    ("v3b", "3b", 4, 64, 4),
    ("v3b bt32", "3b", 4, 32, 4),
    ("v3b pps16", "3b", 4, 64, 16),
]


def kernels(rows: list, bw: float, L: int, variants: list) -> None:
    da = importlib.import_module("kvquant.kernels.decode_attention")
    dev, dtype = "cuda", torch.float16
    for shape, B in (("mha", 1), ("gqa", 8)):
        Hq, Hkv, D = SHAPES[shape]
        fbytes = 2 * B * Hkv * L * D * 2
        n16 = max(1, min(4, math.ceil(200e6 / fbytes)))
        kv = [(torch.randn(B, Hkv, L, D, device=dev, dtype=dtype), torch.randn(B, Hkv, L, D, device=dev, dtype=dtype))
              for _ in range(n16)]
        q4 = [torch.randn(B, Hq, 1, D, device=dev, dtype=dtype) for _ in range(n16)]
        fp16_ms = _bench(_rotating([partial(F.scaled_dot_product_attention, q4[i], *kv[i], enable_gqa=Hq != Hkv)
                                    for i in range(n16)]))
        del kv, q4
        torch.cuda.empty_cache()
        rows.append({"part": "kernels", "shape": shape, "batch": B, "context": L, "what": "fp16_sdpa", "ms": fp16_ms,
                     "frac_floor": fbytes / bw / (fp16_ms * 1e-3)})
        print(f"{shape} B={B} L={L}: fp16 SDPA {fp16_ms:.3f} ms", flush=True)
        for outl, rope_kind in ((0.01, None), (0.0, None), (0.01, "half")):
            cfg = QuantConfig(datatype="nuq3", outlier_fraction=outl, n_sink=1, residual_length=32, page_size=64)
            qbytes = _quant_bytes(B, Hkv, D, L, cfg)
            n_sets = max(1, min(3, math.ceil(200e6 / qbytes)))
            caches = [synthetic_caches(B, Hkv, D, L, cfg, dtype, dev, seed=s) for s in range(n_sets)]
            qs = [torch.randn(B, Hq, D, device=dev, dtype=dtype) for _ in range(n_sets)]
            rope = None
            if rope_kind:
                inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D))
                f = torch.outer(torch.arange(L + 64, device=dev).float(), inv)
                rope = (f.cos(), f.sin(), torch.zeros(B, dtype=torch.int64, device=dev))
            ref = None
            for label, version, w, bt, pps in variants:
                if (rope_kind or outl == 0.0) and label not in ("v2", "v3", best_label(rows, shape)):
                    continue
                fns = [partial(da.decode_attention, qs[i], *caches[i], rope=rope, backend="triton", version=version,
                               num_warps=w, block_t=bt, programs_per_sm=pps) for i in range(n_sets)]
                out = fns[0]().float()
                ref = out if ref is None else ref
                agree = float((out - ref).norm() / ref.norm())
                ms = _bench(_rotating(fns))
                row = {"part": "kernels", "shape": shape, "batch": B, "context": L, "what": label, "outliers": outl,
                       "rope": rope_kind, "ms": ms, "floor_ms": qbytes / bw * 1e3,
                       "frac_floor": qbytes / bw / (ms * 1e-3), "vs_fp16": fp16_ms / ms, "rel_diff_vs_v2": agree}
                rows.append(row)
                print(f"  {label:12s} outl={outl} rope={rope_kind}: {ms:.3f} ms, {row['frac_floor']:.2f} of floor, "
                      f"x{row['vs_fp16']:.2f} vs fp16, diff vs v2 {agree:.1e}", flush=True)
            del caches
            torch.cuda.empty_cache()


def best_label(rows: list, shape: str) -> str:
    cand = [r for r in rows if r.get("shape") == shape and r.get("outliers") == 0.01 and r.get("rope") is None
            and r["what"].startswith("v3")]
    return min(cand, key=lambda r: r["ms"])["what"] if cand else "v3"


def e2e(rows: list, prompt: int, new_tokens: int, batch: int, dtype: torch.dtype = torch.float16) -> None:
    from kvquant.cache import kernel_attention
    from kvquant.cache.hf_cache import KVQuantCache
    from kvquant.models import tiny_llama

    model = tiny_llama(seed=0, dtype=dtype, num_layers=4, hidden=2048, heads=32, kv_heads=8, head_dim=128,
                       vocab=4096, max_pos=prompt + new_tokens + 64, intermediate=5632).cuda()
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 4096, (batch, prompt), generator=g).cuda()
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : [0, 131, 517, 1203][b % 4]] = 0
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=32, page_size=64)
    res = {}
    for backend in ("torch", "triton"):
        times = {}
        for n in (1, new_tokens):  # prefill + 1 token, then the full run: decode time = difference
            best = float("inf")
            for _ in range(2):
                cache = KVQuantCache(model, cfg, backend=backend)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache),
                                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                         output_scores=True, return_dict_in_generate=True)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            times[n] = best
        res[backend] = out
        tok_s = batch * (new_tokens - 1) / (times[new_tokens] - times[1])
        row = {"part": "e2e", "backend": backend, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
               "prompt": prompt, "new_tokens": new_tokens,
               "total_s": times[new_tokens], "prefill_plus_one_s": times[1], "decode_tok_per_s": tok_s}
        rows.append(row)
        print(f"e2e {backend}: decode {tok_s:.1f} tokens/s (batch {batch}, {new_tokens} new tokens, total "
              f"{times[new_tokens]:.2f} s)", flush=True)
        kernel_attention.uninstall_kernel_attention(model)
    a, b = res["torch"].sequences, res["triton"].sequences
    same = torch.equal(a, b)
    info = {"part": "e2e", "dtype": str(dtype).removeprefix("torch."), "identical_tokens": same,
            "tokens_compared": int(a.shape[0] * (a.shape[1] - ids.shape[1]))}
    if not same:
        diff = (a != b).nonzero()
        first = int(diff[:, 1].min()) - ids.shape[1]
        sa, sb = res["torch"].scores[first].float(), res["triton"].scores[first].float()
        top2 = sa.topk(2, dim=-1).values
        info.update(first_divergent_step=first, rows=diff[:, 0].unique().tolist(),
                    max_logit_gap=_gap(sa, sb),
                    torch_top2_margin=float((top2[:, 0] - top2[:, 1]).min()))
    gaps = [_gap(x.float(), y.float()) for x, y in zip(res["torch"].scores, res["triton"].scores)]
    info["max_logit_gap_until_divergence"] = max(gaps[: info.get("first_divergent_step", len(gaps)) + 1])
    rows.append(info)
    print("e2e greedy:", info, flush=True)
    # where a triton decode step's time goes: one layer's kernel call vs appending one token (keys + values)
    da = importlib.import_module("kvquant.kernels.decode_attention")
    cache = KVQuantCache(model, cfg, backend="triton")
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
    layer = cache.layers[0]
    q = torch.randn(batch, 32, 128, device="cuda", dtype=dtype)
    kv1 = torch.randn(batch, 8, 1, 128, device="cuda", dtype=dtype)
    rope = (*cache.kernel_rope_tables(q.device), layer.pos_offset)
    k_ms = _bench(partial(da.decode_attention, q, layer.qkeys, layer.qvalues, rope=rope, backend="triton",
                          extra_kv=(kv1[:, :, 0], kv1[:, :, 0])))

    def append() -> None:
        layer.qkeys.append(kv1)
        layer.qvalues.append(kv1)

    a_ms = _bench(append, warmup=5, rep=50)
    row = {"part": "e2e_breakdown", "dtype": str(dtype).removeprefix("torch."), "kernel_ms_per_layer": k_ms,
           "append_ms_per_layer": a_ms}
    rows.append(row)
    print(f"per layer and step: kernel {k_ms:.3f} ms, append (K+V) {a_ms:.3f} ms", flush=True)
    kernel_attention.uninstall_kernel_attention(model)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over entries finite in both (generate's processors put -inf on banned tokens)."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b)[ok].abs().max()) if bool(ok.any()) else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--e2e-dtypes", default="float16",
                   help="comma list of model dtypes for the end-to-end part (float32 makes greedy ties rare)")
    args = p.parse_args(argv)
    rows: list = []
    bw = copy_bandwidth("cuda")
    rows.append({"part": "device", "name": torch.cuda.get_device_name(), "copy_bw_GBps": bw / 1e9})
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    try:
        if not args.skip_e2e:
            for name in args.e2e_dtypes.split(","):
                e2e(rows, args.prompt, args.new_tokens, args.batch, getattr(torch, name.strip()))
        if not args.skip_kernels:
            kernels(rows, bw, args.context, VARIANTS)
    finally:
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
