"""Running the samples of one cell through one cache and scoring the answers.

Protocol, the same for every cache: the prompts of a cell, tokenized (BOS first when the tokenizer adds none), are
left-padded into batches. The *context* (everything but the last ``query_tokens`` tokens, which hold the question)
is prefilled into the cache in one forward: the tokens attend to each other exactly and are then stored
quantized (or evicted by a press). The question is then fed through the cache, reading the stored context, and the
answer is decoded greedily: for quantized caches by ``model.generate`` continuing from the prefilled cache (its
left-padded mask and position ids), for presses by a greedy loop over one unpadded sequence (kvpress's own
protocol: the cache holds fewer tokens than the positions it has seen). ``query_tokens`` is the longest question of
the cell, so a sample is split at the same place whether it runs alone or in a batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig
from kvquant.eval.longctx.caches import CacheSpec, apply_press, cache_memory, make_cache, make_press
from kvquant.eval.longctx.scoring import string_match_all
from kvquant.eval.longctx.tasks import Sample
from kvquant.quant.calibration_file import Calibration


class PromptEncoder:
    """Token ids of prompts as the model sees them.

    Args:
        tokenizer: a Hugging Face tokenizer.
        bos_id: a token to put first when the tokenizer adds none itself (e.g. llama2.c models), else ``None``.
    """

    def __init__(self, tokenizer, bos_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def count(self, text: str) -> int:
        """Tokens of ``text`` (what the task generators fit to a length)."""
        return len(self.encode(text))


def query_tokens(samples: Sequence[Sample], encoder: PromptEncoder) -> int:
    """The tokens fed after the prefilled context: the longest question of ``samples`` (at least 1)."""
    return max(1, max(encoder.count(s.prompt) - encoder.count(s.context) for s in samples))


@dataclass
class CellRun:
    """What one cache did on one cell.

    Attributes:
        predictions: the decoded answers, one per sample.
        scores: RULER ``string_match_all`` per sample, 0-1.
        accuracy: mean score in percent.
        kv_bytes: bytes the cache held per sequence at the end of its batch (mean over batches).
        bits_per_element: bits per cached key/value element (mean over batches; see
            :func:`~kvquant.eval.longctx.caches.cache_memory`).
        seconds: wall time of the cell.
        prompt_tokens: mean prompt tokens.
        compression_ratio: the press's ratio, for eviction.
    """

    predictions: list[str]
    scores: list[float]
    accuracy: float
    kv_bytes: float
    bits_per_element: float
    seconds: float
    prompt_tokens: float
    compression_ratio: float | None = None
    extra: dict = field(default_factory=dict)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, S - len(r):] = 1
    return ids, mask


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


@torch.no_grad()
def _generate_batch(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache, split: int,
                    max_new_tokens: int, pad_id: int) -> torch.Tensor:
    """Prefill ``ids[:, :split]`` into ``cache``, then ``model.generate`` the rest; the new tokens ``[B, new]``."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = cache_kwargs(model, cache)
    model(input_ids=ids[:, :split], attention_mask=mask[:, :split], position_ids=positions[:, :split], use_cache=True,
          logits_to_keep=1, **kw)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, use_cache=True, **kw)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def _generate_pressed(model: torch.nn.Module, ids: torch.Tensor, cache, split: int, max_new_tokens: int,
                      press, eos: set[int]) -> list[int]:
    """One unpadded sequence ``ids [1, S]``: prefill ``[:split]`` under ``press``, then a greedy loop."""
    if ids.shape[0] != 1:
        raise ValueError("eviction presses run one sequence at a time")
    kw = cache_kwargs(model, cache)
    S = ids.shape[1]
    with apply_press(press, model):
        model(input_ids=ids[:, :split], use_cache=True, logits_to_keep=1, **kw)
    device = ids.device
    logits = model(input_ids=ids[:, split:], position_ids=torch.arange(split, S, device=device)[None],
                   use_cache=True, logits_to_keep=1, **kw).logits
    out: list[int] = []
    for i in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in eos or i == max_new_tokens - 1:
            break
        logits = model(input_ids=torch.tensor([[nxt]], device=device),
                       position_ids=torch.tensor([[S + i]], device=device), use_cache=True, **kw).logits
    return out


def run_cell(model: torch.nn.Module, tokenizer, samples: Sequence[Sample], spec: CacheSpec, *,
             encoder: PromptEncoder | None = None, calibration: Calibration | None = None,
             base_config: QuantConfig | None = None, batch_size: int = 1, press_ratio: float | None = None,
             on_batch: Callable[[int], None] | None = None) -> CellRun:
    """Run ``samples`` (one cell: same task and length) through caches of ``spec`` and score them.

    Args:
        model: a Hugging Face causal LM (eval mode).
        tokenizer: its tokenizer (pads with ``pad_token_id``, else EOS).
        samples: the cell's prompts.
        spec: the cache (:func:`~kvquant.eval.longctx.caches.parse_cache`).
        encoder: how prompts become ids (default: the tokenizer as is).
        calibration, base_config: for kvquant caches.
        batch_size: prompts per left-padded batch (presses always run one at a time).
        press_ratio: the compression ratio of a press given as ``PRESS@DATATYPE`` (the caller measures it).
        on_batch: called with the number of samples after each batch (progress bars).

    Returns:
        The :class:`CellRun`; a batch answers ``[B, new tokens]`` decoded up to the first EOS.
    """
    if not samples:
        raise ValueError("a cell needs at least one sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder = encoder or PromptEncoder(tokenizer)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    tail = query_tokens(samples, encoder)
    press, ratio = None, None
    if spec.kind == "press":
        ratio = spec.ratio if spec.ratio is not None else press_ratio
        if ratio is None:
            raise ValueError(f"cache {spec.name}: no compression ratio (measure the bits of {spec.match} first)")
        press = make_press(spec, ratio)
        batch_size = 1
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n_layers = int(cfg.num_hidden_layers)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    predictions: list[str] = []
    kv_bytes: list[float] = []
    bits: list[float] = []
    lengths: list[int] = []
    t0 = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        rows = [encoder.encode(s.prompt) for s in batch]
        lengths += [len(r) for r in rows]
        new = max(s.max_new_tokens for s in batch)
        ids, mask = _left_pad(rows, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        S = ids.shape[1]
        if tail >= S:
            raise ValueError(f"prompt of {S} tokens has no context before its {tail}-token question")
        cache = make_cache(spec, model, calibration, base_config, reserve_tokens=tail + new)
        if press is not None:
            answers = [_generate_pressed(model, ids, cache, S - tail, new, press, eos)]
        else:
            answers = _generate_batch(model, ids, mask, cache, S - tail, new, pad_id).tolist()
        generated = max(len(a) for a in answers)
        seen = 2 * n_layers * len(batch) * kv_heads * head_dim * (S + generated)
        b, e = cache_memory(spec, cache, seen)
        kv_bytes.append(b / len(batch))
        bits.append(e)
        predictions += [tokenizer.decode(_until_eos(a, eos), skip_special_tokens=True) for a in answers]
        if on_batch is not None:
            on_batch(len(batch))
    scores = [string_match_all(p, s.answers) for p, s in zip(predictions, samples)]
    finite = [x for x in bits if math.isfinite(x)]
    return CellRun(predictions, scores, 100.0 * sum(scores) / len(scores), sum(kv_bytes) / len(kv_bytes),
                   sum(finite) / len(finite) if finite else float("nan"), time.perf_counter() - t0,
                   sum(lengths) / len(lengths), ratio, {"query_tokens": tail})
