"""One generation run of a model with a cache: prompts, caches, the prefill and the greedy decode loop.

Shared by ``kvquant bench generate`` and the decode-step profile (``kvquant bench profile --kind decode``).

Timing (:func:`run_generation`): ``time.perf_counter`` between ``torch.cuda.synchronize()`` calls (on every GPU of
the model) at the start of the prefill, the end of the prefill and the end of the decode loop. The prefill is one
forward of the ``[B, S]`` prompt with a fresh cache (``logits_to_keep=1``: only the last position's logits are
computed, as ``generate`` does), greedy pick of the first new token; the decode loop is ``gen - 1`` forwards of one
token per sequence, greedy (argmax on the device, no host round trip per step). As in
``model.generate(max_new_tokens=gen)``, the first of the ``gen`` new tokens comes from the prefill logits.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any

import torch

from kvquant.bench.cuda import model_devices, synchronize_all
from kvquant.bench.model import BenchModel
from kvquant.cache.graphs import prefill_chunks, reserve_rest_of_prompt
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig

_CORPUS: dict[tuple[str, str], torch.Tensor] = {}


def make_prompts(bm: BenchModel, batch: int, length: int, data: str | None, seed: int = 0
                 ) -> tuple[torch.Tensor, str]:
    """``[batch, length]`` prompt ids on the model's device and where they come from.

    Real text (consecutive windows of the tokenized ``data`` test split, wrapped around when the corpus is
    shorter than ``batch * length``) when the model has a tokenizer and the text loads; uniform random ids
    otherwise (the reason is in the returned source string).
    """
    reason = "random-weight model has no tokenizer" if bm.tokenizer is None else None
    if bm.tokenizer is not None and data:
        key = (bm.name, data)
        try:
            if key not in _CORPUS:
                from kvquant.data import load_text, tokenize_corpus

                _CORPUS[key] = torch.as_tensor(tokenize_corpus(load_text(data, "test"), bm.tokenizer, bm.bos_id))
            ids = _CORPUS[key]
            need = batch * length
            wrapped = need > ids.numel()
            if wrapped:
                ids = ids.repeat(-(-need // ids.numel()))
            return ids[:need].view(batch, length).to(bm.device), f"text:{data}:test" + (" (wrapped)" if wrapped else "")
        except Exception as exc:  # no data available: fall back, and say so
            reason = f"text {data!r} unavailable ({type(exc).__name__}: {str(exc)[:120]})"
    elif bm.tokenizer is not None:
        reason = "no --data given"
    vocab = int(bm.text_config.vocab_size)
    g = torch.Generator().manual_seed(seed + 7919 * batch + length)
    low = 3 if vocab > 3 else 0  # skip pad/bos/eos of the random presets
    ids = torch.randint(low, vocab, (batch, length), generator=g)
    return ids.to(bm.device), f"random-ids ({reason})"


def make_cache(bm: BenchModel, datatype: str, quant: QuantConfig, calibration: Any | None,
               reserve_tokens: int = 0, static_len: int | None = None) -> Any:
    """``DynamicCache`` for ``fp16`` (``StaticCache`` of ``static_len`` tokens when given: the cache a CUDA-graph
    decode needs), else a :class:`KVQuantCache` of ``datatype`` that allocates the pages of ``reserve_tokens``
    generated tokens right after the prefill (exactly, as a server with a known budget)."""
    if datatype == "fp16":
        from transformers import DynamicCache, StaticCache

        if static_len is None:
            return DynamicCache()
        cache = StaticCache(config=bm.model.config, max_cache_len=static_len)
        cache.kvquant_max_len = static_len
        return cache
    from kvquant.cache.hf_cache import KVQuantCache

    return KVQuantCache(bm.model, replace(quant, datatype=datatype), calibration=calibration,
                        reserve_tokens=reserve_tokens)


def _dynamic_kv_tensors(cache: Any) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = []
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
        return out
    return [t for t in (*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", []))
            if isinstance(t, torch.Tensor)]  # transformers 4.5x


def cache_memory(cache: Any) -> dict[str, Any]:
    """KV bytes held (every tensor the cache keeps, capacity reserved ahead included; also ``kv_bytes_allocated``)
    and in use, fp16-equivalent bytes, elements and bits per element (of the bytes held) of a cache."""
    if hasattr(cache, "memory_report") and hasattr(cache, "quantizer_for"):  # KVQuantCache
        rep = cache.memory_report()
        if not rep:
            return {}
        elements = int(rep["key_elements"] + rep["value_elements"])
        return {"kv_bytes": int(rep["total_bytes"]), "kv_bytes_allocated": int(rep["total_bytes"]),
                "kv_bytes_used": int(rep["used_bytes"]), "kv_fp16_bytes": int(rep["fp16_bytes"]),
                "kv_elements": elements, "bits_per_element": float(rep["bits_per_element"]),
                "compression_vs_fp16": float(rep["compression_vs_fp16"])}
    tensors = _dynamic_kv_tensors(cache)
    if not tensors:
        return {}
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    elements = sum(t.numel() for t in tensors)
    return {"kv_bytes": int(nbytes), "kv_bytes_allocated": int(nbytes), "kv_fp16_bytes": 2 * elements,
            "kv_elements": int(elements), "bits_per_element": 8 * nbytes / elements,
            "compression_vs_fp16": 2 * elements / nbytes}


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward with the cache; returns the last position's logits ``[B, vocab]``."""
    out = model(input_ids=input_ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def greedy_steps(model: torch.nn.Module, nxt: torch.Tensor, cache: Any, steps: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``steps`` greedy decode forwards of ``nxt [B, 1]`` with the cache (argmax on the device, no host round
    trip); returns the next tokens ``[B, 1]`` and the last logits ``[B, vocab]`` (``None`` when ``steps`` is 0)."""
    logits = None
    for _ in range(steps):
        logits = forward_logits(model, nxt, cache)
        nxt = logits.argmax(-1, keepdim=True)
    return nxt, logits


def run_generation_graph(model: torch.nn.Module, prompt: torch.Tensor, cache: Any, gen: int, device: torch.device,
                         region: Any = None, prefill_chunk: int | None = None) -> dict[str, Any]:
    """:func:`run_generation` with every decode step replayed from a CUDA graph
    (:func:`kvquant.cache.graphs.generate`: a ``KVQuantCache`` in static mode or a ``StaticCache``); the same
    fields. Two eager steps before the capture compile and allocate; the rate is that of the replayed steps."""
    from kvquant.cache.graphs import generate

    res = generate(model, prompt, None, cache, gen, graph=True, region=region, prefill_chunk=prefill_chunk)
    return {"prefill_s": res.prefill_s, "decode_s": res.decode_s, "decode_steps": gen - 1, "logits": res.logits}


@torch.no_grad()
def run_generation(model: torch.nn.Module, prompt: torch.Tensor, cache: Any, gen: int, device: torch.device,
                   region: Any = None, prefill_chunk: int | None = None) -> dict[str, Any]:
    """Prefill ``prompt`` (in forwards of ``prefill_chunk`` tokens when given) then ``gen - 1`` greedy decode
    steps; timings (s) and the last logits.

    ``region(name, tokens)`` is an optional context-manager factory (energy regions) wrapped around the
    prefill and the decode loop; the timed windows are inside it.
    """
    region = region or (lambda name, tokens: contextlib.nullcontext())
    B, S = prompt.shape
    devices = model_devices(model, device)  # every GPU of a device_map pipeline
    with region("prefill", B * S):
        synchronize_all(devices)
        t0 = time.perf_counter()
        spans = prefill_chunks(S, prefill_chunk)
        reserve_rest_of_prompt(cache, spans)
        for start, end in spans:
            logits = forward_logits(model, prompt[:, start:end], cache)
        nxt = logits.argmax(-1, keepdim=True)
        synchronize_all(devices)
        t1 = time.perf_counter()
    steps = gen - 1
    with region("decode", B * steps):
        synchronize_all(devices)
        t2 = time.perf_counter()
        _, last = greedy_steps(model, nxt, cache, steps)
        synchronize_all(devices)
        t3 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "decode_steps": steps,
            "logits": last if last is not None else logits}
