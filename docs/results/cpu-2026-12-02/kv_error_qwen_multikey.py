"""Why 2-bit caches lose multi-key needles on Qwen2.5-Coder-1.5B: where the stored K/V differ from the exact ones.

One ``niah_multikey_1`` prompt (depth 50 %, sample 0, seed 0, the essays haystack) is run the way ``kvquant eval
longctx`` runs it: the context prefilled in one forward, then the question fed through the cache. When the first
answer token is fed, every layer's ``update`` returns the whole stored context (dequantized, post-RoPE); this compares
it with the exact K/V: relative L2 error of keys and of values over the context, on the queried needle's tokens and
on the question's tokens, and the greedy answer. Caches: nuq2 and nuq3 (no residual window, the default), nuq2 with
a 128-token exact residual window (what KIVI keeps), and transformers' KIVI-style 2-bit cache (quanto2k).

    OMP_NUM_THREADS=2 python docs/results/cpu-2026-12-02/kv_error_qwen_multikey.py CALIBRATION [LENGTH] \
        > kv_error_qwen_multikey.txt
"""

import sys

import torch

from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig
from kvquant.data import load_text
from kvquant.eval.longctx.caches import make_cache, parse_cache
from kvquant.eval.longctx.haystack import Haystack
from kvquant.eval.longctx.runner import PromptEncoder
from kvquant.eval.longctx.scoring import string_match_all
from kvquant.eval.longctx.tasks import make_sample
from kvquant.models import load_model
from kvquant.quant.calibration_file import Calibration

cal = Calibration.load(sys.argv[1])
length = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
model, tok, spec = load_model("qwen2.5-coder-1.5b", dtype="float32")
enc = PromptEncoder(tok, spec.bos_id)
hay = Haystack(load_text("pg-essays", "test"))
sample = make_sample("niah_multikey_1", length, 50, 0, enc.count, haystack=hay, seed=0)
ctx_ids = enc.encode(sample.context)
ids = torch.tensor([enc.encode(sample.prompt)])
split = len(ctx_ids)  # context | question
lo = len(enc.encode(sample.context[: sample.needle_chars]))
hi = len(enc.encode(sample.context[: sample.context.index(".", sample.needle_chars) + 1]))
CACHES = {"nuq2": ("nuq2", 0), "nuq3": ("nuq3", 0), "nuq2, residual 128": ("nuq2", 128), "quanto2k": ("quanto2k", 0)}


def kv_of(name: str, residual: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """Per layer, the prompt's K/V as the cache returns them when the first answer token is fed; the greedy answer."""
    cache = make_cache(parse_cache(name), model, cal if name != "fp16" else None, QuantConfig(residual_length=residual))
    kw = cache_kwargs(model, cache)
    S = ids.shape[1]
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    update = cache.update

    def record(k, v, layer_idx, *args, **kwargs):
        out = update(k, v, layer_idx, *args, **kwargs)
        if len(got) < len(model.model.layers):
            got[layer_idx] = (out[0][..., :S, :].clone(), out[1][..., :S, :].clone())
        return out

    answer: list[int] = []
    with torch.no_grad():
        model(input_ids=ids[:, :split], use_cache=True, logits_to_keep=1, **kw)
        logits = model(input_ids=ids[:, split:], position_ids=torch.arange(split, S)[None], use_cache=True,
                       logits_to_keep=1, **kw).logits
        cache.update = record
        for i in range(sample.max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt in eos:
                break
            answer.append(nxt)
            logits = model(input_ids=torch.tensor([[nxt]]), position_ids=torch.tensor([[S + i]]), use_cache=True,
                           logits_to_keep=1, **kw).logits
    return [got[i] for i in sorted(got)], tok.decode(answer, skip_special_tokens=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


gen_eos = model.generation_config.eos_token_id
eos = {tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])} - {None}
exact, exact_answer = kv_of("fp16", 0)
print(f"prompt {ids.shape[1]} tokens (context {split}, question {ids.shape[1] - split}); needle tokens {lo}..{hi}; "
      f"answer {sample.answers}; exact cache: {exact_answer!r}")
print("cache | key err | value err | key err, needle | value err, needle | key err, question | value err, question | "
      "worst layer (key err) | answer")
for label, (name, residual) in CACHES.items():
    got, answer = kv_of(name, residual)

    def err(i: int, a: int, b: int, got=got) -> float:
        return rel(torch.cat([g[i][..., a:b, :] for g in got]), torch.cat([e[i][..., a:b, :] for e in exact]))

    per_layer = [rel(g[0], e[0]) for g, e in zip(got, exact)]
    worst = max(range(len(per_layer)), key=per_layer.__getitem__)
    S = ids.shape[1]
    print(f"{label} | {err(0, 0, S):.3f} | {err(1, 0, S):.3f} | {err(0, lo, hi):.3f} | {err(1, lo, hi):.3f} | "
          f"{err(0, split, S):.3f} | {err(1, split, S):.3f} | {worst} ({per_layer[worst]:.3f}) | "
          f"{answer!r} ({100 * string_match_all(answer, sample.answers):.0f} %)", flush=True)
