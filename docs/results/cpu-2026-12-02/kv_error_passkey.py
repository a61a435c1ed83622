"""Keys vs values: how far the cache's stored K/V are from the exact ones on a passkey prompt, per datatype.

Prefills the context of passkey sample 0 (2K tokens, SmolLM2-135M, depth 0/50/100, seed 0) into a DynamicCache and
into kvquant caches, feeds one more token, and compares what each cache's ``update`` returns for the context
(dequantized, post-RoPE) with the exact K/V: relative L2 error of keys and of values over all layers, and the same
restricted to the needle's tokens. Also the same for transformers' KIVI-style quanto2k.

    OMP_NUM_THREADS=1 python docs/results/cpu-2026-12-02/kv_error_passkey.py CALIBRATION > kv_error_passkey.txt
"""

import sys

import torch

from kvquant.cache.hf_compat import cache_kwargs
from kvquant.eval.longctx.caches import make_cache, parse_cache
from kvquant.eval.longctx.runner import PromptEncoder
from kvquant.eval.longctx.tasks import make_sample
from kvquant.models import load_model
from kvquant.quant.calibration_file import Calibration

cal = Calibration.load(sys.argv[1]) if len(sys.argv) > 1 else None
model, tok, spec = load_model("smollm2-135m")
enc = PromptEncoder(tok, spec.bos_id)


def kv_of(name: str, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the context's K/V as the cache returns them when the next token is fed."""
    cache = make_cache(parse_cache(name), model, cal if name != "fp16" else None)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    update = cache.update

    def record(k, v, layer_idx, *args, **kwargs):
        out = update(k, v, layer_idx, *args, **kwargs)
        got[layer_idx] = (out[0][..., : ids.shape[1] - 1, :].clone(), out[1][..., : ids.shape[1] - 1, :].clone())
        return out

    with torch.no_grad():
        model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        cache.update = record
        model(input_ids=ids[:, -1:], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return [got[i] for i in sorted(got)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


print("depth | cache | key rel. err | value rel. err | key err on needle | value err on needle")
for depth in (0, 50, 100):
    s = make_sample("passkey", 2048, depth, 0, enc.count, seed=0, max_new_tokens=12)
    ids = torch.tensor([enc.encode(s.context)])
    lo = len(enc.encode(s.context[: s.needle_chars]))
    hi = lo + len(enc.encode(s.context[s.needle_chars:].split("pass key.")[0] + "pass key."))
    exact = kv_of("fp16", ids)
    for name in ("nuq4", "nuq3", "nuq2", "quanto2k"):
        got = kv_of(name, ids)
        k = rel(torch.cat([g[0] for g in got]), torch.cat([e[0] for e in exact]))
        v = rel(torch.cat([g[1] for g in got]), torch.cat([e[1] for e in exact]))
        kn = rel(torch.cat([g[0][..., lo:hi, :] for g in got]), torch.cat([e[0][..., lo:hi, :] for e in exact]))
        vn = rel(torch.cat([g[1][..., lo:hi, :] for g in got]), torch.cat([e[1][..., lo:hi, :] for e in exact]))
        print(f"{depth} | {name} | {k:.3f} | {v:.3f} | {kn:.3f} | {vn:.3f}", flush=True)
