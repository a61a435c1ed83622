"""The whole evaluation: every (length, task, depth) cell through every cache, resumable.

Cells run in order of length (shortest first), then task, then depth, with every cache on a cell before the next
cell, so a run stopped early still compares the caches on what it finished. Each finished cell is written at once
(:class:`~kvquant.eval.longctx.results.ResultsFile`); cells already in the file are skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig
from kvquant.eval.longctx.caches import CacheSpec, ratio_for_bits
from kvquant.eval.longctx.haystack import Haystack
from kvquant.eval.longctx.results import ResultsFile, cell_key
from kvquant.eval.longctx.runner import PromptEncoder, run_cell
from kvquant.eval.longctx.tasks import TASKS, Sample, make_cell, make_sample
from kvquant.quant.calibration_file import Calibration


@dataclass(frozen=True)
class GridSettings:
    """What to run.

    Attributes:
        model_name: recorded with every result (part of a cell's identity).
        tasks: task names (:data:`~kvquant.eval.longctx.tasks.TASKS`).
        lengths: prompt lengths in model tokens, answer budget included.
        depths: needle depths in percent (tasks without depth run once per length).
        n: samples per cell.
        caches: the caches, in order; presses run after the kvquant datatype they match.
        batch_size: prompts per left-padded batch (presses: 1).
        seed: the run's seed.
        max_new_tokens: answer budget for every task (default: each task's own).
        tag: appended to every cache name recorded (``nuq2+r128``), to tell runs of other settings apart.
    """

    model_name: str
    tasks: Sequence[str]
    lengths: Sequence[int]
    depths: Sequence[float]
    n: int
    caches: Sequence[CacheSpec]
    batch_size: int = 1
    seed: int = 0
    max_new_tokens: int | None = None
    tag: str | None = None

    def label(self, spec: CacheSpec) -> str:
        """The cache name recorded for ``spec`` (with the tag)."""
        return f"{spec.name}+{self.tag}" if self.tag else spec.name


def _ordered(caches: Sequence[CacheSpec]) -> list[CacheSpec]:
    """Presses last, so that the kvquant row they match is measured first."""
    return sorted(caches, key=lambda c: c.kind == "press")


@torch.no_grad()
def measure_bits(model: torch.nn.Module, sample: Sample, encoder: PromptEncoder, datatype: str,
                 calibration: Calibration | None, base: QuantConfig) -> float:
    """Bits per element of a kvquant cache of ``datatype`` holding ``sample``'s prompt (one prefill)."""
    ids = torch.tensor([encoder.encode(sample.prompt)], device=next(model.parameters()).device)
    cache = KVQuantCache(model, replace(base, datatype=datatype), calibration=calibration)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return float(cache.memory_report()["bits_per_element"])


def cells(settings: GridSettings) -> list[tuple[int, str, float | None]]:
    """``(length, task, depth)`` of every cell, in run order."""
    out = []
    for length in sorted(settings.lengths):
        for task in settings.tasks:
            for depth in (settings.depths if TASKS[task].uses_depth else [None]):
                out.append((length, task, depth))
    return out


def evaluate_longctx(model: torch.nn.Module, tokenizer, settings: GridSettings, results: ResultsFile, *,
                     haystack: Haystack | None = None, encoder: PromptEncoder | None = None,
                     calibration: Calibration | None = None, base_config: QuantConfig | None = None,
                     meta: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell of ``settings`` not yet in ``results`` and add its record; returns the new records.

    Args:
        model, tokenizer: the model under test (eval mode) and its tokenizer.
        settings: the grid.
        results: where records go (and which cells are done).
        haystack: the essay text for the tasks that need it.
        encoder: how prompts become token ids (BOS handling); default: the tokenizer as is.
        calibration, base_config: for the kvquant caches.
        meta: extra fields recorded with every result (data source, calibration, device, ...).
        progress: show a progress bar over samples.

    Raises:
        ValueError: a length too short for a task, or a task that needs essays without a haystack (before any cell
            runs).
    """
    base = base_config or QuantConfig()
    encoder = encoder or PromptEncoder(tokenizer)
    plan = cells(settings)
    for length in sorted(set(settings.lengths)):  # every (task, length) fits before anything runs
        for task in settings.tasks:
            make_sample(task, length, settings.depths[0] if settings.depths else 50, 0, encoder.count, haystack,
                        settings.seed, settings.max_new_tokens)
    caches = _ordered(settings.caches)
    todo = [(c, spec) for c in plan for spec in caches
            if _key(settings, c, spec) not in results]
    skipped = len(plan) * len(caches) - len(todo)
    if skipped:
        tqdm.write(f"longctx: {skipped} cell(s) already in {results.path}, skipped", file=sys.stderr)
    # the depths of one (length, task) run together for each cache: one set of left-padded batches instead of a
    # few prompts per depth (every record is still one cell, scored on its own prompts)
    groups: dict[tuple, list[float | None]] = {}
    for (length, task, depth), spec in todo:
        groups.setdefault((length, task, spec), []).append(depth)
    bar = tqdm(total=len(todo) * settings.n, desc="longctx", unit="prompt", disable=not progress)
    new: list[dict[str, Any]] = []
    built: dict[tuple, list[Sample]] = {}
    for (length, task, spec), depths in groups.items():
        if any(k[:2] != (length, task) for k in built):
            built.clear()
        for depth in depths:
            if (length, task, depth) not in built:
                built[(length, task, depth)] = make_cell(task, length, depth, settings.n, encoder.count, haystack,
                                                         settings.seed, settings.max_new_tokens)
        samples = [s for depth in depths for s in built[(length, task, depth)]]
        name = settings.label(spec)
        bar.set_description(f"{task} {length} {name}")
        ratio = None
        if spec.kind == "press" and spec.ratio is None:
            done = results.find(model=settings.model_name, task=task, length=length, depth=depths[0],
                                cache=settings.label(CacheSpec(spec.match or "", "kvquant")), n=settings.n,
                                seed=settings.seed)
            bits = done[0]["bits_per_element"] if done else measure_bits(model, samples[0], encoder, spec.match or "",
                                                                          calibration, base)
            ratio = ratio_for_bits(bits)
        run = run_cell(model, tokenizer, samples, spec, encoder=encoder, calibration=calibration, base_config=base,
                       batch_size=settings.batch_size, press_ratio=ratio, on_batch=bar.update)
        for d, depth in enumerate(depths):
            part = slice(d * settings.n, (d + 1) * settings.n)
            cell_samples, scores = samples[part], run.scores[part]
            accuracy = 100.0 * sum(scores) / len(scores)
            record = {
                "model": settings.model_name, "task": task, "length": length, "depth": depth, "cache": name,
                "cache_kind": spec.kind, "n": settings.n, "seed": settings.seed, "accuracy": accuracy,
                "bits_per_element": run.bits_per_element, "kv_bytes": run.kv_bytes,
                "seconds": run.seconds / len(depths), "prompt_tokens": run.prompt_tokens,
                "query_tokens": run.extra.get("query_tokens"),
                "batch_size": 1 if spec.kind == "press" else settings.batch_size, "run_with_depths": depths,
                "compression_ratio": run.compression_ratio,
                "config": replace(base, datatype=spec.name).to_dict() if spec.kind == "kvquant" else None,
                **(meta or {}),
                "samples": [{"index": s.index, "answers": list(s.answers), "prediction": p, "score": sc}
                            for s, p, sc in zip(cell_samples, run.predictions[part], scores)],
            }
            results.add(record)
            new.append(record)
            tqdm.write(f"longctx {task} {length} depth={depth} {name}: {accuracy:.1f} % "
                       f"({run.bits_per_element:.2f} bits/elem, {record['seconds']:.1f} s)", file=sys.stderr)
    bar.close()
    return new


def _key(settings: GridSettings, cell: tuple[int, str, float | None], spec: CacheSpec) -> tuple:
    length, task, depth = cell
    return cell_key({"model": settings.model_name, "task": task, "length": length, "depth": depth,
                     "cache": settings.label(spec), "n": settings.n, "seed": settings.seed})
