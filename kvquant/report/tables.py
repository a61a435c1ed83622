"""Markdown tables of the report."""

from __future__ import annotations

from typing import Any

from kvquant.bench.common import fmt_num, format_table
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
    return format_table(rows, ["datatype", "bits/elem", "bits from", "ΔPPL", "J/token", "Pareto (bits)",
                               "Pareto (J/token)", "Pareto (bits, J, ΔPPL)", "dominated by (bits)"])


def ppl_table(doc: dict[str, Any]) -> str:
    """Perplexity rows; a ``file`` column when ``doc`` merges several files (``_files``, see
    :func:`~kvquant.report.load.group_ppl`)."""
    merged = len(doc.get("_files") or []) > 1
    rows = [[r.get("datatype"), fmt_num(r.get("ppl"), ".4f"), fmt_num(r.get("delta_ppl"), "+.4f"),
             fmt_num(r.get("delta_ppl_pct"), "+.2f"), fmt_num(r.get("bits_per_element"), ".2f"), r.get("tokens")]
            + ([", ".join(f"`{f}`" for f in r.get("_from") or [r.get("_file")])] if merged else [])
            for r in doc.get("results", [])]
    return format_table(rows, ["datatype", "PPL", "ΔPPL", "ΔPPL %", "bits/elem", "tokens"]
                        + (["file"] if merged else []))
