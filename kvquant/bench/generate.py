"""End-to-end generation benchmark: prefill latency, decode throughput, memory, KV bytes and energy.

For every (datatype, batch, prompt length) configuration, in that order:

1. ``--warmup`` untimed rehearsals of the same configuration (same datatype, batch, prompt length and number
   of new tokens, another random prompt) so that one-off costs are not timed: CUDA context, cuBLAS heuristics,
   Triton compilation for every shape the run meets, and the caching allocator's first ``cudaMalloc`` of each
   block the growing caches need (the rehearsal's blocks stay cached for the timed run, as they would in a
   serving process). On an H200, plain ``generate`` on the random 7B shape takes 74-81 ms per decode step the
   first time a prompt length runs in a process and 25-27 ms afterwards; a short warm-up (128-token prompt,
   3 tokens, then ``empty_cache``) leaves most of that one-off cost in the timed run;
2. a **prefill** and 3. a **decode loop** of ``gen - 1`` greedy steps (:func:`kvquant.bench.runs.run_generation`,
   which also says how they are timed). Reported rates count every sequence of the batch:

* ``prefill_tokens_per_s = B * S / prefill_s``;
* ``decode_tokens_per_s = B * (gen - 1) / decode_s`` (tokens produced by the decode forwards);
* ``e2e_tokens_per_s = B * gen / (prefill_s + decode_s)`` (all new tokens over the whole request).

Caches: ``fp16`` is transformers' ``DynamicCache`` in the model dtype (the real baseline); every other
datatype is a :class:`~kvquant.cache.hf_cache.KVQuantCache` with its default backend. With ``--graph`` every
decode step is replayed from a CUDA graph (:func:`kvquant.bench.runs.run_generation_graph`): ``fp16`` is then
transformers' ``StaticCache`` (what a speed-minded user runs), the quantized caches run in static mode. KV bytes: the
cache's ``memory_report()`` (bytes held) for kvquant, the K/V tensors' bytes for ``DynamicCache``; both
after the last decode step. Peak memory: ``torch.cuda.max_memory_allocated`` (weights included), reset
before each timed run; ``None`` on CPU. Energy: one :class:`~kvquant.energy.DetailedEnergyProfiler`
region for the prefill and one for the decode loop (NVML); ``j_per_token`` is their summed energy over
the ``B * gen`` new tokens. Without NVML (or on CPU) every energy field is ``None`` and
``energy_note`` says why. Prompts are real text tokens (``--data``) when the model has a tokenizer, else
uniform random token ids (``prompt_source``). A CUDA out-of-memory error is recorded as status ``OOM``;
larger configurations of the same datatype (batch and length both >=) are then recorded as
``skipped`` without running (``--no-skip-after-oom`` runs them anyway).

``--at-capacity`` runs each datatype at the largest batch that fits ``--memory-budget-gb`` (weights included, less
``--reserve-gb``) at each prompt length plus the new tokens: the analytic capacity of ``kvquant bench capacity``,
from bytes per token measured on real quantized caches of the model's shape. A batch that runs out of memory (the
activations are not in the bytes model) is retried up to three times, 10 % smaller each; records carry
``at_capacity``, ``memory_budget_gb``, ``capacity_batch`` (the analytic one) and ``capacity_tries``. On a GPU the
process is capped at the budget (``torch.cuda.set_per_process_memory_fraction``), so an 80 GB budget behaves as an
80 GB GPU. Every record says ``mode``: ``eager`` or ``graph``.

Several GPUs (``docs/multi_gpu.md``): ``--device-map auto`` spreads the layers over the GPUs (accelerate); peak
memory is then summed over the GPUs the model uses and ``kv_bytes_by_device`` splits the cache's bytes by device.
Under ``torchrun`` (``WORLD_SIZE`` > 1, or ``--nproc N``, which relaunches the command under
``torch.distributed.run``) the model is loaded with ``tp_plan="auto"``; every rank measures its own GPU and
:func:`kvquant.bench.parallel.merge_rank_records` merges the ranks' records (per-rank memory, KV bytes and energy;
totals summed over the ranks; the slowest rank's times); rank 0 alone writes them.

Files in ``--out``: ``generate.jsonl`` (one JSON object per configuration, written as soon as it ends),
``generate.csv`` (same fields), ``energy/`` (the profiler's per-region power samples and summary).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvquant.bench.capacity import CapacitySettings, add_capacity_args, run_capacity
from kvquant.bench.cuda import free_memory, gpu_name, is_cuda, is_oom
from kvquant.bench.energy_regions import ENERGY_FIELDS, EnergyRegions
from kvquant.bench.model import BenchModel, load_bench_model
from kvquant.bench.parallel import merged, torchrun_command, world_from_env
from kvquant.bench.results import ResultWriter
from kvquant.bench.runs import (
    cache_memory,
    make_cache,
    make_prompts,
    run_generation,
    run_generation_graph,
)
from kvquant.config import QuantConfig
from kvquant.datatypes import parse_datatype
from kvquant.files import write_json_atomic
from kvquant.flags import (
    ArgumentParser,
    add_model_args,
    add_quant_config_args,
    parse_datatypes,
    parse_size_list,
    quant_config_from_args,
    resolve_device,
)
from kvquant.models.random import RANDOM_WEIGHTS_NOTE
from kvquant.report.markdown import fmt_num, format_table

SCHEMA = "kvquant.bench.generate/v1"

#: Every record has exactly these keys (also the CSV header), ``None`` where a value is unavailable.
FIELDS: list[str] = [
    "schema", "kind", "run_id", "timestamp", "model", "model_source", "random_weights", "note",
    "device", "gpu_name", "torch_version", "dtype", "kv_dtype",
    "datatype", "batch", "prompt_len", "gen_tokens", "warmup", "prompt_source", "calibration",
    "outlier_fraction", "n_sink", "residual_length", "cache_class", "cache_backend", "mode", "prefill_chunk",
    "at_capacity", "memory_budget_gb", "capacity_batch", "capacity_tries",
    "status", "error",
    "prefill_s", "decode_s", "total_s", "decode_steps", "decode_ms_per_step",
    "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s", "generated_tokens",
    "weights_bytes", "peak_memory_bytes", "peak_memory_note",
    "kv_tokens", "kv_elements", "kv_bytes", "kv_bytes_allocated", "kv_bytes_used", "kv_fp16_bytes", "bits_per_element",
    "compression_vs_fp16", "logits_finite",
    *ENERGY_FIELDS,
    "device_map", "world_size", "kv_bytes_by_device", "rank_peak_memory_bytes", "rank_kv_bytes", "rank_energy_j",
]


@dataclass
class GenerateSettings:
    """What to run (see ``kvquant bench generate --help``)."""

    datatypes: list[str]
    batches: list[int]
    prompt_lens: list[int]
    gen: int = 128
    warmup: int = 1
    calibration: str | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: str = "wikitext2-raw"
    energy: str = "auto"  # auto | on | off
    gpu_id: int | None = None
    country: str | None = "USA"
    grid_intensity: float | None = None
    grid_region: str | None = None
    seed: int = 0
    skip_after_oom: bool = True
    progress: bool = True
    graph: bool = False  # decode steps replayed from a CUDA graph (fp16: StaticCache)
    at_capacity: bool = False  # each datatype at the largest batch that fits memory_budget_gb (see capacity_batches)
    memory_budget_gb: float | None = None
    reserve_gb: float = 0.0
    prefill_chunk: int | None = None  # prompt fed in forwards of this many tokens
    device_map: str | None = None  # the model was loaded with from_pretrained(device_map=...)
    world_size: int = 1  # tensor-parallel ranks (torchrun); records are merged over them
    rank: int = 0

    def __post_init__(self) -> None:
        if self.gen < 1:
            raise ValueError(f"--gen must be >= 1, got {self.gen}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.energy not in ("auto", "on", "off"):
            raise ValueError(f"energy must be auto, on or off, got {self.energy!r}")
        if not self.batches or min(self.batches) < 1 or not self.prompt_lens or min(self.prompt_lens) < 1:
            raise ValueError("batches and prompt lengths must be non-empty lists of positive integers")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be >= 1, got {self.prefill_chunk}")
        if self.at_capacity and (self.memory_budget_gb is None or self.memory_budget_gb <= 0):
            raise ValueError("--at-capacity needs a positive --memory-budget-gb")
        if self.at_capacity and any(parse_datatype(d).per_layer for d in self.datatypes):
            raise ValueError("--at-capacity sizes the batch from one width for every layer; nuq-alloc sets widths "
                             "per layer")


def measure_config(bm: BenchModel, settings: GenerateSettings, datatype: str, batch: int, prompt_len: int,
                   calibration: Any | None, energy: EnergyRegions) -> dict[str, Any]:
    """Warm up, then run and measure one configuration; returns the measured record fields.

    Raises whatever the run raises (``torch.cuda.OutOfMemoryError`` included): the caller records it.
    """
    dev = bm.device
    run = run_generation_graph if settings.graph else run_generation
    static_len = prompt_len + settings.gen if settings.graph else None
    for i in range(settings.warmup):  # full untimed rehearsals of this exact configuration
        w_prompt, _ = make_prompts(bm, batch, prompt_len, None, settings.seed + 1000 + i)
        run(bm.model, w_prompt, make_cache(bm, datatype, settings.quant, calibration, reserve_tokens=settings.gen,
                                           static_len=static_len), settings.gen, dev,
            prefill_chunk=settings.prefill_chunk)
        del w_prompt
    gc.collect()  # no empty_cache here: the timed run reuses the rehearsal's allocator blocks (steady state)
    prompt, source = make_prompts(bm, batch, prompt_len, settings.data, settings.seed)
    cache = make_cache(bm, datatype, settings.quant, calibration, reserve_tokens=settings.gen, static_len=static_len)
    gpus = _cuda_devices(bm)
    for d in gpus:
        torch.cuda.reset_peak_memory_stats(d)
    store: dict[str, Any] = {}
    tag = f"{datatype}_b{batch}_s{prompt_len}"
    with energy.regions(tag, store) as region:
        res = run(bm.model, prompt, cache, settings.gen, dev, region, prefill_chunk=settings.prefill_chunk)
    peak = sum(torch.cuda.max_memory_allocated(d) for d in gpus) if gpus else None
    B, gen = batch, settings.gen
    generated = B * gen
    prefill_s, decode_s = res["prefill_s"], res["decode_s"]
    steps = res["decode_steps"]
    rec: dict[str, Any] = {
        "prompt_source": source,
        "cache_class": type(cache).__name__,
        "cache_backend": (str(getattr(cache, "backend", None) or getattr(cache.config, "backend", None) or "default")
                          if datatype != "fp16" else f"transformers {type(cache).__name__}")
        + (" + CUDA graph" if settings.graph else ""),
        "prefill_s": prefill_s, "decode_s": decode_s if steps else None, "total_s": prefill_s + decode_s,
        "decode_steps": steps, "decode_ms_per_step": 1e3 * decode_s / steps if steps else None,
        "prefill_tokens_per_s": B * prompt_len / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": B * steps / decode_s if steps and decode_s > 0 else None,
        "e2e_tokens_per_s": generated / (prefill_s + decode_s) if prefill_s + decode_s > 0 else None,
        "generated_tokens": generated,
        "peak_memory_bytes": peak,
        "peak_memory_note": None if peak is not None else "unavailable: not a CUDA device",
        "kv_tokens": prompt_len + steps,
        "logits_finite": bool(torch.isfinite(res["logits"]).all()),
    }
    rec.update(cache_memory(cache))
    rec["kv_bytes_by_device"] = _kv_bytes_by_device(cache)
    rec.update(energy.fields(store, generated))
    del res, cache, prompt
    return rec


def _cuda_devices(bm: BenchModel) -> list[torch.device]:
    """The CUDA devices the model's weights are on (several under ``device_map``; none on the CPU)."""
    devs = [p.device for p in bm.model.parameters() if p.device.type == "cuda"]
    if is_cuda(bm.device):
        devs.append(torch.device(bm.device))
    return distinct_cuda_devices(devs, torch.cuda.current_device() if devs else 0)


