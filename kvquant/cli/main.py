"""``kvquant``: demo, calibrate, eval (ppl, longctx), bench, report.

Models resolve from ``--model``, then ``$KVQUANT_MODEL``, then ``../shared``/the local cache, then the
hub; data from ``--data``, then ``$KVQUANT_DATA``, then ``../shared``, then the hub.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvquant.cli import longctx
from kvquant.flags import add_device_arg, add_quant_config_args, quant_config_from_args, resolve_device
from kvquant.quant.calibration_file import SENSITIVITIES

DEFAULT_DATATYPES = "fp16,nuq4,nuq3,nuq2,int4,int3,int2"


def _load(model: str | None, dtype: str | None, device: str):
    from kvquant.models import load_model

    device = resolve_device(device)
    print(f"loading model {model or '(default)'} ...", file=sys.stderr)
    m, tok, spec = load_model(model, dtype=dtype, device=device)
    print(f"model: {spec.name} from {spec.source}", file=sys.stderr)
    return m, tok, spec


def _corpus(tok, spec, data: str, split: str):
    import torch

    from kvquant.data import load_text, tokenize_corpus

    ids = tokenize_corpus(load_text(data, split), tok, spec.bos_id)
    return torch.as_tensor(ids)


def cmd_calibrate(a: argparse.Namespace) -> None:
    from kvquant.calibration.calibrate import calibrate
    from kvquant.data import sample_calibration_sequences

    cfg = quant_config_from_args(a)
    model, tok, spec = _load(a.model, a.dtype, a.device)
    ids = _corpus(tok, spec, a.data, a.split)
    seqs = sample_calibration_sequences(ids, a.n_seqs, a.seq_len, a.seed)
    t0 = time.perf_counter()
    cal = calibrate(model, seqs, cfg, sensitivity=a.sensitivity, batch_size=a.batch_size, model_id=spec.name,
                    dataset=f"{a.data}:{a.split}", progress=a.progress)
    path = cal.save(a.out)
    print(f"calibration written to {path} ({time.perf_counter() - t0:.1f} s, {seqs.numel()} tokens)")


def cmd_eval_ppl(a: argparse.Namespace) -> None:
    from kvquant.calibration import Calibration
    from kvquant.calibration.format import calibration_digest
    from kvquant.data import make_windows
    from kvquant.eval.baselines import baseline_available, parse_baseline
    from kvquant.eval.perplexity import evaluate_perplexity, format_table

    cfg = quant_config_from_args(a)
    model, tok, spec = _load(a.model, a.dtype, a.device)
    cal = Calibration.load(a.calibration) if a.calibration else None
    if cal is not None:
        cal.check_compatible(cal.num_layers, cal.num_kv_heads, cal.head_dim, cfg.outlier_fraction, cfg.pre_rope,
                             spec.name)
    import torch

    datatypes, skipped = [], {}
    for name in a.datatypes.split(","):
        ok, why = baseline_available(name) if parse_baseline(name) else (True, "")
        if ok:
            datatypes.append(name)
        else:
            skipped[name] = why
            print(f"skipping {name}: {why}", file=sys.stderr)
    windows = torch.stack(make_windows(_corpus(tok, spec, a.data, "test"), a.ctx, max_windows=a.max_windows))
    meta = {"model": spec.name, "data": a.data, "calibration": a.calibration,
            "calibration_sha256": calibration_digest(a.calibration) if a.calibration else None, "skipped": skipped}
    res = evaluate_perplexity(model, windows, datatypes, cal, cfg, a.prefill, a.chunk, a.batch_size, a.out, meta=meta,
                              progress=a.progress)
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
    model, tok, spec = _load(a.model, None, a.device)
    print("1/3 calibrating on validation text ...")
    ids = _corpus(tok, spec, a.data, "validation")
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
    test = _corpus(tok, spec, a.data, "test")
    windows = torch.stack(make_windows(test, a.ctx, max_windows=a.windows))
    res = evaluate_perplexity(model, windows, ["fp16", "nuq4", "nuq3"], cal, base, chunk=a.chunk, progress=a.progress)
    print(format_table(res))


BENCHMARKS = ("roundtrip", "kernels", "generate", "capacity", "profile")  # each is the module kvquant.bench.<name>


def cmd_bench(a: argparse.Namespace, rest: list[str]) -> None:
    import importlib

    code = importlib.import_module(f"kvquant.bench.{a.what}").main(rest)
    if isinstance(code, int) and not isinstance(code, bool) and code:  # roundtrip returns its rows
        raise SystemExit(code)


def cmd_report(a: argparse.Namespace) -> None:
    from kvquant.report import build_report

    path = build_report(a.results_dir, a.out)
    print(f"report written to {path}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="path, .gguf, alias (smollm2-135m, stories260k) or hub id")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: model's / float32 on CPU)")
    add_device_arg(p, "cpu")


def _progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` (sets ``progress=False``) for every command that shows progress bars; ``kvquant bench``
    generate/capacity have the same flag."""
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (for logs and scripted runs)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvquant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="calibrate, generate with a quantized cache, print perplexity")
    d.add_argument("--model", default=None)
    d.add_argument("--data", default="wikitext2-raw")
    add_device_arg(d, "cpu")
    d.add_argument("--ctx", type=int, default=512)
    d.add_argument("--windows", type=int, default=2)
    d.add_argument("--chunk", type=int, default=64)
    d.add_argument("--new-tokens", type=int, default=20)
    add_quant_config_args(d)
    _progress_arg(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("calibrate", help="fit per-channel key ranges and NUQ codebooks")
    _model_args(c)
    add_quant_config_args(c)
    c.add_argument("--data", default="wikitext2", help="dataset name or text file (default: wikitext2)")
    c.add_argument("--split", default="validation")
    c.add_argument("--n-seqs", type=int, default=16)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--batch-size", type=int, default=4,
                   help="sequences per forward; halved automatically when a forward runs out of GPU memory")
    c.add_argument("--sensitivity", choices=list(SENSITIVITIES), default="none",
                   help="k-means weights: none, fisher (squared loss gradients, KVQuant), magnitude (keys by |k|), "
                        "query (keys by the logit error they cause: query energy x channel scale^2)")
    c.add_argument("--seed", type=int, default=0)
    _progress_arg(c)
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", help="accuracy evaluations")
    esub = e.add_subparsers(dest="what", required=True)
    ppl = esub.add_parser("ppl", help="Wikitext-2 perplexity through the quantized cache")
    _model_args(ppl)
    add_quant_config_args(ppl)
    ppl.add_argument("--calibration", default=None)
    ppl.add_argument("--data", default="wikitext2-raw")
    ppl.add_argument("--datatypes", default=DEFAULT_DATATYPES,
                     help="comma list: fp16, nuq2-4, int2-4, plain, quanto2/4, quanto2k/4k, hqq2/4")
    ppl.add_argument("--ctx", type=int, default=2048)
    ppl.add_argument("--prefill", type=int, default=None, help="default ctx // 2")
    ppl.add_argument("--chunk", type=int, default=32)
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--max-windows", type=int, default=None)
    ppl.add_argument("--out", type=Path, default=Path("results/ppl.json"))
    _progress_arg(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)
    longctx.add_parser(esub, _model_args, _progress_arg)

    b = sub.add_parser("bench", help="benchmarks (extra arguments go to the benchmark; try --help)", add_help=False)
    b.add_argument("what", nargs="?", choices=BENCHMARKS,
                   help="benchmark to run; `kvquant bench WHAT --help` lists its options")
    b.set_defaults(func=None)

    lm = sub.add_parser("lm-eval", add_help=False,
                        help="lm-evaluation-harness with the `kvquant` model type (a cache per batch; arguments go "
                             "to lm-eval: --model kvquant --model_args pretrained=...,cache=nuq3 --tasks ...)")
    lm.set_defaults(func=None)

    r = sub.add_parser("report", help="report.md with tables and plots from a results folder")
    r.add_argument("results_dir", type=Path, help="folder with bench generate / capacity / eval ppl / kernels output")
    r.add_argument("--out", default=None,
                   help="report file, or a folder (existing, or ending in /) for FOLDER/report.md "
                        "(default: RESULTS_DIR/report.md)")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("bench", "lm-eval"):
        try:  # an invalid QuantConfig value is a usage error, before any model is loaded
            quant_config_from_args(args)
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "lm-eval":
        from kvquant.eval.lm_harness import main as lm_eval_main

        lm_eval_main(rest)
        return
    if args.command == "bench":
        if args.what is None:
            print(f"usage: kvquant bench {{{','.join(BENCHMARKS)}}} [options]\n"
                  "`kvquant bench WHAT --help` lists the options of one benchmark.")
            raise SystemExit(0 if {"-h", "--help"} & set(rest) else 2)
        cmd_bench(args, rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.func(args)


if __name__ == "__main__":
    main()
