"""Wikitext-2 perplexity computed *through* the quantized cache.

Protocol (per window of ``ctx`` tokens, non-overlapping windows of the test split):

1. prefill the first ``prefill`` tokens into the cache (they attend to each other exactly, as a real
   prompt does; their K/V are then quantized);
2. feed the remaining tokens in chunks of ``chunk`` tokens; every token of a chunk attends to the
   *dequantized* cache of everything before the chunk (and exactly to the earlier tokens of its own
   chunk, which become quantized once the chunk is appended);
3. score the next-token predictions of the continuation positions only (``ctx - prefill - 1`` tokens per
   window).

With ``chunk = 1`` every scored token reads a fully quantized past, exactly like generation. The
``fp16`` row uses the same protocol with an unquantized cache, and equals the model's plain perplexity
on the same scored tokens (reported as ``plain``), which checks the plumbing.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig
from kvquant.eval.baselines import baseline_memory, make_baseline_cache, parse_baseline
from kvquant.files import write_json_atomic
from kvquant.quant.calibration_file import Calibration


@dataclass
class PerplexityResult:
    datatype: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    bits_per_element: float | None
    seconds: float
    delta_ppl: float | None = None
    delta_ppl_pct: float | None = None


def cache_factory(name: str, model: torch.nn.Module, calibration: Calibration | None,
                  base: QuantConfig) -> Callable[[], object | None]:
    """A function making a fresh cache for datatype ``name`` (``plain`` = no cache, one forward)."""
    from dataclasses import replace

    if name == "plain":
        return lambda: None
    if parse_baseline(name) is not None:
        return lambda: make_baseline_cache(name, model)
    cfg = replace(base, datatype=name)
    calib = calibration if cfg.is_quantized else None
    return lambda: KVQuantCache(model, cfg, calibration=calib)


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, cache: object | None, prefill: int, chunk: int
               ) -> tuple[float, int]:
    """Summed NLL of the continuation predictions of windows ``ids [b, ctx]`` and how many were scored."""
    ctx = ids.shape[1]
    targets = ids[:, prefill + 1:]
    if cache is None:
        logits = model(input_ids=ids).logits[:, prefill:-1]
        return float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")), targets.numel()
    model(input_ids=ids[:, :prefill], **cache_kwargs(model, cache), use_cache=True)
    nll = 0.0
    for start in range(prefill, ctx - 1, chunk):
        stop = min(start + chunk, ctx - 1)
        logits = model(input_ids=ids[:, start:stop], **cache_kwargs(model, cache), use_cache=True).logits
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), ids[:, start + 1:stop + 1].flatten(),
                                     reduction="sum"))
    return nll, targets.numel()


def evaluate_perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    datatypes: list[str],
    calibration: Calibration | None = None,
    base_config: QuantConfig | None = None,
    prefill: int | None = None,
    chunk: int = 32,
    batch_size: int = 1,
    out_path: str | Path | None = None,
    meta: dict | None = None,
    progress: bool = True,
) -> list[PerplexityResult]:
    """Perplexity of every datatype on ``windows [n, ctx]`` (see the module docstring for the protocol).

    Results are written to ``out_path`` (JSON) after each datatype, so an interrupted run keeps what it
    finished. ``fp16`` is evaluated first and every other row gets ``delta_ppl`` against it.
    """
    base_config = base_config or QuantConfig()
    n, ctx = windows.shape
    prefill = ctx // 2 if prefill is None else prefill
    if not 0 < prefill < ctx - 1:
        raise ValueError(f"prefill must be in (0, ctx - 1) = (0, {ctx - 1}), got {prefill}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    order = sorted(datatypes, key=lambda d: d != "fp16")
    device = next(model.parameters()).device
    results: list[PerplexityResult] = []
    ref = None
    for name in order:
        make = cache_factory(name, model, calibration, base_config)
        nll, tokens, bits, t0 = 0.0, 0, [], time.perf_counter()
        for batch in tqdm(torch.split(windows, batch_size), desc=f"ppl {name}", disable=not progress):
            cache = make()
            s, k = window_nll(model, batch.to(device), cache, prefill, chunk)
            nll, tokens = nll + s, tokens + k
            if isinstance(cache, KVQuantCache):
                bits.append(cache.memory_report()["bits_per_element"])
            elif cache is not None and parse_baseline(name) is not None:
                bits.append(baseline_memory(cache)["bits_per_element"])
        r = PerplexityResult(name, math.exp(nll / tokens), nll / tokens, tokens, n,
                             sum(bits) / len(bits) if bits else None, time.perf_counter() - t0)
        if name == "fp16":
            ref = r.ppl
        if ref is not None and name != "fp16":
            r.delta_ppl = r.ppl - ref
            r.delta_ppl_pct = 100 * (r.ppl - ref) / ref
        results.append(r)
        delta = "" if r.delta_ppl_pct is None else f" ({r.delta_ppl_pct:+.2f} %)"
        bits_txt = "" if r.bits_per_element is None else f", {r.bits_per_element:.2f} bits/elem"
        tqdm.write(f"ppl {name}: {r.ppl:.4f}{delta}{bits_txt}, {tokens} tokens, {r.seconds:.1f} s", file=sys.stderr)
        if out_path is not None:  # rewritten (atomically) after every datatype: a crash loses only the current one
            out = {"meta": {**(meta or {}), "ctx": ctx, "prefill": prefill, "chunk": chunk, "windows": n,
                            "config": base_config.to_dict()},
                   "results": [asdict(x) for x in results]}
            write_json_atomic(out_path, out)
    return results


def format_table(results: list[PerplexityResult]) -> str:
    """A Markdown table of perplexity results."""
    lines = ["| datatype | PPL | ΔPPL | ΔPPL % | bits/elem | tokens |", "|---|---|---|---|---|---|"]
    for r in results:
        d = "" if r.delta_ppl is None else f"{r.delta_ppl:+.4f}"
        p = "" if r.delta_ppl_pct is None else f"{r.delta_ppl_pct:+.2f}%"
        b = "" if r.bits_per_element is None else f"{r.bits_per_element:.2f}"
        lines.append(f"| {r.datatype} | {r.ppl:.4f} | {d} | {p} | {b} | {r.tokens} |")
    return "\n".join(lines)