def distinct_cuda_devices(devices: list[torch.device], current: int) -> list[torch.device]:
    """Each CUDA device of ``devices`` once, with its index (``cuda`` is ``cuda:<current>``): the peak memory
    summed over them counts every device once."""
    out = {torch.device("cuda", d.index if d.index is not None else current) for d in devices if d.type == "cuda"}
    return sorted(out, key=lambda d: d.index)


def _kv_bytes_by_device(cache: Any) -> dict[str, int] | None:
    """The cache's bytes held per device (``memory_report()["by_device"]``; a DynamicCache's K/V tensors)."""
    if hasattr(cache, "memory_report") and hasattr(cache, "quantizer_for"):
        by = cache.memory_report().get("by_device")
        return {k: int(v) for k, v in by.items()} if by else None
    from kvquant.bench.runs import _dynamic_kv_tensors
    from kvquant.cache.parallel import device_key

    out: dict[str, int] = {}
    for t in _dynamic_kv_tensors(cache):
        out[device_key(t.device)] = out.get(device_key(t.device), 0) + t.numel() * t.element_size()
    return out or None


# ----------------------------------------------------------------------------------------------------
# the sweep


def _base_record(bm: BenchModel, s: GenerateSettings, run_id: str, datatype: str, batch: int, length: int
                 ) -> dict[str, Any]:
    rec: dict[str, Any] = {k: None for k in FIELDS}
    rec.update(
        schema=SCHEMA, kind="generate", run_id=run_id,
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=bm.name, model_source=bm.source, random_weights=bm.random_weights,
        note=RANDOM_WEIGHTS_NOTE if bm.random_weights else None,
        device=str(bm.device), gpu_name=gpu_name(bm.device), torch_version=torch.__version__,
        dtype=str(bm.dtype).removeprefix("torch."),
        kv_dtype=str(bm.dtype).removeprefix("torch.") if datatype == "fp16" else datatype,
        datatype=datatype, batch=batch, prompt_len=length, gen_tokens=s.gen, warmup=s.warmup,
        calibration=s.calibration, outlier_fraction=s.quant.outlier_fraction if datatype != "fp16" else None,
        n_sink=s.quant.n_sink if datatype != "fp16" else None,
        residual_length=s.quant.residual_length if datatype != "fp16" else None,
        weights_bytes=bm.weights_bytes,
        peak_memory_note=None if is_cuda(bm.device) else "unavailable: not a CUDA device",
        mode="graph" if s.graph else "eager", prefill_chunk=s.prefill_chunk, at_capacity=s.at_capacity,
        memory_budget_gb=s.memory_budget_gb if s.at_capacity else None, device_map=s.device_map,
        world_size=s.world_size,
    )
    return rec


