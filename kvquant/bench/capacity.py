"""Capacity: the largest batch x context whose KV cache fits a GPU memory budget, fp16 vs each datatype.

**Analytic frontier.** KV bytes are modelled per layer as ``fixed + B * (per_seq + per_token * S)``. For
``fp16`` (transformers' ``DynamicCache``) ``per_token = 2 * H_kv * D * dtype_bytes`` and the rest is 0. For
a kvquant datatype the three coefficients are *measured*: random heavy-tailed K/V of the model's shape
(``[B, H_kv, S, D]``, Student-t with per-channel scales and outlier channels) are quantized with
:class:`~kvquant.quant.quantizer.BatchedKVQuantizer` at ``(B, S) = (1, S1), (1, S2), (2, S2)`` and the
bytes held (``QuantizedKVCache.memory_report()``: packed codes, scales, outliers, sinks, page table) are
fitted exactly. Then, with ``L`` layers and ``avail = budget - weights - reserve``::

    max_batch(S) = floor((avail - L * fixed) / (L * (per_seq + per_token * S)))

Weights count against the budget (``--memory-budget-gb``, default: the device's free memory before the
model is loaded). Activations are not modelled (use ``--reserve-gb`` for them).

**Empirical frontier (CUDA only).** With the model's weights on the GPU and the allocator capped at the
budget (``torch.cuda.set_per_process_memory_fraction``), the caches of every layer are actually built
for ``(B, S)`` and an out-of-memory error means "does not fit". ``fp16``: the ``2 * L`` K/V tensors a
``DynamicCache`` holds. Quantized: the first and the last layer are quantized for real from random K/V,
generated and appended in chunks of about ``--chunk-mib`` of fp16 input (a chunked prefill; pages are
reserved for the whole context up front, the outlier store for the measured outlier rate + 10%), with key
ranges fixed from a sample (as calibration does); the layers in between are copies of the first
(``copy.deepcopy``: the same bytes and allocations, without the quantization time; ``--quantize-all-layers``
quantizes every layer). Quantizing the last layer when memory is fullest includes the transient memory of
quantization in the test. For each context, the batch is searched starting at the analytic value:
doubling steps up (or down) until the answer changes, then bisection (at most ``--max-probes`` probes).

Output: ``capacity.json`` in ``--out`` (rewritten after every context, so an interrupted run keeps what it
found) and a printed table. Random-weight models (``random:7b``) are fine here: only shapes matter.
"""


from __future__ import annotations

import argparse
import copy
import datetime as _dt
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvquant.bench.capacity_model import (
    HeavyTailedKV,
    KVFit,
    ModelShape,
    analytic_capacity,
    measure_fit,
)
from kvquant.bench.cuda import free_memory, gpu_name, is_cuda, is_oom
from kvquant.bench.model import BenchModel, load_bench_model
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
from kvquant.models.random import RANDOM_WEIGHTS_NOTE, build_random_model, is_random_model
from kvquant.report.tables import capacity_table

SCHEMA = "kvquant.bench.capacity/v1"
GIB = 2**30


@dataclass
class CapacitySettings:
    """What to compute (see ``kvquant bench capacity --help``)."""

    datatypes: list[str]
    contexts: list[int]
    quant: QuantConfig = field(default_factory=QuantConfig)
    budget_gb: float | None = None
    reserve_gb: float = 0.0
    empirical: bool = True
    max_probes: int = 8
    chunk_mib: float = 256.0
    quantize_all_layers: bool = False
    fit_lengths: tuple[int, int] = (512, 1024)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.datatypes or not self.contexts or min(self.contexts) < 1:
            raise ValueError("datatypes and contexts must be non-empty (contexts positive)")
        per_layer = [d for d in self.datatypes if parse_datatype(d).per_layer]
        if per_layer:
            raise ValueError(f"the capacity fit builds one width for every layer; {', '.join(per_layer)} sets widths "
                             "per layer (use the allocated widths' average, e.g. k4v2, or drop it)")
        if self.budget_gb is not None and self.budget_gb <= 0:
            raise ValueError(f"--memory-budget-gb must be positive, got {self.budget_gb}")
        if self.reserve_gb < 0 or self.max_probes < 1 or self.chunk_mib <= 0:
            raise ValueError("reserve must be >= 0, max probes >= 1 and chunk size > 0")
        s1, s2 = self.fit_lengths
        if not 0 < s1 < s2:
            raise ValueError(f"fit lengths must satisfy 0 < S1 < S2, got {self.fit_lengths}")


