"""Markdown tables of the report."""

from __future__ import annotations

from typing import Any

from kvquant.report.load import row_label
from kvquant.report.markdown import fmt_num, format_table
from kvquant.report.pareto import TradeoffPoint


def _mib(v: Any) -> str | None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    return fmt_num(v / 2**20, ".1f" if v >= 2**20 else ".3g")


def _gib(v: Any) -> str | None:
    return fmt_num(v / 2**30, ".2f") if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fp16_ref(records: list[dict[str, Any]]) -> dict[tuple[Any, Any], dict[str, Any]]:
    return {(r["batch"], r["prompt_len"]): r for r in records
            if r.get("datatype") == "fp16" and r.get("status") == "ok"}


def _ratio(a: Any, b: Any) -> str | None:
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return fmt_num(a / b, ".2f") if ok and b else None


def generation_table(records: list[dict[str, Any]]) -> str:
    """Throughput per configuration, with the decode speed relative to fp16 at the same batch and length."""
    ref = _fp16_ref(records)
    rows = []
    for r in records:
        f = ref.get((r["batch"], r["prompt_len"]), {})
        rows.append([r["datatype"], r["batch"], r["prompt_len"], r.get("gen_tokens"), r.get("status"),
                     fmt_num(r.get("prefill_s"), ".3f"), fmt_num(r.get("decode_ms_per_step"), ".1f"),
                     fmt_num(r.get("decode_tokens_per_s"), ".1f"), fmt_num(r.get("e2e_tokens_per_s"), ".1f"),
                     _ratio(r.get("decode_tokens_per_s"), f.get("decode_tokens_per_s"))])
    return format_table(rows, ["datatype", "batch", "prompt", "gen", "status", "prefill s", "decode ms/step",
                               "decode tok/s", "e2e tok/s", "decode × fp16"])


def memory_table(records: list[dict[str, Any]]) -> str:
    """KV bytes (held and allocated), compression vs the fp16 cache of the same configuration, peak memory."""
    ref = _fp16_ref(records)
    rows = []
    for r in records:
        f = ref.get((r["batch"], r["prompt_len"]), {})
        peak = _gib(r.get("peak_memory_bytes"))
        if peak is None and r.get("status") == "ok":
            peak = "n/a (CPU)" if r.get("peak_memory_note") else None
        rows.append([r["datatype"], r["batch"], r["prompt_len"], r.get("status"), _mib(r.get("kv_bytes")),
                     _mib(r.get("kv_bytes_allocated")), fmt_num(r.get("bits_per_element"), ".2f"),
                     _ratio(f.get("kv_bytes"), r.get("kv_bytes")), peak, _gib(r.get("weights_bytes"))])
    return format_table(rows, ["datatype", "batch", "prompt", "status", "KV MiB held", "KV MiB allocated",
                               "bits/elem", "× smaller than fp16 cache", "peak GiB", "weights GiB"])