def capacity_batches(bm: BenchModel, settings: GenerateSettings) -> dict[tuple[str, int], int]:
    """The largest batch of each (datatype, prompt length) that fits ``memory_budget_gb`` (weights included, less
    ``reserve_gb`` for activations): :func:`~kvquant.bench.capacity_model.analytic_capacity` with each datatype's
    bytes per token measured on real quantized caches of the model's shape, at the prompt length plus the new
    tokens. 0 where not even one sequence fits."""
    from kvquant.bench.capacity_model import ModelShape, analytic_capacity, measure_fit

    shape = ModelShape.of(bm.model)
    budget, reserve = settings.memory_budget_gb * 2**30, settings.reserve_gb * 2**30
    fit_device = bm.device if is_cuda(bm.device) else torch.device("cpu")
    out = {}
    for dt in settings.datatypes:
        fit = measure_fit(shape, dt, settings.quant, fit_device, bm.dtype, seed=settings.seed)
        contexts = [s + settings.gen for s in settings.prompt_lens]
        rows = analytic_capacity(shape, fit, budget, reserve, contexts)["rows"]
        for s in settings.prompt_lens:
            out[(dt, s)] = int(rows[s + settings.gen]["max_batch"])
    return out


def run_generate_benchmark(bm: BenchModel, settings: GenerateSettings, out_dir: str | Path) -> list[dict[str, Any]]:
    """Run every configuration, writing each record to ``out_dir`` as soon as it ends; returns the records."""
    out_dir = Path(out_dir)
    lead = settings.rank == 0  # under torchrun only rank 0 writes and reports
    writer = ResultWriter(out_dir, "generate", FIELDS) if lead else None
    calibration = None
    if settings.calibration:
        from kvquant.calibration import Calibration

        calibration = Calibration.load(settings.calibration)
    for dt in settings.datatypes:  # fail fast on an incompatible calibration, before any measurement
        if dt != "fp16":
            make_cache(bm, dt, settings.quant, calibration)
    # (each rank measures its own GPU, into its own folder)
    energy_dir = out_dir if settings.world_size == 1 else out_dir / f"rank{settings.rank}"
    energy = EnergyRegions(settings, bm.device, energy_dir)
    carbon = None
    if settings.grid_region and energy.profiler is not None:
        from kvquant.energy import CarbonTracker

        carbon = CarbonTracker(out_dir / "codecarbon", country_iso_code=settings.country or "USA",
                               region=settings.grid_region).start()
    run_id = uuid.uuid4().hex[:12]
    if settings.at_capacity:  # each datatype at its own largest batch per prompt length
        capacity = capacity_batches(bm, settings)
        configs = [(dt, capacity[(dt, s)], s) for s in settings.prompt_lens for dt in settings.datatypes]
        _limit_to_budget(bm.device, settings.memory_budget_gb)
    else:  # shape-major, datatypes innermost: a run stopped early still compares every datatype on its shapes
        configs = [(dt, b, s) for b in settings.batches for s in settings.prompt_lens for dt in settings.datatypes]
    records: list[dict[str, Any]] = []
    ooms: dict[str, list[tuple[int, int]]] = {}
    bar = tqdm(configs, desc="bench generate", disable=not (settings.progress and lead), file=sys.stderr)
    try:
        for i, (dt, b, s) in enumerate(bar):
            bar.set_postfix_str(f"{dt} B={b} S={s}")
            t_config = time.perf_counter()
            rec = _base_record(bm, settings, run_id, dt, b, s)
            smaller = [(ob, os_) for ob, os_ in ooms.get(dt, []) if ob <= b and os_ <= s]
            if settings.at_capacity:
                rec["capacity_batch"] = b
                _run_at_capacity(rec, bm, settings, dt, b, s, calibration, energy)
            elif settings.skip_after_oom and smaller:
                rec["status"] = "skipped"
                rec["error"] = f"not run: batch {smaller[0][0]} x prompt {smaller[0][1]} already ran out of memory"
            else:
                _run_recorded(rec, bm, settings, dt, b, s, calibration, energy)
            rec = merged(rec, settings.world_size)  # every rank's, gathered (the same on every rank)
            if rec["status"] == "OOM" and not settings.at_capacity:
                ooms.setdefault(dt, []).append((b, s))
            records.append(rec)
            if writer is not None:
                writer.write(rec)
                tqdm.write(f"[{i + 1}/{len(configs)}] {_config_line(rec)} ({time.perf_counter() - t_config:.1f} s)",
                           file=sys.stderr)
    finally:
        bar.close()
        energy.close()
        if carbon is not None:
            m = carbon.stop()
            write_json_atomic(out_dir / "codecarbon_run.json", {"run_id": run_id, **m.to_dict(),
                                                               "region": settings.grid_region})
    return records


