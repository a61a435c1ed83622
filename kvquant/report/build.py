"""``kvquant report RESULTS_DIR``: assemble ``report.md`` (Markdown tables + PNG figures) from a results
folder. A missing input makes its section say what is missing; nothing here raises on bad data."""

from __future__ import annotations

import datetime as _dt
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvquant.models.random import RANDOM_WEIGHTS_NOTE
from kvquant.report import plots, tables
from kvquant.report.across import across_groups
from kvquant.report.load import Results, group_generate, group_ppl, load_results
from kvquant.report.longctx import longctx_sections
from kvquant.report.markdown import format_table
from kvquant.report.pareto import energy_per_datatype, tradeoff_points

FIGURES = "figures"
REPORT = "report.md"


class _Figures:
    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / FIGURES
        self.out_dir = out_dir
        self.written: list[Path] = []

    def add(self, fn: Callable[..., Path | None], name: str, *args: Any) -> str:
        """Run a plot function; the Markdown image link, or a sentence saying why there is none."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        try:
            got = fn(*args[:-1], path, args[-1]) if args else fn(path)
        except ImportError as exc:
            return f"_Figure skipped: matplotlib is not installed ({exc}); `pip install kvquant[report]`._"
        except Exception as exc:  # a figure must never stop the report
            traceback.print_exc()
            return f"_Figure `{name}` failed: {type(exc).__name__}: {exc}._"
        if got is None:
            return "_No data to plot._"
        self.written.append(got)
        return f"![{name}]({got.relative_to(self.out_dir).as_posix()})"


def _slug(*parts: Any) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", "_".join(str(p) for p in parts)).strip("_").lower()[:80]


def _generation_sections(res: Results, figs: _Figures) -> list[str]:
    out = ["## Generation benchmark (`kvquant bench generate`)", ""]
    if not res.generate:
        out += [f"_Missing: no `kvquant bench generate` results (`generate.jsonl` / `generate.csv`) in "
                f"`{res.root}`. Run e.g. `kvquant bench generate --model random:7b --out {res.root}`._", ""]
        return out
    for (model, device), recs in group_generate(res.generate).items():
        slug = _slug(model, device)
        out += [f"### {model} on {device}", ""]
        if any(r.get("random_weights") for r in recs):
            out += [f"> **{RANDOM_WEIGHTS_NOTE}** (model `{model}` is built from its config).", ""]
        r0 = recs[0]
        out += [f"Model dtype {r0.get('dtype')}, prompts: {r0.get('prompt_source')}; torch {r0.get('torch_version')}. "
                "Rates count every sequence of the batch: decode tok/s = B·(gen−1) / decode time, e2e tok/s = "
                "B·gen / (prefill + decode time). `fp16` is transformers' `DynamicCache` in the model dtype.", ""]
        counts: dict[str, int] = {}
        for r in recs:
            counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
        out += ["Configurations: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", ""]
        out += ["#### Side by side", "",
                "One row per batch and prompt length, one column per datatype.", "",
                "Decode ms per step:", "", tables.side_by_side_table(recs, "decode_ms_per_step", ".1f"), "",
                "Prefill seconds:", "", tables.side_by_side_table(recs, "prefill_s", ".2f"), "",
                "KV cache MiB held:", "", tables.side_by_side_table(recs, "kv_bytes", ".0f", 2**-20), "",
                "Peak GPU memory GiB (weights included):", "",
                tables.side_by_side_table(recs, "peak_memory_bytes", ".1f", 2**-30), ""]
        if any(r.get("j_per_token") is not None for r in recs):
            out += ["J per generated token:", "", tables.side_by_side_table(recs, "j_per_token", ".3g"), ""]
        errors = [r for r in recs if r.get("status") not in ("ok",) and r.get("error")]
        out += ["#### Throughput", "", tables.generation_table(recs), "",
                figs.add(plots.plot_throughput, f"throughput_{slug}.png", recs, f"{model}: tokens/s vs context"), "",
                "#### Memory", "", tables.memory_table(recs), "",
                figs.add(plots.plot_memory, f"memory_{slug}.png", recs, f"{model}: KV cache and peak memory"), ""]
        out += ["#### Energy", ""]
        if any(r.get("j_per_token") is not None for r in recs):
            out += [tables.energy_table(recs), "",
                    figs.add(plots.plot_energy, f"energy_{slug}.png", recs, f"{model}: J per generated token"), ""]
        else:
            notes = sorted({str(r.get("energy_note")) for r in recs if r.get("energy_note")})
            out += ["_Energy unavailable for these runs: " + ("; ".join(notes) or "no measurement recorded")
                    + "._", ""]
        if errors:
            out += ["#### Not measured", "", format_table([[r["datatype"], r["batch"], r["prompt_len"], r["status"],
                                                            str(r["error"])[:160]] for r in errors],
                                                          ["datatype", "batch", "prompt", "status", "why"]), ""]
    if res.superseded:
        out += [f"_{res.superseded} older record(s) of the same configurations were superseded by newer runs._", ""]
    return out


def _capacity_sections(res: Results, figs: _Figures) -> list[str]:
    out = ["## Capacity (`kvquant bench capacity`)", ""]
    if not res.capacity:
        out += [f"_Missing: no `capacity.json` in `{res.root}`. Run e.g. `kvquant bench capacity --model random:7b "
                f"--out {res.root}`._", ""]
        return out
    for doc in res.capacity:
        model = doc.get("model")
        out += [f"### {model} ({doc.get('gpu_name') or doc.get('device')}, `{doc.get('_file')}`)", ""]
        if doc.get("random_weights"):
            out += [f"> **{RANDOM_WEIGHTS_NOTE}** — capacity depends only on the shapes.", ""]
        sh = doc.get("shape", {})
        gib = 2**30
        out += [f"{sh.get('num_layers')} layers, {sh.get('num_heads')} heads / {sh.get('num_kv_heads')} KV heads, "
                f"head dim {sh.get('head_dim')}; weights {doc.get('weights_bytes', 0) / gib:.2f} GiB; budget "
                f"{doc.get('budget_bytes', 0) / gib:.2f} GiB ({doc.get('budget_source')}), weights included.", ""]
        elsewhere, total = doc.get("held_by_other_processes_bytes"), doc.get("device_total_bytes")
        if elsewhere and total and elsewhere > 0.05 * total:
            out += [f"> **Other processes held {elsewhere / gib:.1f} GiB of the GPU during this run**: the empirical "
                    "column undercounts what fits; trust the analytic one.", ""]
        try:
            out += [tables.capacity_table(doc), ""]
        except (KeyError, TypeError) as exc:
            out += [f"_Capacity table unreadable ({type(exc).__name__}: {exc})._", ""]
        out += ["Cells: largest batch from the analytic model / found on the GPU (`?`: search not bracketed)."
                + ("" if doc.get("empirical") else f" {doc.get('empirical_note') or 'No empirical check.'}"), "",
                figs.add(plots.plot_capacity, f"capacity_{_slug(model, doc.get('_file'))}.png", doc,
                         f"{model}: largest batch vs context"), ""]
    return out


_PROTOCOL_KEYS = (("data", "data"), ("dtype", "dtype"), ("prefill", "prefill"), ("chunk", "chunk"),
                  ("calibration", "calibration"))


def _protocol_line(meta: dict[str, Any]) -> str | None:
    """The protocol of a perplexity run beyond model, ctx and windows (what tells two sections apart)."""
    parts = [f"{label} `{meta[k]}`" if isinstance(meta[k], str) else f"{label} {meta[k]}"
             for k, label in _PROTOCOL_KEYS if meta.get(k) is not None]
    cfg = meta.get("config")
    if isinstance(cfg, dict):
        parts.append("config " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "datatype"))
    return "Protocol: " + "; ".join(parts) + "." if parts else None


def _accuracy_sections(res: Results, figs: _Figures) -> list[str]:
    out = ["## Accuracy vs cost (`kvquant eval ppl`)", ""]
    if not res.ppl:
        out += [f"_Missing: no `kvquant eval ppl` JSON in `{res.root}`, so no ΔPPL and no Pareto front. Run e.g. "
                f"`kvquant eval ppl --model smollm2-135m --datatypes fp16,nuq4,nuq3,nuq2 --out "
                f"{res.root}/ppl.json`._", ""]
        return out
    groups = group_generate(res.generate)
    for doc in group_ppl(res.ppl):
        meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
        model = meta.get("model")
        files = doc.get("_files") or [doc.get("_file")]
        ref = doc.get("_reference")
        merged = len(files) > 1
        where = ("merged from " + " + ".join(f"`{f}`" for f in files)) if merged else f"`{files[0]}`"
        out += [f"### {model} ({where}; ctx {meta.get('ctx')}, {meta.get('windows')} windows)", ""]
        proto = _protocol_line(meta)
        if proto:
            out += [proto, ""]
        if merged:
            how_ref = (f"ΔPPL and ΔPPL % recomputed against the fp16 row of `{ref}`" if ref else
                       "no fp16 row in any of them: ΔPPL as stored in each file")
            out += [f"{len(files)} `kvquant eval ppl` files with this protocol, merged; {how_ref}.", ""]
        out += [tables.ppl_table(doc), ""]
        if doc.get("_notes"):
            out += ["**Note:** " + "; ".join(doc["_notes"]) + ".", ""]
        energy: dict[str, float] = {}
        how = ""
        same = [recs for (m, _), recs in groups.items() if m == model]
        with_e = [recs for recs in groups.values() if any(r.get("j_per_token") is not None for r in recs)]
        dts = list(dict.fromkeys(str(r.get("datatype")) for r in doc.get("results", [])))
        src = next((recs for recs in same if recs in with_e), None) or (with_e[0] if with_e else None)
        if src is not None:
            energy, how = energy_per_datatype(src, [d for d in dts if d != "plain"])
            how = f"J/token from `bench generate` on {src[0].get('model')}: {how}"
            if src[0].get("model") != model:
                how += f" (**a different model from the perplexity's {model}**)"
        points, notes = tradeoff_points(doc, energy or None)
        ref_txt = f"ΔPPL vs the fp16 of `{ref}`" if merged and ref else "ΔPPL vs fp16 from this file"
        out += [f"Pareto front, every objective minimised ({ref_txt}, fp16 at ΔPPL 0). "
                + (how + "." if how else "No J/token available: front over bits/element only."), "",
                tables.tradeoff_table(points), ""]
        if notes:
            out += ["Not placed: " + "; ".join(notes) + ".", ""]
        best_bits = [p.datatype for p in points if p.pareto_bits]
        out += [f"**Pareto-optimal (bits/element vs ΔPPL):** {', '.join(best_bits) or 'none'}."]
        if any(p.pareto_energy is not None for p in points):
            out += [f"**Pareto-optimal (J/token vs ΔPPL):** "
                    f"{', '.join(p.datatype for p in points if p.pareto_energy) or 'none'}."]
        slug = _slug(model, files[0], "merged") if merged else _slug(model, files[0])
        out += ["", figs.add(plots.plot_pareto, f"pareto_{slug}.png", points, f"{model}: accuracy vs cost"), ""]
    return out


def _across_sections(res: Results, figs: _Figures) -> list[str]:
    """One Pareto front over every configuration (calibration, quantization settings) of the same model, data
    and windows: the grid of a sweep (only when there are several configurations)."""
    groups = across_groups(group_ppl(res.ppl))
    if not groups:
        return []
    out = ["## Accuracy vs cost across configurations", "",
           "Every (datatype, configuration) of the perplexity files above that share model, data, context and "
           "windows, as one point (ΔPPL against the fp16 of its own file; configurations named by their folder).",
           ""]
    for g in groups:
        meta = g["meta"]
        out += [f"### {meta.get('model')} (data `{meta.get('data')}`, ctx {meta.get('ctx')}, {meta.get('windows')} "
                f"windows; {len(g['_files'])} configurations)", "",
                "Configurations: " + "; ".join(f"{n} = `{f}`" for n, f in zip(g["_names"], g["_files"])) + ".", ""]
        points, notes = tradeoff_points(g)
        out += [tables.tradeoff_table(points), ""]
        if g.get("_notes"):
            out += ["Note: " + "; ".join(g["_notes"]) + ".", ""]
        if notes:
            out += ["Not placed: " + "; ".join(notes) + ".", ""]
        best = [p.datatype for p in points if p.pareto_bits]
        out += [f"**Pareto-optimal across configurations (bits/element vs ΔPPL):** {', '.join(best) or 'none'}.", "",
                figs.add(plots.plot_pareto, f"pareto_across_{_slug(meta.get('model'), meta.get('ctx'))}.png", points,
                         f"{meta.get('model')}: accuracy vs cost across configurations"), ""]
    return out



def _sweep_sections(res: Results) -> list[str]:
    """The jobs of a ``kvquant sweep`` whose results folder this is (failed and blocked ones included)."""
    from kvquant.sweep.jobs import SweepDir
    from kvquant.sweep.state import status_rows

    sweep = SweepDir(res.root)
    if not sweep.jobs_file.is_file():
        return []
    try:
        grid, jobs = sweep.read_jobs()
    except (OSError, ValueError, TypeError) as exc:
        return ["## Sweep", "", f"_Sweep jobs unreadable ({type(exc).__name__}: {exc})._", ""]
    rows = status_rows(sweep, jobs, reconcile=False)
    me = [r for r in rows if r["status"] == "running" and r["pid"] == os.getpid() and r["host"] == socket.gethostname()]
    rows = [r for r in rows if r not in me]  # the job writing this report is not unfinished work
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out = ["## Sweep", "", f"Grid `{grid}`: {len(rows)} jobs, " + ", ".join(f"{v} {k}" for k, v in counts.items())
           + (f" (and `{me[0]['id']}`, the job writing this report)" if me else "")
           + f". `kvquant sweep status {res.root}` shows the same.", ""]
    unfinished = [r for r in rows if r["status"] != "completed"]
    if unfinished:
        out += ["Jobs without results (their configurations are missing from the tables below):", "",
                tables.sweep_table(unfinished), ""]
    return out


def _longctx_sections(res: Results, figs: _Figures) -> list[str]:
    """Long-context retrieval (only when the folder has ``kvquant eval longctx`` results: an optional input)."""
    if not res.longctx:
        return []
    return longctx_sections(res.longctx, lambda fn, name, *args: figs.add(fn, name, *args), _slug)


def _kernel_sections(res: Results) -> list[str]:
    out = ["## Kernels (`kvquant bench kernels`)", ""]
    if not res.kernels:
        return out + ["_Missing: no `kvquant bench kernels --out FILE.json` output in this folder._", ""]
    dev = next((r for r in res.kernels if r.get("kind") == "device"), None)
    if dev:
        out += [f"{dev.get('name')}, copy bandwidth {dev.get('copy_bw_GBps', 0):.0f} GB/s, torch {dev.get('torch')}.",
                ""]
    kinds = {r.get("kind") for r in res.kernels}
    if "decode" in kinds:
        hf = any(k.startswith("hf_") for r in res.kernels if r.get("kind") == "decode" for k in r)
        out += ["### Decode attention", "",
                "One decode step over the packed cache. × fp16 / × dequant: speed-up of the kernel over SDPA on a "
                "dense fp16 cache / over dequantize-then-attend; floor frac: time to move the quantized bytes at "
                "the copy bandwidth ÷ kernel time (1 = at the bandwidth floor)."
                + (" hf NAME ms: one decode step of transformers' `QuantizedCache` (append, dequantize the layer, "
                   "SDPA), with the kernel's speed-up over it in brackets." if hf else ""), "",
                tables.kernels_table(res.kernels), ""]
        why: dict[str, list[str]] = {}  # full note -> baselines
        for r in res.kernels:
            for k, v in r.items():
                if r.get("kind") == "decode" and k.startswith("hf_") and k.endswith("_note") and v \
                        and tables.short_note(v) != str(v) and k[3:-5] not in why.setdefault(str(v), []):
                    why[str(v)].append(k[3:-5])
        if why:
            out += ["hf baselines not measured: " + "; ".join(f"{', '.join(names)}: {v}" for v, names in why.items())
                    + ".", ""]
    if kinds & {"prefill", "decode_append"}:
        out += ["### Prefill quantization and decode append", "",
                "prefill: the fused Triton quantize kernel alone, the fused write, and the whole append on the "
                "triton and torch backends (floor frac: kernel's share of the copy bandwidth). decode append: one "
                "token appended per sequence.", "",
                tables.prefill_kernels_table(res.kernels), ""]
    if not kinds & {"decode", "prefill", "decode_append"}:
        out += ["_No decode or prefill rows (only " + ", ".join(sorted(str(k) for k in kinds)) + ")._", ""]
    return out


def _profile_sections(res: Results) -> list[str]:
    """Decode-step profiles (only when the folder has one: an optional input)."""
    if not res.decode_profiles:
        return []
    models = sorted({str(d.get("model")) for d in res.decode_profiles})
    return ["## Decode-step profile (`kvquant bench profile --kind decode`)", "",
            f"Model {', '.join(models)}. Wall ms/step: steps timed without the profiler; profiled ms/step: the same "
            "steps under `torch.profiler` (the host times of kvquant's parts are shares of this one); device busy: the "
            "device's kernels and copies summed; `fp16` is transformers' `DynamicCache`.", "",
            tables.decode_profile_table(res.decode_profiles), ""]


def _backends_sections(res: Results) -> list[str]:
    """Greedy ``generate`` on the torch vs triton cache backends (only when the folder has it)."""
    if not res.backends:
        return []
    return ["## Cache backends in `model.generate` (`python -m kvquant.bench.backends`)", "",
            "The same quantized cache (nuq3, 1 % outliers) on the torch and triton backends of a random-weight "
            "4-layer Llama (32/8 heads × 128), greedy decoding of left-padded prompts.", "",
            tables.backends_table(res.backends), ""]


def resolve_out(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Where the report goes: ``results_dir/report.md`` by default; ``DIR/report.md`` when ``out`` is an existing
    directory or a string ending in a path separator (``"rep/"``); otherwise ``out`` itself (a file, overwritten
    if it exists). ``pathlib.Path`` drops a trailing separator, so pass a ``str`` to ask for a new directory."""
    if out is None:
        return Path(results_dir) / REPORT
    raw = str(out)
    seps = tuple(s for s in (os.sep, os.altsep, "/") if s)
    p = Path(out)
    if raw.endswith(seps) or p.is_dir():
        return p / REPORT
    return p


def build_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``results_dir`` and return its path: ``results_dir/report.md`` by default, else where
    :func:`resolve_out` says (``DIR/report.md`` for an existing directory or a string ending in ``/``); figures
    go to ``figures/`` next to it.

    Raises:
        FileNotFoundError: ``results_dir`` is not a directory.
    """
    res = load_results(results_dir)
    out_path = resolve_out(results_dir, out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out_path.parent)
    lines = ["# kvquant benchmark report", "",
             f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} from `{res.root}`.", ""]
    found = [[k, len(v), ", ".join(f"`{x}`" for x in v[:6]) + (" …" if len(v) > 6 else "")]
             for k, v in sorted(res.files.items())]
    lines += [format_table(found, ["input", "files", "names"]) if found else "_No recognised result files._", ""]
    if res.skipped:
        lines += ["Unreadable files (ignored): " + "; ".join(res.skipped), ""]
    for section in (_sweep_sections(res), _generation_sections(res, figs), _capacity_sections(res, figs),
                    _accuracy_sections(res, figs), _across_sections(res, figs), _longctx_sections(res, figs),
                    _kernel_sections(res), _profile_sections(res), _backends_sections(res)):
        lines += section
    out_path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out_path
