"""The bodies of ``kvquant demo``, ``calibrate``, ``eval ppl``, ``bench`` and ``report``.

Each command checks its inputs (:mod:`kvquant.cli.inputs`) before it fetches, converts or loads a model.
"""

from __future__ import annotations

import argparse
import sys
import time

from kvquant.cli.errors import CLIError, ExitCode
from kvquant.cli.inputs import (
    check_calibration_fits,
    check_calibration_widths,
    check_datatypes,
    check_positive,
    check_writable,
    read_calibration,
    read_text,
)
from kvquant.flags import quant_config_from_args, resolve_device

#: Benchmarks of ``kvquant bench``; each is the module ``kvquant.bench.<name>`` with ``build_parser`` and ``main``.
BENCHMARKS = ("roundtrip", "kernels", "generate", "capacity", "profile")


def _check_dtype(dtype: str | None) -> None:
    from kvquant.models.loading import parse_dtype

    try:
        parse_dtype(dtype)
    except ValueError as exc:
        raise CLIError(f"--dtype: {exc}") from None


def _load(model: str | None, dtype: str | None, device: str, device_map: str | None = None):
    from kvquant.models import load_model

    device = resolve_device(device)
    print(f"loading model {model or '(default)'} ...", file=sys.stderr)
    m, tok, spec = load_model(model, dtype=dtype, device=device, device_map=device_map)
    print(f"model: {spec.name} from {spec.source}", file=sys.stderr)
    return m, tok, spec


def _ids(text: str, tok, spec):
    import torch

    from kvquant.data import tokenize_corpus

    return torch.as_tensor(tokenize_corpus(text, tok, spec.bos_id))


def cmd_calibrate(a: argparse.Namespace) -> None:
    from kvquant.calibration.calibrate import calibrate
    from kvquant.calibration.format import calibration_path, save_calibration
    from kvquant.data import sample_calibration_sequences

    cfg = quant_config_from_args(a)
    check_positive(n_seqs=a.n_seqs, seq_len=a.seq_len, batch_size=a.batch_size)
    if a.bit_budget is not None and a.bit_budget < 2.0:
        raise CLIError(f"--bit-budget must be at least 2 (the narrowest width), got {a.bit_budget}")
    _check_dtype(a.dtype)
    check_writable(calibration_path(a.out))
    text = read_text(a.data, (a.split,))[a.split]
    model, tok, spec = _load(a.model, a.dtype, a.device)
    seqs = sample_calibration_sequences(_ids(text, tok, spec), a.n_seqs, a.seq_len, a.seed)
    t0 = time.perf_counter()
    cal = calibrate(model, seqs, cfg, sensitivity=a.sensitivity, batch_size=a.batch_size, model_id=spec.name,
                    dataset=f"{a.data}:{a.split}", progress=a.progress, bit_budget=a.bit_budget)
    tensors, sidecar = save_calibration(cal, a.out)
    print(f"calibration written to {tensors} and {sidecar} ({time.perf_counter() - t0:.1f} s, {seqs.numel()} tokens)")
    if cal.allocation is not None:
        widths = " ".join(f"k{k}v{v}" for k, v in cal.allocation)
        print(f"bit allocation (budget {a.bit_budget}, mean {cal.allocation_mean_bits:.3f} bits): {widths}")