def _run_recorded(rec: dict[str, Any], bm: BenchModel, settings: GenerateSettings, dt: str, b: int, s: int,
                  calibration: Any | None, energy: EnergyRegions) -> str:
    """Measure one configuration into ``rec`` (its fields, or status OOM / error); returns the status."""
    try:
        rec.update(measure_config(bm, settings, dt, b, s, calibration, energy))
        rec["status"], rec["error"] = "ok", None
    except Exception as exc:
        if is_oom(exc):
            rec["status"] = "OOM"
            rec["error"] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "OOM"
        else:
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            traceback.print_exc(file=sys.stderr)
    free_memory(bm.device)
    if rec["energy_note"] is None and not rec["energy_available"]:
        rec["energy_note"] = energy.note or "unavailable: configuration did not complete"
    return rec["status"]


#: At capacity, a batch that runs out of memory (activations the bytes model does not count) is retried this many
#: times, each 10 % smaller.
CAPACITY_RETRIES = 3


def _run_at_capacity(rec: dict[str, Any], bm: BenchModel, settings: GenerateSettings, dt: str, b: int, s: int,
                     calibration: Any | None, energy: EnergyRegions) -> None:
    """Run ``dt`` at its capacity batch ``b``, confirming it fits: on OOM retry smaller batches (recorded in
    ``capacity_tries``); ``rec["batch"]`` is the batch that ran."""
    tries: list[int] = []
    if b < 1:
        rec["status"], rec["error"] = "skipped", "not one sequence fits the memory budget"
        rec["capacity_tries"] = tries
        return
    while True:
        tries.append(b)
        rec["batch"] = b
        status = _run_recorded(rec, bm, settings, dt, b, s, calibration, energy)
        if status != "OOM" or len(tries) > CAPACITY_RETRIES or b == 1:
            break
        b = max(1, int(b * 0.9))
    rec["capacity_tries"] = tries


