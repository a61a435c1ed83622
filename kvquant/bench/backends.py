"""``model.generate`` with the cache's torch and triton backends side by side: the same greedy tokens?

A random-weight Llama (:func:`kvquant.models.tiny_llama`; 4 layers, 32/8 heads, head size 128), a batch of
left-padded prompts (padding 0 / 131 / 517 / 1203 tokens), greedy ``generate`` with a nuq3 :class:`KVQuantCache`
(1 % outliers, 32-token residual window) on each backend: the token sequences (first divergence and logit gap if
they differ), decode tokens/s (prefill timed separately and removed; best of two) and, on the triton backend, one
layer-step's kernel call and append (keys + values) timed apart. Needs a CUDA GPU.

Run: ``python -m kvquant.bench.backends [--dtypes float32,float16] [--new-tokens 64] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from kvquant.bench.cuda import copy_bandwidth, do_bench
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig


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
    cache = KVQuantCache(model, cfg, backend="triton")
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
    layer = cache.layers[0]
    q = torch.randn(batch, 32, 128, device="cuda", dtype=dtype)
    kv1 = torch.randn(batch, 8, 1, 128, device="cuda", dtype=dtype)
    rope = (*cache.kernel_rope_tables(q.device), layer.pos_offset)
    k_ms = do_bench(partial(cache.ops.decode_attention, q, layer.qkeys, layer.qvalues, rope=rope,
                            extra_kv=(kv1[:, :, 0], kv1[:, :, 0])))

    def append() -> None:
        layer.qkeys.append(kv1)
        layer.qvalues.append(kv1)

    a_ms = do_bench(append, warmup=5, rep=50)
    row = {"part": "e2e_breakdown", "dtype": str(dtype).removeprefix("torch."), "kernel_ms_per_layer": k_ms,
           "append_ms_per_layer": a_ms}
    rows.append(row)
    print(f"per layer and step: kernel {k_ms:.3f} ms, append (K+V) {a_ms:.3f} ms", flush=True)
    kernel_attention.uninstall_kernel_attention(model)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over entries finite in both (generate's processors put -inf on banned tokens)."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b)[ok].abs().max()) if bool(ok.any()) else float("nan")


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over entries finite in both (generate's processors put -inf on banned tokens)."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b)[ok].abs().max()) if bool(ok.any()) else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvquant.bench.backends", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file of the rows")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtypes", "--e2e-dtypes", default="float16",
                   help="comma list of model dtypes (float32 makes greedy ties rare)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m kvquant.bench.backends: needs a CUDA GPU")
        return 1
    rows: list = []
    bw = copy_bandwidth("cuda")
    rows.append({"part": "device", "name": torch.cuda.get_device_name(), "copy_bw_GBps": bw / 1e9})
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    try:
        for name in args.dtypes.split(","):
            e2e(rows, args.prompt, args.new_tokens, args.batch, getattr(torch, name.strip()))
    finally:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