def energy_table(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        if r.get("status") != "ok" or r.get("j_per_token") is None:
            continue
        rows.append([r["datatype"], r["batch"], r["prompt_len"], fmt_num(r.get("energy_j"), ".1f"),
                     fmt_num(r.get("j_per_token"), ".3g"), fmt_num(r.get("prefill_j_per_token"), ".3g"),
                     fmt_num(r.get("decode_j_per_token"), ".3g"), fmt_num(r.get("mean_power_w"), ".0f"),
                     fmt_num(r.get("co2_g_per_1k_tokens"), ".3g"), r.get("energy_method")])
    return format_table(rows, ["datatype", "batch", "prompt", "energy J", "J/token", "prefill J/prompt token",
                               "decode J/token", "mean W", "gCO2/1K tok", "method"])


def _hf_baselines(rows: list[dict[str, Any]]) -> list[str]:
    """Names ``<name>`` of the ``hf_<name>_ms`` keys of the decode rows, in order of first appearance."""
    names: list[str] = []
    for r in rows:
        if r.get("kind") != "decode":
            continue
        for k in r:
            if k.startswith("hf_") and k.endswith("_ms") and len(k) > 6 and k[3:-3] not in names:
                names.append(k[3:-3])
    return names


def short_note(note: Any, width: int = 40) -> str:
    """The part of a note before its first parenthesis, at most ``width`` characters."""
    s = str(note).split(" (", 1)[0].strip()
    return s if len(s) <= width else s[:width - 1] + "…"


def _hf_cell(r: dict[str, Any], name: str) -> str | None:
    ms = fmt_num(r.get(f"hf_{name}_ms"), ".3f")
    if ms is None:
        note = r.get(f"hf_{name}_note")
        return short_note(note) if note else None
    sp = fmt_num(r.get(f"speedup_vs_hf_{name}"), ".0f")
    return f"{ms} (×{sp})" if sp is not None else ms


def kernels_table(rows: list[dict[str, Any]]) -> str:
    """Decode-attention rows of ``kvquant bench kernels``: times, speed-ups, fraction of the bytes floor reached
    (floor time of the quantized bytes at the copy bandwidth ÷ kernel time) and a column per transformers
    ``QuantizedCache`` baseline found in any row (``hf_<name>_ms``, with the kernel's speed-up over it, or the
    short form of ``hf_<name>_note`` when it was not measured)."""
    hf = _hf_baselines(rows)
    out = []
    for r in rows:
        if r.get("kind") != "decode":
            continue
        out.append([r.get("shape"), r.get("context"), r.get("batch"), r.get("datatype"),
                    fmt_num(r.get("fp16_ms"), ".3f"), fmt_num(r.get("dequant_ms"), ".3f"),
                    fmt_num(r.get("kernel_ms"), ".3f"), fmt_num(r.get("speedup_vs_fp16"), ".2f"),
                    fmt_num(r.get("speedup_vs_dequant"), ".1f"), fmt_num(r.get("kernel_frac_floor"), ".3f"),
                    *[_hf_cell(r, n) for n in hf], r.get("skipped")])
    return format_table(out, ["shape", "context", "batch", "datatype", "fp16 ms", "dequant ms", "kernel ms",
                              "× fp16", "× dequant", "floor frac", *[f"hf {n} ms" for n in hf], "note"])


def prefill_kernels_table(rows: list[dict[str, Any]]) -> str:
    """Prefill-quantization (``prefill``) and one-token append (``decode_append``) rows of ``kvquant bench
    kernels``: the fused kernel alone, the fused write, and the whole append on the triton and torch backends.
    Prefill rows time one sequence (``[1, H, S, D]``), hence batch 1 when the row does not say."""
    out = []
    for r in rows:
        if r.get("kind") == "prefill":
            tri, tor = r.get("append_triton_ms"), r.get("append_torch_ms")
            out.append(["prefill", r.get("what"), r.get("shape"), r.get("tokens"), r.get("batch", 1), r.get("H"),
                        r.get("datatype"), fmt_num(r.get("kernel_ms", r.get("ms")), ".3f"),
                        fmt_num(r.get("kernel_GBps"), ".0f"), fmt_num(r.get("kernel_frac_bw"), ".3f"),
                        fmt_num(r.get("write_ms"), ".3f"), fmt_num(tri, ".3f"), fmt_num(tor, ".3f"),
                        _ratio(tor, tri), r.get("identical")])
        elif r.get("kind") == "decode_append":
            tri, tor = r.get("triton_ms"), r.get("torch_ms")
            out.append(["decode append", r.get("what"), r.get("shape"), r.get("prompt"), r.get("batch"), r.get("H"),
                        r.get("datatype"), None, None, None, None, fmt_num(tri, ".3f"), fmt_num(tor, ".3f"),
                        _ratio(tor, tri), r.get("identical")])
    return format_table(out, ["kind", "what", "shape", "tokens / prompt", "batch", "KV heads", "datatype",
                              "kernel ms", "kernel GB/s", "floor frac", "write ms", "append triton ms",
                              "append torch ms", "torch ÷ triton", "identical"])


def tradeoff_table(points: list[TradeoffPoint]) -> str:
    def mark(v: bool | None) -> str | None:
        return None if v is None else ("**yes**" if v else "no")

    rows = [[p.datatype, fmt_num(p.bits_per_element, ".2f"), p.bits_source, fmt_num(p.delta_ppl, "+.4f"),
             fmt_num(p.j_per_token, ".3g"), mark(p.pareto_bits), mark(p.pareto_energy), mark(p.pareto_all),
             ", ".join(p.dominated_by) or None] for p in points]
    return format_table(rows, ["cache", "bits/elem", "bits from", "ΔPPL", "J/token", "Pareto (bits)",
                               "Pareto (J/token)", "Pareto (bits, J, ΔPPL)", "dominated by (bits)"])


def ppl_table(doc: dict[str, Any]) -> str:
    """Perplexity rows; a ``file`` column when ``doc`` merges several files (``_files``, see
    :func:`~kvquant.report.load.group_ppl`)."""
    merged = len(doc.get("_files") or []) > 1
    rows = [[row_label(r), fmt_num(r.get("ppl"), ".4f"), fmt_num(r.get("delta_ppl"), "+.4f"),
             fmt_num(r.get("delta_ppl_pct"), "+.2f"), fmt_num(r.get("bits_per_element"), ".2f"), r.get("tokens")]
            + ([", ".join(f"`{f}`" for f in r.get("_from") or [r.get("_file")])] if merged else [])
            for r in doc.get("results", [])]
    return format_table(rows, ["cache", "PPL", "ΔPPL", "ΔPPL %", "bits/elem", "tokens"]
                        + (["file"] if merged else []))


def capacity_table(doc: dict[str, Any]) -> str:
    """Markdown table: max batch (analytic / empirical) per context and datatype."""
    dts = list(doc["datatypes"])
    by = {(r["datatype"], r["context"]): r for r in doc["rows"]}
    contexts = sorted({r["context"] for r in doc["rows"]})
    rows = []
    for s in contexts:
        row: list[Any] = [s]
        for dt in dts:
            r = by.get((dt, s))
            if r is None:
                row.append(None)
                continue
            emp = r.get("empirical_max_batch")
            cell = f"{r['analytic_max_batch']}"
            if emp is not None:
                cell += f" / {emp}" + ("" if r.get("empirical_exact") else "?")
            row.append(cell)
        rows.append(row)
    rows.append(["max ctx @B=1"] + [doc["datatypes"][dt]["analytic"]["max_context_batch1"] for dt in dts])
    rows.append(["bits/elem"] + [fmt_num(doc["datatypes"][dt]["fit"]["bits_per_element"], ".2f") for dt in dts])
    return format_table(rows, ["context"] + [f"{dt} B max (analytic / empirical)" for dt in dts])


def side_by_side_table(records: list[dict[str, Any]], field: str, spec: str = ".3g", scale: float = 1.0) -> str:
    """One row per (batch, prompt), one column per datatype: ``field`` of each ``ok`` record (times ``scale``);
    ``OOM`` / ``skipped`` where the configuration did not run. The compact form of the per-record tables."""
    dts: list[Any] = []
    cells: dict[tuple[Any, Any], dict[Any, Any]] = {}
    for r in records:
        if r.get("datatype") not in dts:
            dts.append(r.get("datatype"))
        v = r.get(field)
        if r.get("status") == "ok" and isinstance(v, (int, float)) and not isinstance(v, bool):
            cell = fmt_num(v * scale, spec)
        else:
            cell = r.get("status") if r.get("status") != "ok" else None
        cells.setdefault((r.get("batch"), r.get("prompt_len")), {})[r.get("datatype")] = cell
    dts.sort(key=lambda d: _dt_rank(d))
    rows = [[b, s, *[by.get(dt) for dt in dts]] for (b, s), by in sorted(cells.items(), key=lambda kv: kv[0])]
    return format_table(rows, ["batch", "prompt", *dts])


def _dt_rank(name: Any) -> tuple[int, str]:
    from kvquant.report.load import datatype_key

    return datatype_key(name)


PROFILE_REGIONS = ("kvquant.update", "kvquant.kernel_decode", "kvquant.decode_attention", "kvquant.append")


def decode_profile_table(docs: list[dict[str, Any]]) -> str:
    """``kvquant bench profile --kind decode`` results: per (batch, prompt, cache) the wall time of a decode step,
    its time under the profiler, the device-busy time, kernel launches and host-device syncs per step, and the host
    time of kvquant's labelled parts of a profiled step (nested: ``kernel_decode`` holds ``decode_attention`` and
    ``append``)."""
    rows = []
    for doc in docs:
        for r in doc.get("results", []):
            regions = r.get("regions") or {}
            rows.append([r.get("batch"), r.get("prompt_len"), r.get("datatype"),
                         fmt_num(r.get("wall_ms_per_step"), ".1f"), fmt_num(r.get("profiled_ms_per_step"), ".1f"),
                         fmt_num(r.get("device_busy_ms_per_step"), ".1f"), fmt_num(r.get("launches_per_step"), ".0f"),
                         fmt_num(r.get("syncs_per_step"), ".2f"),
                         *[fmt_num((regions.get(g) or {}).get("host_ms_per_step"), ".1f") for g in PROFILE_REGIONS]])
    rows.sort(key=lambda x: (x[0], x[1], _dt_rank(x[2])))
    return format_table(rows, ["batch", "prompt", "cache", "wall ms/step", "profiled ms/step", "device busy ms/step",
                               "launches/step", "syncs/step",
                               *[f"{g.removeprefix('kvquant.')} host ms" for g in PROFILE_REGIONS]])


def backends_table(rows: list[dict[str, Any]]) -> str:
    """``python -m kvquant.bench.backends`` rows: per model dtype, whether greedy ``generate`` gave the same tokens
    on the torch and triton backends, the largest logit gap, decode tokens/s of each backend and, on triton, one
    layer-step's decode-attention call and append (keys + values)."""
    by: dict[Any, dict[str, Any]] = {}
    for r in rows:
        d = by.setdefault(r.get("dtype"), {})
        if r.get("part") == "e2e" and r.get("backend"):
            d[f"{r['backend']}_tok_s"] = r.get("decode_tok_per_s")
            d.setdefault("shape", (r.get("batch"), r.get("prompt"), r.get("new_tokens")))
        elif r.get("part") == "e2e" and "identical_tokens" in r:
            d.update(identical=r.get("identical_tokens"), compared=r.get("tokens_compared"),
                     gap=r.get("max_logit_gap_until_divergence"))
        elif r.get("part") == "e2e_breakdown":
            d.update(kernel=r.get("kernel_ms_per_layer"), append=r.get("append_ms_per_layer"))
    out = []
    for dtype, d in by.items():
        if dtype is None:
            continue
        b, s, n = d.get("shape", (None, None, None))
        same = None if d.get("identical") is None else f"{'yes' if d['identical'] else 'no'}, {d.get('compared')}"
        out.append([dtype, b, s, n, same, fmt_num(d.get("gap"), ".2g"), fmt_num(d.get("torch_tok_s"), ".1f"),
                    fmt_num(d.get("triton_tok_s"), ".1f"), fmt_num(d.get("kernel"), ".2f"),
                    fmt_num(d.get("append"), ".2f")])
    return format_table(out, ["model dtype", "batch", "prompt", "new tokens", "same greedy tokens", "max logit gap",
                              "decode tok/s torch", "decode tok/s triton", "attention ms/layer",
                              "append ms/layer (K+V)"])


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """Jobs of a sweep (:func:`kvquant.sweep.state.status_rows`): id, status, attempts, reason."""
    return format_table([[f"`{r['id']}`", r["status"], r.get("attempts") or None, r.get("reason")] for r in rows],
                        ["job", "status", "attempts", "reason"])