def cmd_eval_ppl(a: argparse.Namespace) -> None:
    import torch

    from kvquant.calibration.format import calibration_digest, find_calibration
    from kvquant.data import make_windows
    from kvquant.eval.baselines import baseline_available, parse_baseline
    from kvquant.eval.perplexity import evaluate_perplexity, format_table

    cfg = quant_config_from_args(a)
    names = list(dict.fromkeys(x.strip() for x in a.datatypes.split(",") if x.strip()))
    check_datatypes(names, extra=("plain",))
    check_positive(ctx=a.ctx, chunk=a.chunk, batch_size=a.batch_size, max_windows=a.max_windows)
    if a.prefill is not None and not 0 < a.prefill < a.ctx - 1:
        raise CLIError(f"--prefill must be in 1..{a.ctx - 2} (below --ctx {a.ctx} minus 1), got {a.prefill}")
    _check_dtype(a.dtype)
    check_writable(a.out)
    if a.calibration is not None:
        a.calibration = str(find_calibration(a.calibration))
    cal = read_calibration(a.calibration, cfg)
    check_calibration_widths(names, cal)
    text = read_text(a.data, ("test",))["test"]
    datatypes, skipped = [], {}
    for name in names:
        ok, why = baseline_available(name) if parse_baseline(name) else (True, "")
        if ok:
            datatypes.append(name)
        else:
            skipped[name] = why
            print(f"skipping {name}: {why}", file=sys.stderr)
    model, tok, spec = _load(a.model, a.dtype, a.device, getattr(a, "device_map", None))
    check_calibration_fits(cal, model, spec.name, cfg)
    windows = torch.stack(make_windows(_ids(text, tok, spec), a.ctx, max_windows=a.max_windows))
    meta = {"model": spec.name, "data": a.data, "calibration": a.calibration,
            "calibration_sha256": calibration_digest(a.calibration) if a.calibration else None, "skipped": skipped}
    res = evaluate_perplexity(model, windows, datatypes, cal, cfg, a.prefill, a.chunk, a.batch_size, a.out, meta=meta,
                              progress=a.progress, resume=a.resume)
    print(format_table(res))
    print(f"results written to {a.out}")


def cmd_demo(a: argparse.Namespace) -> None:
    from dataclasses import replace

    import torch

    from kvquant.cache.hf_cache import KVQuantCache
    from kvquant.cache.hf_compat import cache_kwargs
    from kvquant.calibration.calibrate import calibrate
    from kvquant.data import make_windows, sample_calibration_sequences
    from kvquant.eval.perplexity import evaluate_perplexity, format_table

    base = quant_config_from_args(a)
    check_positive(ctx=a.ctx, windows=a.windows, chunk=a.chunk, new_tokens=a.new_tokens)
    texts = read_text(a.data, ("validation", "test"))  # before the model: fetching and converting it takes a minute
    model, tok, spec = _load(a.model, None, a.device)
    print("1/3 calibrating on validation text ...")
    ids = _ids(texts["validation"], tok, spec)
    cal = calibrate(model, sample_calibration_sequences(ids, 8, a.ctx, 0), base, model_id=spec.name,
                    progress=a.progress)
    print("2/3 generating with a nuq3 cache (batch of 2 left-padded prompts) ...")
    prompts = ["The capital of France is", "Once upon a time, a little robot"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(a.device)
    cache = KVQuantCache(model, replace(base, datatype="nuq3"), calibration=cal)
    with torch.no_grad():
        out = model.generate(**enc, **cache_kwargs(model, cache), max_new_tokens=a.new_tokens, do_sample=False)
    for p, o in zip(prompts, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
        print(f"  {p!r} -> {o!r}")
    rep = cache.memory_report()
    print(f"  KV cache: {rep['total_bytes'] / 1024:.1f} KiB held vs {rep['fp16_bytes'] / 1024:.1f} KiB in fp16 "
          f"({rep['bits_per_element']:.2f} bits/element; tiny prompts pay for pages, scales and sinks)")
    print(f"3/3 perplexity through the cache ({a.windows} windows of {a.ctx} tokens, test split) ...")
    windows = torch.stack(make_windows(_ids(texts["test"], tok, spec), a.ctx, max_windows=a.windows))
    res = evaluate_perplexity(model, windows, ["fp16", "nuq4", "nuq3"], cal, base, chunk=a.chunk, progress=a.progress)
    print(format_table(res))


def cmd_bench(a: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    code = importlib.import_module(f"kvquant.bench.{a.what}").main(rest)
    return code if isinstance(code, int) and not isinstance(code, bool) else 0  # roundtrip returns its rows


def cmd_report(a: argparse.Namespace) -> None:
    from kvquant.report import build_report

    if not a.results_dir.is_dir():
        raise CLIError(f"results folder {a.results_dir} does not exist", ExitCode.MISSING)
    path = build_report(a.results_dir, a.out)
    print(f"report written to {path}")
