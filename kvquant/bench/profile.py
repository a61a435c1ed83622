"""Where a prefill quantization spends its time: ``torch.profiler`` over ``BatchedKVQuantizer.quantize_keys`` /
``quantize_values`` of one ``[B, H, S, D]`` input.

``kvquant bench kernels`` times the whole prefill append and the fused write inside it; on an H200 the whole
append takes 5-10x the write (MHA keys at 32K: 12.3 ms against 1.9 ms). This names the rest: a table of the ops
by GPU time and by host time, the host-device syncs counted, and a JSON file of the same rows.

``--kind decode`` profiles whole decode steps of a model instead (``model(next_token, cache)``, one token per
sequence), once per ``--datatype`` (``fp16`` is transformers' ``DynamicCache``). It answers whether a decode
step is host-bound: wall time per step (timed without the profiler), device-busy time per step (the device's
kernels and copies summed), kernel launches and host-device syncs per step, and the share of kvquant's own parts,
each a labelled region: ``kvquant.update`` (the cache's ``update``: un-rotate keys, hold the token),
``kvquant.kernel_decode`` (attention over the packed cache, then both appends), ``kvquant.decode_attention``
and ``kvquant.append`` (inside it). The model's own work is the rest.

``--kind chunk`` profiles a chunked prefill (``generate(..., prefill_chunk=C)``): a ``[B, L]`` prompt fed in
forwards of ``C`` tokens, each chunk after the first attending to the cache's past. Every chunk's forward is timed
(synchronized: the growth with the past shows) and the last ``--steps`` chunks are profiled, with the parts of a
multi-token step labelled: ``kvquant.update`` (the cache's whole ``update``), ``kvquant.read_past`` (the past
dequantized into ``[B, H, past + s, D]``), ``kvquant.append`` (the chunk quantized and appended, keys and values)
and ``kvquant.attention`` (the model's attention function over ``[past | chunk]``, also for ``fp16``).

Run: ``kvquant bench profile --kind keys --heads 32 --tokens 32768 [--backend triton] [--out prof.json]``
or ``kvquant bench profile --kind decode --model random:7b --datatype fp16,nuq3 --batch 1 --tokens 4K``
or ``kvquant bench profile --kind chunk --model random:7b --datatype fp16,nuq3 --batch 4 --tokens 32K --chunk 4K``
(on CPU too, with the torch backend or the Triton interpreter; the GPU time column is then empty).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kvquant.config import QuantConfig
from kvquant.files import write_json_atomic
from kvquant.flags import (
    ArgumentParser,
    add_device_arg,
    add_quant_config_args,
    parse_datatypes,
    parse_size,
    quant_config_from_args,
    resolve_device,
)

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::repeat_interleave",
            "aten::masked_select", "aten::_unique2", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile_prefill(kind: str, batch: int, heads: int, tokens: int, head_dim: int, cfg: QuantConfig, device: str,
                    dtype: torch.dtype = torch.float16, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Profile one ``quantize_keys`` / ``quantize_values`` call after ``warmup`` untimed ones.

    Returns ``{"rows": [...], "syncs": {...}, "wall_ms": float}``; each row is one op name with its count and its
    total host and GPU (CUDA) time in ms (GPU time 0 on CPU).
    """
    from torch.profiler import ProfilerActivity, profile

    from kvquant.quant.quantizer import BatchedKVQuantizer

    if kind not in ("keys", "values"):
        raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(batch, heads, tokens, head_dim, device=device, generator=g)
         * (0.5 + torch.rand(batch, heads, 1, head_dim, device=device, generator=g))).to(dtype)
    qz = BatchedKVQuantizer(cfg)
    fn = qz.quantize_keys if kind == "keys" else qz.quantize_values
    for _ in range(warmup):
        fn(x)
    cuda = x.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn(x)
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3  # the whole call, profiler overhead included
    rows = op_rows(prof)
    syncs = {r["op"]: r["count"] for r in rows if r["op"] in SYNC_OPS}
    return {"rows": rows, "syncs": syncs, "wall_ms": wall_ms}


def _device_us(e: Any, self_only: bool) -> float:
    names = ("self_device_time_total", "self_cuda_time_total") if self_only else \
        ("device_time_total", "cuda_time_total")
    for name in names:
        v = getattr(e, name, None)
        if v is not None:
            return float(v)
    return 0.0


