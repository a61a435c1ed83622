"""Greedy generation whose decode steps are captured in a CUDA graph (or run eagerly with the same code).

A decode step of a transformers model launches hundreds of kernels; at small batch the host cannot issue them as
fast as the GPU runs them. :func:`generate` prefills eagerly, then records one decode step (model forward, greedy
pick, bookkeeping of the next step's inputs) in a CUDA graph and replays it: the host does nothing per token.

It serves three caches with one loop:

* :class:`~kvquant.cache.hf_cache.KVQuantCache` (triton backend): put in static mode
  (:meth:`~kvquant.cache.hf_cache.KVQuantCache.begin_static`), where a step's appends, page seals and attention
  read every index from the device;
* transformers' ``StaticCache`` (fp16): the speed-minded baseline, graph-safe by design (the write position is
  the ``cache_position`` input);
* transformers' ``DynamicCache``: eager only (its tensors grow every step).

Sampling is greedy (argmax on the device); stopping criteria are not checked (benchmark-style, fixed length).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.hf_compat import cache_kwargs


@dataclass
class GenerateResult:
    """Tokens and timings of :func:`generate`.

    Attributes:
        tokens: ``[B, max_new_tokens]`` the new tokens (the first from the prefill's logits).
        prefill_s: the prefill forward (synchronized). decode_s: the ``max_new_tokens - 1`` decode steps.
        capture_s: recording the graph (0 when eager); warmup_steps: decode steps run eagerly before it.
        logits: ``[B, vocab]`` float32 logits of the last step (the prefill's when ``max_new_tokens == 1``).
    """

    tokens: torch.Tensor
    prefill_s: float
    decode_s: float
    capture_s: float
    warmup_steps: int
    mode: str
    logits: torch.Tensor | None = None


def _static_mask_len(cache) -> int | None:
    """The token capacity of a transformers ``StaticCache`` (``None`` for a growing cache)."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache):
        return None
    length = getattr(cache, "kvquant_max_len", None)  # set by the caller (some StaticCaches know it only later)
    if length is None:
        lengths = [getattr(layer, "max_cache_len", None) for layer in getattr(cache, "layers", [])]
        length = lengths[0] if lengths and lengths[0] is not None else None
    if length is None or int(length) <= 0:
        raise ValueError("cannot read this StaticCache's length: set cache.kvquant_max_len = max_cache_len")
    return int(length)


def prefill_chunks(length: int, chunk: int | None, mask: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of the prefill forwards of a ``length``-token prompt, ``chunk`` tokens each (one forward
    when ``None``). ``mask [B, length]``: every row needs a real token in the first chunk."""
    if chunk is None or chunk >= length:
        return [(0, length)]
    if chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {chunk}")
    if mask is not None and not bool(mask[:, :chunk].any(1).all()):
        raise ValueError(f"a row's padding is longer than prefill_chunk={chunk}: every row needs a real token in the "
                         "first chunk")
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def reserve_rest_of_prompt(cache: Any, spans: list[tuple[int, int]]) -> None:
    """A chunked prefill into a :class:`KVQuantCache`: add the prompt's tokens after the first chunk to what the cache
    allocates exactly at its first chunk (``reserve_tokens``), so the later chunks append into pages sized for them
    instead of growing the pools a quarter at a time (which can leave a fifth of what is held unused at the end).
    Exact for left-padded prompts (the padding lies in the first chunk, :func:`prefill_chunks`)."""
    if isinstance(cache, KVQuantCache) and len(spans) > 1:
        cache.reserve_tokens += spans[-1][1] - spans[0][1]


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache,
    max_new_tokens: int,
    graph: bool = True,
    warmup_steps: int = 2,
    static: bool | None = None,
    region: Callable[[str, int], Any] | None = None,
    prefill_chunk: int | None = None,
) -> GenerateResult:
    """Greedy generation of ``max_new_tokens`` per sequence.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2, ... with ``position_ids``/``cache_position``).
        input_ids: ``[B, S]`` prompts, left-padded. attention_mask: ``[B, S]`` (``None``: no padding).
        cache: a fresh ``KVQuantCache``, ``StaticCache`` (``max_cache_len >= S + max_new_tokens``) or
            ``DynamicCache`` (eager only).
        graph: capture the decode step in a CUDA graph (needs CUDA; not with ``DynamicCache``).
        warmup_steps: eager decode steps before the capture (lazy allocations, kernel compilation).
        static: run a ``KVQuantCache``'s steps in static mode (default: when ``graph``); ``graph=False,
            static=True`` runs exactly the captured step's code eagerly (tests without CUDA).
        region: optional ``region(name, tokens)`` context-manager factory (energy regions) around the prefill
            (``"prefill"``) and the timed decode steps (``"decode"``).
        prefill_chunk: feed the prompt in forwards of at most this many tokens (the activations of one chunk, not
            of the whole ``[B, S]`` prompt: what lets a large batch of long prompts fit); each chunk attends to the
            cache's past. Every row needs a real token in the first chunk (left padding shorter than a chunk). A
            ``KVQuantCache`` allocates the rest of the prompt exactly at the first chunk
            (:func:`reserve_rest_of_prompt`).

    Returns:
        :class:`GenerateResult`.
    """
    B, S = input_ids.shape
    dev = input_ids.device
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if graph and dev.type != "cuda":
        raise ValueError("graph=True needs the model on a CUDA device")
    quantized = isinstance(cache, KVQuantCache)
    static_len = None if quantized else _static_mask_len(cache)
    if graph and not quantized and static_len is None:
        raise ValueError("graph=True needs a KVQuantCache or a StaticCache (a DynamicCache grows every step)")
    if static_len is not None and static_len < S + max_new_tokens:
        raise ValueError(f"StaticCache holds {static_len} tokens, fewer than {S} + {max_new_tokens}")
    mask = torch.ones(B, S, dtype=torch.long, device=dev) if attention_mask is None else attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    region = region or (lambda name, tokens: contextlib.nullcontext())

    with region("prefill", B * S):
        torch.cuda.synchronize(dev) if dev.type == "cuda" else None
        t0 = time.perf_counter()
        spans = prefill_chunks(S, prefill_chunk, mask)
        reserve_rest_of_prompt(cache, spans)
        with torch.no_grad():
            for start, end in spans:
                out = model(input_ids=input_ids[:, start:end], attention_mask=mask[:, :end],
                            position_ids=positions[:, start:end], cache_position=torch.arange(start, end, device=dev),
                            use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
        last = out.logits[:, -1].float()
        tokens[:, 0] = last.argmax(-1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        prefill_s = time.perf_counter() - t0
    if max_new_tokens == 1:
        return GenerateResult(tokens, prefill_s, 0.0, 0.0, 0, "graph" if graph else "eager", last)

    # the next step's inputs, in place (the graph reads these tensors)
    ids = tokens[:, :1].clone()
    pos = positions[:, -1:] + 1
    cache_pos = torch.full((1,), S, dtype=torch.long, device=dev)
    step = torch.ones(1, dtype=torch.long, device=dev)  # index of the token the next step writes
    if static_len is not None:  # StaticCache: a prepared 4-D mask over the whole static length (transformers uses it
        # as is: no host check that a capture would forbid), a column set as each token comes
        full_mask = torch.zeros(B, 1, 1, static_len, dtype=torch.bool, device=dev)
        full_mask[:, 0, 0, :S] = mask.bool()
    dyn_mask = [mask]
    static = graph if static is None else static
    if quantized and static:
        cache.begin_static(max_new_tokens)

    def decode_step() -> None:
        if static_len is not None:
            full_mask.index_fill_(3, cache_pos, True)
            step_mask = full_mask
        elif quantized:
            step_mask = None  # compact quantized stores hold no padding: the kernel path needs no mask
        else:
            dyn_mask.append(torch.ones(B, 1, dtype=torch.long, device=dev))
            step_mask = torch.cat(dyn_mask, 1)
        logits = model(input_ids=ids, attention_mask=step_mask, position_ids=pos, cache_position=cache_pos,
                       use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits
        last.copy_(logits[:, -1])
        nxt = last.argmax(-1)
        tokens.scatter_(1, step.expand(B)[:, None], nxt[:, None])
        ids.copy_(nxt[:, None])
        pos.add_(1)
        cache_pos.add_(1)
        step.add_(1)

    n_steps = max_new_tokens - 1
    timed_region = contextlib.ExitStack()  # the energy region around the timed steps
    warm = min(warmup_steps, n_steps) if graph else 0
    capture_s = 0.0
    try:
        with torch.no_grad():
            for _ in range(warm):
                decode_step()
            remaining = n_steps - warm
            if not graph:
                timed_region.enter_context(region("decode", B * remaining))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t1 = time.perf_counter()
            if graph and remaining:
                g = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    torch.cuda.synchronize(dev)
                    tc = time.perf_counter()
                    with torch.cuda.graph(g, stream=side):
                        decode_step()
                    capture_s = time.perf_counter() - tc
                torch.cuda.current_stream(dev).wait_stream(side)
                timed_region.enter_context(region("decode", B * remaining))
                torch.cuda.synchronize(dev)
                t1 = time.perf_counter()
                for _ in range(remaining):
                    g.replay()
            else:
                for _ in range(remaining):
                    decode_step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            decode_s = time.perf_counter() - t1
            timed_region.close()
    finally:
        timed_region.close()
        if quantized and static:
            cache.end_static()
    # rate over the timed steps only (the warm-up steps ran before the clock started)
    timed = n_steps - warm
    decode_s = decode_s * n_steps / timed if timed else 0.0
    return GenerateResult(tokens, prefill_s, decode_s, capture_s, warm, "graph" if graph else "eager", last)