# ----------------------------------------------------------------------------------------------------
# empirical frontier


def search_max_batch(fits: Callable[[int], bool], guess: int, max_probes: int) -> dict[str, Any]:
    """Largest ``B`` with ``fits(B)`` (assumed monotone), starting from ``guess``.

    Returns ``{"max_batch": lo, "bracket": [lo, hi], "exact": hi == lo + 1, "probes": [[B, fits], ...]}``
    where ``lo`` fits (0: nothing fits) and ``hi`` does not (None: never failed within the probes).
    """
    lo, hi = 0, None
    probes: list[list[Any]] = []

    def test(b: int) -> bool:
        nonlocal lo, hi
        ok = bool(fits(b))
        probes.append([b, ok])
        if ok:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        return ok

    start = max(1, guess)
    if test(start):
        step = 1
        while hi is None and len(probes) < max_probes:
            test(lo + step)
            step *= 2
    else:
        step = 1
        while lo == 0 and hi > 1 and len(probes) < max_probes:
            test(max(1, hi - step))
            step *= 2
    while hi is not None and hi - lo > 1 and len(probes) < max_probes:
        test((lo + hi) // 2)
    return {"max_batch": lo, "bracket": [lo, hi], "exact": hi is not None and hi == lo + 1, "probes": probes}


class CacheProber:
    """Builds the caches of all layers for ``(B, S)`` on the GPU and reports whether they fit."""

    def __init__(self, shape: ModelShape, settings: CapacitySettings, device: torch.device, dtype: torch.dtype,
                 fits_: dict[str, KVFit]) -> None:
        self.shape, self.s, self.device, self.dtype = shape, settings, device, dtype
        self.fits = fits_
        self.sampler = HeavyTailedKV(shape.num_kv_heads, shape.head_dim, device, dtype, settings.seed)
        sample = self.sampler.sample(1, 2048).float()
        f = settings.quant.outlier_fraction
        q = torch.tensor([f / 2, 1 - f / 2], device=device) if f > 0 else torch.tensor([0.0, 1.0], device=device)
        lohi = torch.quantile(sample[0].transpose(1, 2).reshape(-1, sample.shape[2]), q, dim=1)
        self.key_ranges = (lohi[0].view(shape.num_kv_heads, shape.head_dim),
                           lohi[1].view(shape.num_kv_heads, shape.head_dim))
        del sample
        self.last: dict[str, Any] = {}

    def _quantized_layer(self, quantizer: Any, fit: KVFit, batch: int, length: int) -> tuple[Any, Any]:
        H, D = self.shape.num_kv_heads, self.shape.head_dim
        chunk = max(1, int(self.s.chunk_mib * 2**20 / 2) // (batch * H * D))
        first = min(length, max(chunk, self.s.quant.n_sink + 1))
        x = self.sampler.sample(batch, first)
        kq = quantizer.quantize_keys(x, key_ranges=self.key_ranges)
        del x
        x = self.sampler.sample(batch, first)
        vq = quantizer.quantize_values(x, hold_tokens=kq.hold_tokens)
        del x
        for store in (kq, vq):
            store.reserve(length - first)  # pages, and the values' per-page outlier blocks
        if kq.keep_outliers and fit.key_outlier_fraction:  # key outliers: as many as the fit measured
            kq.outliers.reserve(nnz=int(1.1 * fit.key_outlier_fraction * batch * length * H * D) + kq.config.block_nnz)
        pos = first
        while pos < length:
            n = min(chunk, length - pos)
            kq.append(self.sampler.sample(batch, n))
            vq.append(self.sampler.sample(batch, n))
            pos += n
        return kq, vq

    def __call__(self, datatype: str, batch: int, length: int) -> bool:
        """Whether the caches of every layer fit; details of the last probe in :attr:`last`."""
        L, H, D = self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim
        cuda = is_cuda(self.device)  # CPU works too (tests): no memory numbers, no real OOM
        free_memory(self.device)
        base = torch.cuda.memory_allocated(self.device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        held: list[Any] = []
        t0 = time.perf_counter()
        ok = True
        try:
            if datatype == "fp16":
                for _ in range(L):
                    held.append((torch.empty(batch, H, length, D, dtype=self.dtype, device=self.device),
                                 torch.empty(batch, H, length, D, dtype=self.dtype, device=self.device)))
            else:
                from kvquant.quant.quantizer import BatchedKVQuantizer

                quantizer = BatchedKVQuantizer(replace(self.s.quant, datatype=datatype))
                fit = self.fits[datatype]
                for i in range(L):
                    if i == 0 or i == L - 1 or self.s.quantize_all_layers:
                        held.append(self._quantized_layer(quantizer, fit, batch, length))
                    else:
                        held.append(copy.deepcopy(held[0]))
            if cuda:
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            if not is_oom(exc):
                raise
            ok = False
        held_bytes = None
        if ok and datatype != "fp16":
            held_bytes = sum(int(c.memory_report()["total"]) for layer in held for c in layer)
        elif ok:
            held_bytes = sum(t.numel() * t.element_size() for layer in held for t in layer)
        used = torch.cuda.memory_allocated(self.device) - base if ok and cuda else None
        peak = torch.cuda.max_memory_allocated(self.device) - base if cuda else None
        self.last = {"batch": batch, "context": length, "fits": ok, "kv_bytes_held": held_bytes,
                     "kv_bytes_allocated": used,
                     "peak_bytes_above_weights": peak, "seconds": time.perf_counter() - t0}
        del held
        free_memory(self.device)
        return ok


# ----------------------------------------------------------------------------------------------------
# driver


def _shape_model(name: str | None, dtype: str | torch.dtype | None, device: str, empirical: bool, seed: int
                 ) -> tuple[BenchModel | None, ModelShape, dict[str, Any]]:
    """The model on the device when the empirical check runs, else only its shape (meta device)."""
    if dtype is None:  # capacity is a GPU question: half precision unless told otherwise, on any device
        dtype = torch.float16
    if empirical:
        bm = load_bench_model(name, dtype, device, seed)
        return bm, ModelShape.of(bm.model), {"model": bm.name, "model_source": bm.source,
                                             "random_weights": bm.random_weights}
    if is_random_model(name):
        from kvquant.models.loading import parse_dtype

        dt = parse_dtype(dtype)
        model = build_random_model(name, dt if isinstance(dt, torch.dtype) else torch.float16, "meta", seed)
        return None, ModelShape.of(model), {"model": name, "model_source": "config only (meta device)",
                                            "random_weights": True}
    bm = load_bench_model(name, dtype, "cpu", seed)
    return None, ModelShape.of(bm.model), {"model": bm.name, "model_source": bm.source, "random_weights": False}


def empirical_frontier(doc: dict[str, Any], shape: ModelShape, settings: CapacitySettings, dev: torch.device,
                       dtype: torch.dtype, fits: dict[str, KVFit], budget: float, total: float, out_path: Path
                       ) -> None:
    """Search the largest batch of every row of ``doc`` on the GPU, the allocator capped at ``budget``;
    ``doc`` is updated and rewritten to ``out_path`` after every row."""
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), dev)
    try:
        prober = CacheProber(shape, settings, dev, dtype, fits)
        bar = tqdm(doc["rows"], desc="capacity probes", disable=not settings.progress, file=sys.stderr)
        for row in bar:
            bar.set_postfix_str(f"{row['datatype']} S={row['context']}")
            details: list[dict[str, Any]] = []

            def fits_fn(b: int, row: dict[str, Any] = row, details: list = details) -> bool:
                ok = prober(row["datatype"], b, row["context"])
                details.append(dict(prober.last))
                return ok

            res = search_max_batch(fits_fn, row["analytic_max_batch"], settings.max_probes)
            row.update(empirical_max_batch=res["max_batch"], empirical_exact=res["exact"],
                       empirical_bracket=res["bracket"], probes=details,
                       empirical_max_tokens=res["max_batch"] * row["context"])
            write_json_atomic(out_path, doc)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


def run_capacity(model: str | None, dtype: str | None, device: str, settings: CapacitySettings, out_dir: str | Path
                 ) -> int:
    """Compute (and on CUDA check) the capacity frontier; writes ``<out_dir>/capacity.json``."""
    out_dir = Path(out_dir)
    dev = torch.device(device)
    cuda = is_cuda(dev)
    if cuda and dev.index is None:  # set_per_process_memory_fraction needs an explicit index
        dev = torch.device("cuda", torch.cuda.current_device())
    empirical = settings.empirical and cuda
    total = free0 = None
    held_elsewhere = None
    if cuda:
        free0, total = torch.cuda.mem_get_info(dev)
        held_elsewhere = total - free0 - torch.cuda.memory_reserved(dev)
        if held_elsewhere > 0.05 * total:
            print(f"WARNING: {held_elsewhere / GIB:.1f} GiB of the GPU's {total / GIB:.1f} GiB are held by other "
                  "processes: empirical probes will fit less than the analytic frontier (rerun on an idle GPU)",
                  file=sys.stderr)
    if settings.budget_gb is not None:
        budget, budget_source = settings.budget_gb * GIB, f"--memory-budget-gb {settings.budget_gb}"
    elif cuda:
        budget, budget_source = float(free0), "free memory of the device before loading the model"
    else:
        print("kvquant bench capacity: on a CPU device --memory-budget-gb is required", file=sys.stderr)
        return 2
    if total is not None and budget > total:
        print(f"budget {budget / GIB:.1f} GiB is more than the device's {total / GIB:.1f} GiB", file=sys.stderr)
        return 2
    print(f"loading model {model or '(default)'} ...", file=sys.stderr)
    bm, shape, info = _shape_model(model, dtype, str(dev), empirical, settings.seed)
    tdtype = getattr(torch, shape.dtype)
    note = RANDOM_WEIGHTS_NOTE if info["random_weights"] else None
    if note:
        print(f"NOTE: {note}", file=sys.stderr)
    print(f"shape: {shape.num_layers} layers, {shape.num_heads} heads / {shape.num_kv_heads} KV heads, head dim "
          f"{shape.head_dim}; {shape.params / 1e9:.2f} B params = {shape.weights_bytes / GIB:.2f} GiB; "
          f"budget {budget / GIB:.2f} GiB ({budget_source})", file=sys.stderr)
    fit_device = dev if cuda else torch.device("cpu")
    fits = {dt: measure_fit(shape, dt, settings.quant, fit_device, tdtype, settings.fit_lengths, settings.seed)
            for dt in settings.datatypes}
    reserve = settings.reserve_gb * GIB
    doc: dict[str, Any] = {
        "schema": SCHEMA, "kind": "capacity",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **info, "note": note, "device": str(dev), "gpu_name": gpu_name(dev), "torch_version": torch.__version__,
        "shape": asdict(shape), "weights_bytes": shape.weights_bytes, "budget_bytes": budget,
        "budget_source": budget_source, "device_total_bytes": total, "held_by_other_processes_bytes": held_elsewhere,
        "reserve_bytes": reserve,
        "quant": settings.quant.to_dict(), "contexts": settings.contexts,
        "empirical": empirical, "empirical_note": None if empirical else (
            "empirical check skipped: " + ("--no-empirical" if cuda else "needs a CUDA device")),
        "method": __doc__.split("\n\n")[1].replace("\n", " ").strip(),
        "datatypes": {}, "rows": [],
    }
    for dt, fit in fits.items():
        doc["datatypes"][dt] = {"fit": asdict(fit),
                                "analytic": analytic_capacity(shape, fit, budget, reserve, settings.contexts)}
    for dt in settings.datatypes:
        a = doc["datatypes"][dt]["analytic"]
        for s in settings.contexts:
            r = a["rows"][s]
            doc["rows"].append({"datatype": dt, "context": s, "analytic_max_batch": r["max_batch"],
                                "analytic_max_tokens": r["max_tokens"], "empirical_max_batch": None,
                                "empirical_exact": None, "empirical_bracket": None, "probes": []})
    out_path = out_dir / "capacity.json"
    write_json_atomic(out_path, doc)
    code = 0
    if empirical:
        assert bm is not None
        try:
            empirical_frontier(doc, shape, settings, dev, tdtype, fits, budget, total, out_path)
        except Exception as exc:  # keep (and print) the analytic frontier whatever happens on the GPU
            traceback.print_exc(file=sys.stderr)
            doc["empirical_note"] = f"empirical check failed: {type(exc).__name__}: {str(exc)[:300]}"
            write_json_atomic(out_path, doc)
            code = 1
    print(capacity_table(doc))
    print(f"\n(analytic / empirical max batch; '?' = empirical search stopped before bracketing exactly; "
          f"budget {budget / GIB:.2f} GiB incl. {shape.weights_bytes / GIB:.2f} GiB of weights)")
    if note:
        print(f"({doc['model']}: {note})")
    if doc.get("empirical_note") and empirical:
        print(doc["empirical_note"])
    print(f"results in {out_path}")
    return code


def add_capacity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="GPU memory budget in GiB, weights included (default: free memory of the device)")
    p.add_argument("--reserve-gb", type=float, default=0.0, help="memory kept aside for activations (GiB)")
    p.add_argument("--no-empirical", action="store_true", help="analytic frontier only (no GPU allocation)")
    p.add_argument("--max-probes", type=int, default=8, help="empirical probes per (datatype, context)")
    p.add_argument("--chunk-mib", type=float, default=256.0, help="fp16 K/V chunk quantized at a time (MiB)")
    p.add_argument("--quantize-all-layers", action="store_true",
                   help="quantize every layer for real (default: first and last; the rest are copies)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``kvquant bench capacity``."""
    p = ArgumentParser(prog="kvquant bench capacity", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--datatypes", default="fp16,nuq4,nuq3,nuq2",
                   help="comma list of fp16, nuq2-4, int2-4, k<K>v<V> (k4v2: 4-bit keys, 2-bit values), int-k<K>v<V>")
    add_quant_config_args(p)
    p.add_argument("--contexts", default="1K..128K", help="contexts: list (4096,32768) or doubling range")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_capacity_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvquant bench capacity``."""
    p = build_parser()
    a = p.parse_args(argv)
    try:
        settings = CapacitySettings(
            datatypes=parse_datatypes(a.datatypes), contexts=parse_size_list(a.contexts),
            quant=quant_config_from_args(a),
            budget_gb=a.memory_budget_gb, reserve_gb=a.reserve_gb, empirical=not a.no_empirical,
            max_probes=a.max_probes, chunk_mib=a.chunk_mib, quantize_all_layers=a.quantize_all_layers, seed=a.seed,
            progress=not a.no_progress)
    except ValueError as exc:
        p.error(str(exc))
    return run_capacity(a.model, a.dtype, resolve_device(a.device), settings, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