def op_rows(prof: Any) -> list[dict[str, Any]]:
    """One row per op name of a finished ``torch.profiler.profile``: ``op``, ``count``, ``host_ms`` (self host
    time), ``device_ms`` (GPU time of the op and its children), ``device_self_ms`` and ``on_device`` (True
    for the device's own events: kernels, copies, annotations; their ``device_self_ms`` summed over the kernels
    and copies is the time the device was busy), sorted by GPU time."""
    rows = [{"op": e.key, "count": int(e.count), "host_ms": e.self_cpu_time_total / 1e3,
             "device_ms": _device_us(e, False) / 1e3, "device_self_ms": _device_us(e, True) / 1e3,
             "on_device": not str(getattr(e, "device_type", "CPU")).endswith("CPU")}
            for e in prof.key_averages()]
    rows.sort(key=lambda r: (r["device_ms"], r["host_ms"]), reverse=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# decode steps of a model

REGIONS = ("kvquant.update", "kvquant.kernel_decode", "kvquant.decode_attention", "kvquant.append")
CHUNK_REGIONS = ("kvquant.update", "kvquant.read_past", "kvquant.attention", "kvquant.append")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _labelled(fn: Any, label: str) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def _labelling_getter(get: Any, label: str) -> Any:
    """``get`` returns a function: return it labelled (the attention function a model looks up per call)."""
    @functools.wraps(get)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _labelled(get(*args, **kwargs), label)
    return wrapper


@contextlib.contextmanager
def labelled_regions(kind: str = "decode") -> Iterator[None]:
    """Wrap kvquant's decode-step parts (``kind`` ``decode``: :data:`REGIONS`) or a multi-token step's parts
    (``chunk``: :data:`CHUNK_REGIONS`; the attention through transformers' ``AttentionInterface.get_interface``,
    when it has one) in ``record_function`` labels while profiling only: patched on entry, restored on exit."""
    import importlib

    from kvquant.cache.hf_cache import KVQuantLayer
    from kvquant.quant.store import QuantizedKVCache

    if kind == "decode":
        # the module (the package exports the function)
        da = importlib.import_module("kvquant.kernels.decode_attention")
        targets = [(KVQuantLayer, "update", REGIONS[0]), (KVQuantLayer, "kernel_decode", REGIONS[1]),
                   (da, "decode_attention", REGIONS[2]), (QuantizedKVCache, "append", REGIONS[3])]
    else:
        from transformers.modeling_utils import AttentionInterface

        targets = [(KVQuantLayer, "update", CHUNK_REGIONS[0]), (KVQuantLayer, "_read_past", CHUNK_REGIONS[1]),
                   (QuantizedKVCache, "append", CHUNK_REGIONS[3])]
        if "get_interface" in vars(AttentionInterface):  # transformers 5: the model looks its attention up per call
            targets.append((AttentionInterface, "get_interface", CHUNK_REGIONS[2]))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for owner, name, label in targets:
            wrap = _labelling_getter if name == "get_interface" else _labelled
            setattr(owner, name, wrap(getattr(owner, name), label))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def profile_decode(bm: Any, datatype: str, batch: int, prompt_len: int, quant: QuantConfig, steps: int = 8,
                   warmup_steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """Profile ``steps`` greedy decode steps of ``bm.model`` after a ``[batch, prompt_len]`` prefill.

    First a full untimed rehearsal (prefill and every step, another cache) so that compilation and the
    allocator's first blocks are not measured; then a prefill, ``warmup_steps`` steps, ``steps`` steps timed
    without the profiler (``wall_ms_per_step``) and ``steps`` more under it. ``bm`` is a
    :class:`~kvquant.bench.model.BenchModel`; ``datatype`` ``fp16`` profiles transformers' ``DynamicCache``.

    Returns ``{"wall_ms_per_step", "profiled_ms_per_step", "device_busy_ms_per_step" (None on CPU),
    "launches_per_step", "syncs_per_step" (every host wait in the profiled window, the closing synchronize
    included: ``1 / steps`` of it), "regions": {label: {"calls_per_step", "host_ms_per_step"}},
    "rows": [...]}``.
    """
    from torch.profiler import ProfilerActivity, profile

    from kvquant.bench.cuda import synchronize
    from kvquant.bench.runs import forward_logits, greedy_steps, make_cache, make_prompts, run_generation

    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"need steps >= 1 and warmup_steps >= 0, got {steps} and {warmup_steps}")
    dev = bm.device
    prompt, _ = make_prompts(bm, batch, prompt_len, None, seed)
    total = warmup_steps + 2 * steps
    with torch.no_grad():
        run_generation(bm.model, prompt, make_cache(bm, datatype, quant, None, reserve_tokens=total + 1),
                       total + 1, dev)
        cache = make_cache(bm, datatype, quant, None, reserve_tokens=total + 1)
        nxt, _ = greedy_steps(bm.model, forward_logits(bm.model, prompt, cache).argmax(-1, keepdim=True), cache,
                              warmup_steps)
        synchronize(dev)
        t0 = time.perf_counter()
        nxt, _ = greedy_steps(bm.model, nxt, cache, steps)
        synchronize(dev)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        cuda = dev.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with labelled_regions(), profile(activities=activities) as prof:
            t1 = time.perf_counter()
            greedy_steps(bm.model, nxt, cache, steps)
            synchronize(dev)  # counted in syncs_per_step: 1 / steps of it is this closing wait
            profiled_ms = (time.perf_counter() - t1) * 1e3 / steps
    rows = op_rows(prof)
    by_op = {r["op"]: r for r in rows}
    regions: dict[str, dict[str, float]] = {}
    for ev in prof.events():  # host-side region events only (CUDA builds also keep a device-side annotation)
        if ev.name in REGIONS and str(getattr(ev, "device_type", "CPU")).endswith("CPU"):
            # host time only: Triton's launches are not tied to the region in the trace, so its GPU time is
            # not the region's kernels' (the kernel rows name those: _pages_kernel = attention, ...)
            reg = regions.setdefault(ev.name, {"calls_per_step": 0.0, "host_ms_per_step": 0.0})
            reg["calls_per_step"] += 1 / steps
            reg["host_ms_per_step"] += ev.cpu_time_total / 1e3 / steps  # the region's children included
    busy = sum(r["device_self_ms"] for r in rows if r["on_device"] and r["op"] not in REGIONS) / steps \
        if cuda else None  # kernels and copies (the regions' device-side annotations span them: not counted)
    return {"datatype": datatype, "batch": batch, "prompt_len": prompt_len, "steps": steps,
            "wall_ms_per_step": wall_ms, "profiled_ms_per_step": profiled_ms, "device_busy_ms_per_step": busy,
            "launches_per_step": sum(by_op[o]["count"] for o in LAUNCH_OPS if o in by_op) / steps,
            "syncs_per_step": sum(by_op[o]["count"] for o in SYNC_OPS if o in by_op) / steps,
            "regions": regions, "rows": rows}


def _export_trace(prof: Any, path: Path) -> None:
    """``prof``'s Chrome trace, gzipped, at ``path`` (``.gz`` added when missing)."""
    import gzip
    import shutil
    import tempfile

    path = Path(path) if str(path).endswith(".gz") else Path(f"{path}.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


@contextlib.contextmanager
def _sync_warnings(device: torch.device) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("warn")`` inside: each host-device sync warns once per source line."""
    import warnings

    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def profile_chunks(bm: Any, datatype: str, batch: int, prompt_len: int, chunk: int, quant: QuantConfig,
                   steps: int = 1, seed: int = 0, sync_warnings: bool = False,
                   trace: Path | None = None) -> dict[str, Any]:
    """Time every chunk forward of a ``[batch, prompt_len]`` prompt fed in ``chunk``-token forwards, profiling the
    last ``steps`` of them (:data:`CHUNK_REGIONS` labelled; ``sync_warnings``: a warning names each source line that
    syncs the host with the device in them; ``trace``: their Chrome trace, gzipped there).

    First an untimed rehearsal of the first two chunks (another cache: compilation, first allocations), then every
    chunk of a fresh cache timed (``chunk_ms``, synchronized; the last ``steps`` under the profiler, their times
    included). ``datatype`` ``fp16`` runs transformers' ``DynamicCache`` (only its attention is labelled).

    Returns ``{"chunk_ms": [n_chunks], "profiled_chunks": [indices], "tokens_per_s" (every chunk),
    "phases": {label: {"calls_per_chunk", "host_ms_per_chunk" (children included), "device_ms_per_chunk"
    (the spans of the label's device-side annotations, first kernel's start to last one's end; None without one,
    as on CPU)}}, "device_busy_ms_per_chunk" (None on CPU),
    "syncs_per_chunk", "rows": [...]}``, phases and rows over the profiled chunks.
    """
    from torch.profiler import ProfilerActivity, profile

    from kvquant.bench.cuda import synchronize
    from kvquant.bench.runs import forward_logits, make_cache, make_prompts
    from kvquant.cache.graphs import prefill_chunks

    if not 1 <= chunk < prompt_len:
        raise ValueError(f"chunk must be in [1, {prompt_len}) (the prompt length), got {chunk}")
    spans = prefill_chunks(prompt_len, chunk)
    if not 1 <= steps < len(spans):
        raise ValueError(f"steps must be in [1, {len(spans) - 1}] (the chunks after the first), got {steps}")
    dev = bm.device
    prompt, _ = make_prompts(bm, batch, prompt_len, None, seed)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    chunk_ms: list[float] = []
    with torch.no_grad():
        rehearsal = make_cache(bm, datatype, quant, None)
        for start, end in spans[:2]:
            forward_logits(bm.model, prompt[:, start:end], rehearsal)
        del rehearsal
        cache = make_cache(bm, datatype, quant, None)
        with contextlib.ExitStack() as stack:
            for i, (start, end) in enumerate(spans):
                if i == len(spans) - steps:
                    stack.enter_context(labelled_regions("chunk"))
                    prof = stack.enter_context(profile(activities=activities))
                    if cuda and sync_warnings:  # name every line that makes the host wait for the device
                        stack.enter_context(_sync_warnings(dev))
                synchronize(dev)
                t0 = time.perf_counter()
                forward_logits(bm.model, prompt[:, start:end], cache)
                synchronize(dev)
                chunk_ms.append((time.perf_counter() - t0) * 1e3)
    rows = op_rows(prof)
    phases: dict[str, dict[str, Any]] = {}
    for ev in prof.events():
        if ev.name not in CHUNK_REGIONS:
            continue
        ph = phases.setdefault(ev.name, {"calls_per_chunk": 0.0, "host_ms_per_chunk": 0.0, "device_ms_per_chunk": None})
        if str(getattr(ev, "device_type", "CPU")).endswith("CPU"):
            ph["calls_per_chunk"] += 1 / steps
            ph["host_ms_per_chunk"] += ev.cpu_time_total / 1e3 / steps
        else:  # the device-side annotation: from the region's first kernel's start to its last one's end
            ph["device_ms_per_chunk"] = (ph["device_ms_per_chunk"] or 0.0) + ev.time_range.elapsed_us() / 1e3 / steps
    by_op = {r["op"]: r for r in rows}
    if trace is not None:
        _export_trace(prof, trace)
    busy = sum(r["device_self_ms"] for r in rows if r["on_device"] and r["op"] not in CHUNK_REGIONS) / steps \
        if cuda else None
    return {"datatype": datatype, "batch": batch, "prompt_len": prompt_len, "chunk": chunk, "steps": steps,
            "chunk_ms": chunk_ms, "profiled_chunks": list(range(len(spans) - steps, len(spans))),
            "tokens_per_s": batch * prompt_len / (sum(chunk_ms) / 1e3), "phases": phases,
            "device_busy_ms_per_chunk": busy,
            "syncs_per_chunk": sum(by_op[o]["count"] for o in SYNC_OPS if o in by_op) / steps, "rows": rows}


def format_rows(rows: list[dict[str, Any]], top: int, device_times: bool = True) -> str:
    """The ``top`` rows by GPU time (when ``device_times``), then the ``top`` by host time (Markdown)."""
    out = []
    tables = (("by GPU time", "device_ms"), ("by host time", "host_ms"))
    for title, key in tables if device_times else tables[1:]:
        out.append(f"\n{title}\n| op | count | device ms | host ms |\n|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r[key], reverse=True)[:top]:
            out.append(f"| {r['op'][:60]} | {r['count']} | {r['device_ms']:.3f} | {r['host_ms']:.3f} |")
    return "\n".join(out)


def decode_summary(results: list[dict[str, Any]]) -> str:
    """One Markdown row per profiled datatype: the step's wall time (without the profiler), its time under the
    profiler (the regions' host times are shares of this one), device-busy time, launches and syncs, and the
    host time of kvquant's regions per step (nested: ``kernel_decode`` holds ``decode_attention`` and
    ``append``; on the torch path ``update`` holds ``append``)."""
    out = ["| datatype | wall ms/step | profiled ms/step | device busy ms/step | launches/step | syncs/step | "
           + " | ".join(f"{r} host ms" for r in REGIONS) + " |", "|---" * (6 + len(REGIONS)) + "|"]
    for r in results:
        busy = r["device_busy_ms_per_step"]
        cells = [r["datatype"], f"{r['wall_ms_per_step']:.2f}", f"{r['profiled_ms_per_step']:.2f}",
                 "-" if busy is None else f"{busy:.2f}",
                 f"{r['launches_per_step']:.0f}", f"{r['syncs_per_step']:.1f}"]
        cells += [f"{r['regions'][g]['host_ms_per_step']:.2f}" if g in r["regions"] else "-" for g in REGIONS]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def chunk_summary(results: list[dict[str, Any]]) -> str:
    """One Markdown row per datatype: the whole chunked prefill, its first chunk's time, then per profiled chunk
    its time and each labelled part's time (device time on CUDA, else host time; ``update`` holds
    ``read_past`` and ``append``), and what is left of the chunk (the model's own work: projections, MLP, ...)."""
    out = ["| datatype | chunks | prefill s | tokens/s | first chunk ms | profiled chunk ms | "
           + " | ".join(f"{r.removeprefix('kvquant.')} ms" for r in CHUNK_REGIONS) + " | rest ms |",
           "|---" * (7 + len(CHUNK_REGIONS)) + "|"]
    for r in results:
        ms = r["chunk_ms"]
        timed = sum(ms[i] for i in r["profiled_chunks"]) / r["steps"]
        key = "host_ms_per_chunk" if r["device_busy_ms_per_chunk"] is None else "device_ms_per_chunk"
        part = {g: r["phases"][g][key] for g in CHUNK_REGIONS if r["phases"].get(g, {}).get(key) is not None}
        rest = timed - part.get("kvquant.update", 0.0) - part.get("kvquant.attention", 0.0)
        cells = [r["datatype"], str(len(ms)), f"{sum(ms) / 1e3:.2f}", f"{r['tokens_per_s']:.0f}", f"{ms[0]:.1f}",
                 f"{timed:.1f}"] + [f"{part[g]:.1f}" if g in part else "-" for g in CHUNK_REGIONS] + [f"{rest:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _main_decode(a: argparse.Namespace, device: str) -> dict[str, Any]:
    from dataclasses import replace

    from kvquant.bench.model import load_bench_model
    from kvquant.flags import parse_datatypes

    datatypes = parse_datatypes(a.datatype)
    bm = load_bench_model(a.model, a.dtype, device)
    quant = quant_config_from_args(a, datatype="nuq3")  # fp16 ignores it (transformers' DynamicCache)
    results = []
    for dt in datatypes:
        res = profile_decode(bm, dt, a.batch, a.tokens, quant if dt == "fp16" else replace(quant, datatype=dt),
                             steps=a.steps, warmup_steps=a.warmup_steps)
        results.append(res)
        print(f"\ndecode {dt}, {bm.name} ({'random weights' if bm.random_weights else bm.source}), B={a.batch}, "
              f"prompt {a.tokens}, on {device}: {res['wall_ms_per_step']:.2f} ms/step"
              + format_rows(res["rows"], a.top, device_times=device.startswith("cuda")))
    print("\n" + decode_summary(results))
    return {"model": bm.name, "random_weights": bm.random_weights, "results": results}


def _main_chunk(a: argparse.Namespace, device: str) -> dict[str, Any]:
    from dataclasses import replace

    from kvquant.bench.cuda import free_memory
    from kvquant.bench.model import load_bench_model

    bm = load_bench_model(a.model, a.dtype, device)
    quant = quant_config_from_args(a, datatype="nuq3")  # fp16 ignores it (transformers' DynamicCache)
    results = []
    for dt in parse_datatypes(a.datatype):
        res = profile_chunks(bm, dt, a.batch, a.tokens, a.chunk, quant if dt == "fp16" else replace(quant, datatype=dt),
                             steps=a.steps, sync_warnings=a.sync_warnings,
                             trace=None if a.trace is None else a.trace.with_name(f"{a.trace.name}.{dt}"))
        results.append(res)
        free_memory(device)  # the cache of this datatype is gone: give its blocks back before the next one
        print(f"\nchunked prefill {dt}, {bm.name} ({'random weights' if bm.random_weights else bm.source}), "
              f"B={a.batch}, {a.tokens} tokens in chunks of {a.chunk}, on {device}: {res['tokens_per_s']:.0f} tokens/s;"
              f" chunk ms {' '.join(f'{t:.1f}' for t in res['chunk_ms'])} (last {a.steps} profiled)"
              + format_rows(res["rows"], a.top, device_times=device.startswith("cuda")))
    print("\n" + chunk_summary(results))
    return {"model": bm.name, "random_weights": bm.random_weights, "results": results}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``kvquant bench profile``."""
    p = ArgumentParser(prog="kvquant bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["keys", "values", "decode", "chunk"], default="keys",
                   help="keys / values: one prefill quantization; decode: decode steps of --model; chunk: a chunked "
                        "prefill of --model (--tokens in forwards of --chunk), every chunk timed, the last --steps "
                        "profiled with the past read, attention and append labelled")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--heads", type=int, default=32, help="KV heads (32: Llama-2-7B, 8: GQA); keys/values only")
    p.add_argument("--tokens", type=parse_size, default=32768, help="prompt length S (32K or 32768)")
    p.add_argument("--head-dim", type=int, default=128, help="keys/values only")
    p.add_argument("--datatype", default="nuq3",
                   help="decode, chunk: a comma list, fp16 = transformers' DynamicCache")
    p.add_argument("--chunk", type=parse_size, default=None, help="chunk: tokens per prefill forward, < --tokens")
    add_quant_config_args(p)
    add_device_arg(p)
    p.add_argument("--model", default="random:7b", help="decode, chunk: model name, path or random:<preset>")
    p.add_argument("--dtype", default=None, help="decode, chunk: model dtype (default float16 on CUDA, float32 on CPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="decode: steps timed, then as many profiled (default 8); chunk: the last chunks profiled "
                        "(default 1)")
    p.add_argument("--warmup-steps", type=int, default=4, help="decode: untimed steps after the prefill")
    p.add_argument("--top", type=int, default=15, help="rows printed per table")
    p.add_argument("--sync-warnings", action="store_true",
                   help="chunk, on CUDA: warn once per source line that makes the host wait for the device")
    p.add_argument("--trace", type=Path, default=None,
                   help="chunk: a gzipped Chrome trace of the profiled chunks per datatype, "
                        "at TRACE.<datatype>.gz")
    p.add_argument("--out", type=Path, default=None, help="JSON file for every row")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvquant bench profile``. Returns a process exit code."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 1 if a.kind == "chunk" else 8
    for name in ("batch", "heads", "tokens", "head_dim", "top", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    if a.kind == "chunk":
        if a.chunk is None or not 1 <= a.chunk < a.tokens:
            p.error(f"--kind chunk needs 1 <= --chunk < --tokens ({a.tokens}), got {a.chunk}")
        if a.steps >= -(-a.tokens // a.chunk):
            p.error(f"--steps {a.steps}: only {-(-a.tokens // a.chunk) - 1} chunks follow the first")
    try:  # every value checked before a model is built
        if a.kind in ("decode", "chunk"):
            parse_datatypes(a.datatype)
            quant_config_from_args(a, datatype="nuq3")
        else:
            cfg = quant_config_from_args(a, datatype=a.datatype)
    except ValueError as exc:
        p.error(str(exc))
    device = resolve_device(a.device)
    if a.kind == "decode":
        doc = _main_decode(a, device)
    elif a.kind == "chunk":
        doc = _main_chunk(a, device)
    else:
        doc = profile_prefill(a.kind, a.batch, a.heads, a.tokens, a.head_dim, cfg, device)
        head = (f"prefill {a.kind} [{a.batch}, {a.heads}, {a.tokens}, {a.head_dim}] {a.datatype} on {device} "
                f"({a.backend} backend): {doc['wall_ms']:.2f} ms profiled, syncs {doc['syncs'] or 'none'}")
        print(head + format_rows(doc["rows"], a.top, device_times=device.startswith("cuda")))
    if a.out is not None:
        write_json_atomic(a.out, {"config": vars(a) | {"out": str(a.out), "device": device}, **doc})
        print(f"written to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