def _limit_to_budget(device: torch.device, budget_gb: float | None) -> None:
    """On a GPU, cap this process's allocations at the budget (an 80 GB GPU's run on a larger one)."""
    if budget_gb is None or not is_cuda(device):
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if budget_gb * 2**30 > total:
        raise ValueError(f"--memory-budget-gb {budget_gb} is more than the device's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(budget_gb * 2**30 / total, index)


def _config_line(r: dict[str, Any]) -> str:
    """One log line for a finished configuration (written as each one ends, progress bar or not)."""
    head = f"{r['datatype']} B={r['batch']} S={r['prompt_len']}: {r['status']}"
    if r["status"] != "ok":
        return f"{head} ({r.get('error') or ''})"[:300]
    kv_mib = (r.get("kv_bytes") or 0) / 2**20
    return (f"{head}, prefill {fmt_num(r.get('prefill_s'), '.3f')} s, decode "
            f"{fmt_num(r.get('decode_ms_per_step'), '.1f')} ms/step, KV {fmt_num(kv_mib, '.1f')} MiB, "
            f"{fmt_num(r.get('j_per_token'), '.3g')} J/token")


def results_table(records: list[dict[str, Any]]) -> str:
    """The printed summary table (Markdown)."""
    rows = []
    for r in records:
        peak = r.get("peak_memory_bytes")
        kvb = r.get("kv_bytes")
        rows.append([
            r["datatype"], r["batch"], r["prompt_len"], r["status"], fmt_num(r.get("prefill_s"), ".3f"),
            fmt_num(r.get("decode_tokens_per_s"), ".1f"), fmt_num(r.get("e2e_tokens_per_s"), ".1f"),
            fmt_num(peak / 2**30 if peak is not None else None, ".2f"),
            fmt_num(kvb / 2**20 if kvb is not None else None, ".1f"), fmt_num(r.get("bits_per_element"), ".2f"),
            fmt_num(r.get("j_per_token"), ".3g"), fmt_num(r.get("co2_g_per_1k_tokens"), ".3g"),
        ])
    return format_table(rows, ["datatype", "batch", "prompt", "status", "prefill s", "decode tok/s", "e2e tok/s",
                               "peak GiB", "KV MiB", "bits/elem", "J/token", "gCO2/1K tok"])


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``kvquant bench generate``."""
    p = ArgumentParser(prog="kvquant bench generate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--datatypes", default="fp16,nuq4,nuq3,nuq2",
                   help="comma list of fp16, nuq2-4, int2-4, k<K>v<V> (k4v2: 4-bit keys, 2-bit values), "
                        "int-k<K>v<V>, nuq-alloc (with a --calibration made with --bit-budget)")
    p.add_argument("--device-map", default=None, metavar="auto",
                   help="passed to from_pretrained(device_map=...): 'auto' spreads the layers over the GPUs "
                        "(--device is then ignored; docs/multi_gpu.md)")
    p.add_argument("--nproc", type=int, default=None,
                   help="tensor parallelism over N local GPUs: relaunches this command under torch.distributed.run "
                        "(tp_plan='auto'; the same as running it with torchrun --nproc-per-node N)")
    add_quant_config_args(p)
    p.add_argument("--batch", default="1,8,32", help="batch sizes: list (1,8,32) or doubling range (1..32)")
    p.add_argument("--prompt-len", default="1K..32K", help="prompt lengths: list (1024,4096) or doubling range")
    p.add_argument("--gen", type=int, default=128, help="new tokens per sequence")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed full rehearsals of each configuration before it is timed")
    p.add_argument("--calibration", default=None, help="calibration file from kvquant calibrate (optional)")
    p.add_argument("--data", default="wikitext2-raw", help="text for prompts when the model has a tokenizer")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="results folder")
    p.add_argument("--energy", choices=["auto", "on", "off"], default="auto",
                   help="NVML energy: auto = on CUDA devices only")
    p.add_argument("--gpu-id", type=int, default=None, help="NVML index of the GPU (default: the torch device's)")
    p.add_argument("--country", default="USA", help="ISO 3166-1 alpha-3 code for the grid carbon intensity")
    p.add_argument("--grid-intensity", type=float, default=None, help="g CO2eq/kWh (overrides --country)")
    p.add_argument("--grid-region", default=None,
                   help="sub-national region for an extra whole-run CodeCarbon measurement (e.g. california)")
    p.add_argument("--no-skip-after-oom", action="store_true",
                   help="also run configurations larger than one that ran out of memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one log line per configuration)")
    p.add_argument("--graph", action="store_true",
                   help="replay every decode step from a CUDA graph (no host launch cost): quantized caches in "
                        "static mode (triton backend), fp16 in transformers' StaticCache, the speed-minded baseline; "
                        "needs CUDA")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="feed each prompt in forwards of this many tokens (activations of a chunk, not of the whole "
                        "batch x prompt; default: one forward)")
    p.add_argument("--at-capacity", action="store_true",
                   help="run each datatype at the largest batch that fits --memory-budget-gb at each prompt length "
                        "(bytes per token measured on real quantized caches; a batch that runs out of memory is "
                        "retried smaller); --batch is ignored; on a GPU the process is capped at the budget")
    p.add_argument("--find-capacity", action="store_true",
                   help="instead of the throughput sweep, find the largest batch x context that fits "
                        "(same as kvquant bench capacity; --prompt-len gives the contexts)")
    add_capacity_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvquant bench generate``. Returns a process exit code."""
    p = build_parser()
    a = p.parse_args(argv)
    rank, world, local_rank = world_from_env()
    if a.nproc is not None and a.nproc < 1:
        p.error(f"--nproc must be >= 1, got {a.nproc}")
    if a.nproc is not None and a.nproc > 1 and world == 1:  # relaunch on N ranks; they run the lines below
        import subprocess

        return subprocess.call(torchrun_command(a.nproc, sys.argv[1:] if argv is None else argv))
    if world > 1:
        for flag, on in (("--device-map", a.device_map), ("--graph", a.graph), ("--at-capacity", a.at_capacity),
                         ("--find-capacity", a.find_capacity)):
            if on:
                p.error(f"{flag} does not run under tensor parallelism (torchrun, --nproc)")
    if a.device_map is not None and (a.graph or a.find_capacity):
        p.error("--device-map runs the eager benchmark only (no --graph, no --find-capacity)")
    try:
        datatypes = parse_datatypes(a.datatypes)
        batches = parse_size_list(a.batch)
        lens = parse_size_list(a.prompt_len)
        quant = quant_config_from_args(a)
    except ValueError as exc:
        p.error(str(exc))
    device = resolve_device(a.device)
    if world > 1 and torch.cuda.is_available():  # each rank on its own GPU
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif world > 1:
        device = "cpu"
    if a.graph and not is_cuda(device):
        p.error("--graph needs a CUDA device (CUDA graphs)")
    if a.find_capacity:
        try:
            cs = CapacitySettings(datatypes=datatypes, contexts=lens, quant=quant, budget_gb=a.memory_budget_gb,
                                  reserve_gb=a.reserve_gb, empirical=not a.no_empirical, max_probes=a.max_probes,
                                  chunk_mib=a.chunk_mib, quantize_all_layers=a.quantize_all_layers, seed=a.seed,
                                  progress=not a.no_progress)
        except ValueError as exc:
            p.error(str(exc))
        return run_capacity(a.model, a.dtype, device, cs, a.out)
    if a.calibration:  # a missing or invalid file fails here, not after the model is loaded
        from kvquant.calibration import Calibration
        from kvquant.calibration.format import find_calibration

        a.calibration = str(find_calibration(a.calibration))
        if not Path(a.calibration).is_file():
            raise FileNotFoundError(f"--calibration {a.calibration}: no such file")
        Calibration.load(a.calibration)
    try:
        settings = GenerateSettings(datatypes=datatypes, batches=batches, prompt_lens=lens, gen=a.gen,
                                    warmup=a.warmup, calibration=a.calibration, quant=quant, data=a.data,
                                    energy=a.energy, gpu_id=a.gpu_id, country=a.country,
                                    grid_intensity=a.grid_intensity, grid_region=a.grid_region, seed=a.seed,
                                    skip_after_oom=not a.no_skip_after_oom, progress=not a.no_progress,
                                    graph=a.graph, at_capacity=a.at_capacity, memory_budget_gb=a.memory_budget_gb,
                                    reserve_gb=a.reserve_gb, prefill_chunk=a.prefill_chunk, device_map=a.device_map,
                                    world_size=world, rank=rank)
    except ValueError as exc:
        p.error(str(exc))
    where = f"device_map={a.device_map}" if a.device_map else (f"{world} ranks, tp_plan=auto" if world > 1 else device)
    print(f"loading model {a.model or '(default)'} on {where} ...", file=sys.stderr)
    try:
        bm = load_bench_model(a.model, a.dtype, device, a.seed, device_map=a.device_map,
                              tp_plan="auto" if world > 1 else None)
    except ValueError as exc:
        p.error(str(exc))
    if rank:  # the other ranks measure; rank 0 writes and prints
        run_generate_benchmark(bm, settings, a.out)
        return 0
    print(f"model: {bm.name} ({bm.source}), {bm.weights_bytes / 2**30:.2f} GiB of weights, dtype "
          f"{str(bm.dtype).removeprefix('torch.')}", file=sys.stderr)
    if bm.random_weights:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    records = run_generate_benchmark(bm, settings, a.out)
    print(results_table(records))
    if bm.random_weights:
        print(f"\n({bm.name}: {RANDOM_WEIGHTS_NOTE})")
    n_bad = sum(r["status"] not in ("ok", "OOM", "skipped") for r in records)
    print(f"\n{len(records)} configurations ({n_bad} errors); results in {a.out}/generate.jsonl and .csv")
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
