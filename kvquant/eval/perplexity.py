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
``fp16`` row uses the same protocol with an unquantized cache, which holds K/V in the model's dtype and is shown as
``exact (fp32)`` / ``exact (fp16)`` (:func:`~kvquant.datatypes.result_label`); it equals the model's plain
perplexity on the same scored tokens (reported as ``plain``), which checks the plumbing.
"""

from __future__ import annotations

import dataclasses
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
from kvquant.datatypes import EXACT_DATATYPE, result_label
from kvquant.eval.baselines import baseline_memory, make_baseline_cache, parse_baseline
from kvquant.eval.results import reusable_rows, write_results
from kvquant.quant.calibration_file import Calibration


@dataclass
class PerplexityResult:
    """One datatype's row. ``label`` is what tables show (``exact (fp32)`` for the unquantized ``fp16`` cache of an
    fp32 model, :func:`~kvquant.datatypes.result_label`); ``config`` is the row's ``QuantConfig`` (``None`` for
    rows without a kvquant cache: ``plain`` and the baselines)."""

    datatype: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    bits_per_element: float | None
    seconds: float
    delta_ppl: float | None = None
    delta_ppl_pct: float | None = None
    label: str = ""
    config: dict | None = None


def row_config(name: str, base: QuantConfig) -> dict | None:
    """The ``QuantConfig`` (as a dict) a datatype's row runs with; ``None`` for ``plain`` and the baselines."""
    from dataclasses import replace

    if name == "plain" or parse_baseline(name) is not None:
        return None
    return replace(base, datatype=name).to_dict()


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
    resume: bool = False,
) -> list[PerplexityResult]:
    """Perplexity of every datatype on ``windows [n, ctx]`` (see the module docstring for the protocol).

    Results are written to ``out_path`` (JSON, :mod:`kvquant.eval.results`) after each datatype with
    ``"complete": false`` in its meta, and ``true`` once every datatype is done. With ``resume``, rows of a file
    already at ``out_path`` with the same protocol and row config are kept instead of computed again. ``fp16`` is
    evaluated first and every other row gets ``delta_ppl`` against it.
    """
    base_config = base_config or QuantConfig()
    n, ctx = windows.shape
    prefill = ctx // 2 if prefill is None else prefill
    if not 0 < prefill < ctx - 1:
        raise ValueError(f"prefill must be in (0, ctx - 1) = (0, {ctx - 1}), got {prefill}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    order = sorted(datatypes, key=lambda d: d != EXACT_DATATYPE)
    param = next(model.parameters())
    device, dtype = param.device, str(param.dtype).removeprefix("torch.")
    shared = {k: v for k, v in base_config.to_dict().items() if k != "datatype"}
    file_meta = {**(meta or {}), "dtype": dtype, "ctx": ctx, "prefill": prefill, "chunk": chunk, "windows": n,
                 "config": shared}
    configs = {name: row_config(name, base_config) for name in order}
    done: dict[str, dict] = {}
    if out_path is not None and resume:
        done, note = reusable_rows(out_path, file_meta, configs)
        if note:
            print(note, file=sys.stderr)
    results: list[PerplexityResult] = []
    ref = None
    for name in order:
        if name in done:
            fields = {f.name for f in dataclasses.fields(PerplexityResult)}
            r = PerplexityResult(**{k: v for k, v in done[name].items() if k in fields})
        else:
            r = _evaluate_one(name, result_label(name, dtype), model, windows, calibration, base_config, prefill,
                              chunk, batch_size, device, progress)
            r.config = configs[name]
        if name == EXACT_DATATYPE:
            ref = r.ppl
        if ref is not None and name != EXACT_DATATYPE:
            r.delta_ppl = r.ppl - ref
            r.delta_ppl_pct = 100 * (r.ppl - ref) / ref
        results.append(r)
        delta = "" if r.delta_ppl_pct is None else f" ({r.delta_ppl_pct:+.2f} %)"
        bits_txt = "" if r.bits_per_element is None else f", {r.bits_per_element:.2f} bits/elem"
        kept = " (kept from the results file)" if name in done else ""
        tqdm.write(f"ppl {r.label or name}: {r.ppl:.4f}{delta}{bits_txt}, {r.tokens} tokens, {r.seconds:.1f} s{kept}",
                   file=sys.stderr)
        if out_path is not None:  # rewritten (atomically) after every datatype: a crash loses only the current one
            write_results(out_path, file_meta, [asdict(x) for x in results], complete=len(results) == len(order))
    return results


def _evaluate_one(name: str, label: str, model: torch.nn.Module, windows: torch.Tensor,
                  calibration: Calibration | None, base_config: QuantConfig, prefill: int, chunk: int,
                  batch_size: int, device: torch.device, progress: bool) -> PerplexityResult:
    """One datatype's row (no ΔPPL yet; the progress bar is called ``label``)."""
    make = cache_factory(name, model, calibration, base_config)
    nll, tokens, bits, t0 = 0.0, 0, [], time.perf_counter()
    for batch in tqdm(torch.split(windows, batch_size), desc=f"ppl {label}", disable=not progress):
        cache = make()
        s, k = window_nll(model, batch.to(device), cache, prefill, chunk)
        nll, tokens = nll + s, tokens + k
        if isinstance(cache, KVQuantCache):
            bits.append(cache.memory_report()["bits_per_element"])
        elif cache is not None and parse_baseline(name) is not None:
            bits.append(baseline_memory(cache)["bits_per_element"])
    return PerplexityResult(name, math.exp(nll / tokens), nll / tokens, tokens, windows.shape[0],
                            sum(bits) / len(bits) if bits else None, time.perf_counter() - t0, label=label)


def format_table(results: list[PerplexityResult]) -> str:
    """A Markdown table of perplexity results."""
    lines = ["| cache | PPL | ΔPPL | ΔPPL % | bits/elem | tokens |", "|---|---|---|---|---|---|"]
    for r in results:
        d = "" if r.delta_ppl is None else f"{r.delta_ppl:+.4f}"
        p = "" if r.delta_ppl_pct is None else f"{r.delta_ppl_pct:+.2f}%"
        b = "" if r.bits_per_element is None else f"{r.bits_per_element:.2f}"
        lines.append(f"| {r.label or r.datatype} | {r.ppl:.4f} | {d} | {p} | {b} | {r.tokens} |")
    return "\n".join(lines)
