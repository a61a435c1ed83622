"""``kvquant``: the command line (parser and dispatch; the commands are in :mod:`kvquant.cli.commands`).

Models resolve from ``--model``, then ``$KVQUANT_MODEL``, then ``../shared``/the local cache, then the
hub; data from ``--data``, then ``$KVQUANT_DATA``, then ``../shared``, then the hub. Errors end as one line on stderr
and an exit code (:mod:`kvquant.cli.errors`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvquant.cli import commands, longctx
from kvquant.cli.commands import BENCHMARKS
from kvquant.cli.errors import DEBUG_ENV, CLIError, ExitCode, debug_requested, run_reporting_errors
from kvquant.flags import ArgumentParser, add_device_arg, add_quant_config_args, quant_config_from_args
from kvquant.quant.calibration_file import SENSITIVITIES

DEFAULT_DATATYPES = "fp16,nuq4,nuq3,nuq2,int4,int3,int2"

EPILOG = (f"Exit codes: 0 success; 1 a bug in kvquant (its traceback is printed); 2 usage or bad input (a flag, a "
          f"datatype, a calibration file, NaN); 3 a missing or unreadable file, model or data set; 4 a run-time "
          f"failure (out of memory, CUDA error, full disk); 130 interrupted. Errors are one line on stderr; --debug "
          f"(or {DEBUG_ENV}=1) prints the traceback too.")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="path, .gguf, alias (smollm2-135m, stories260k) or hub id "
                                                 "(default: $KVQUANT_MODEL, else smollm2-135m)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: model's / float32 on CPU)")
    add_device_arg(p, "cpu")


def _progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` (sets ``progress=False``) for every command that shows progress bars; ``kvquant bench``
    generate/capacity have the same flag."""
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (for logs and scripted runs)")


def _debug_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help=f"print the traceback of an error too (same as {DEBUG_ENV}=1)")
    return p


def describe(commands_: list[str]) -> str:
    """The top-level description: what kvquant is and every command."""
    return ("kvquant: KV-cache quantization for LLM inference. Commands: " + ", ".join(commands_)
            + ". Each has --help (bench: kvquant bench WHAT --help).")


def build_parser(parser_class: type[argparse.ArgumentParser] = ArgumentParser) -> argparse.ArgumentParser:
    """The ``kvquant`` parser: one sub-parser per command (``parser_class`` for it and every sub-parser)."""
    debug = _debug_parent()
    p = parser_class(prog="kvquant", epilog=EPILOG, parents=[debug])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", parents=[debug], help="calibrate, generate with a quantized cache, print perplexity",
                       description="Calibrate a small model, generate from two left-padded prompts with a nuq3 cache "
                                   "and print the memory report and the perplexity of fp16 (exact), nuq4 and nuq3.")
    d.add_argument("--model", default=None, help="model to run (see kvquant calibrate --help; default: smollm2-135m)")
    d.add_argument("--data", default="wikitext2-raw",
                   help="text: a dataset name (wikitext2-raw, wikitext2, tinystories) or a text file/folder; read "
                        "before the model is loaded")
    add_device_arg(d, "cpu")
    d.add_argument("--ctx", type=int, default=512, help="tokens per calibration sequence and perplexity window")
    d.add_argument("--windows", type=int, default=2, help="perplexity windows of the test split")
    d.add_argument("--chunk", type=int, default=64, help="tokens fed per step after the prefill (perplexity)")
    d.add_argument("--new-tokens", type=int, default=20, help="tokens generated per prompt")
    add_quant_config_args(d)
    _progress_arg(d)
    d.set_defaults(func=commands.cmd_demo)

    c = sub.add_parser("calibrate", parents=[debug], help="fit per-channel key ranges and NUQ codebooks")
    _model_args(c)
    add_quant_config_args(c)
    c.add_argument("--data", default="wikitext2", help="dataset name or text file")
    c.add_argument("--split", default="validation", help="split of --data: train, validation or test")
    c.add_argument("--n-seqs", type=int, default=16, help="calibration sequences sampled from the text")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    c.add_argument("--batch-size", type=int, default=4,
                   help="sequences per forward; halved automatically when a forward runs out of GPU memory")
    c.add_argument("--sensitivity", choices=list(SENSITIVITIES), default="none",
                   help="k-means weights: none, fisher (squared loss gradients, KVQuant), magnitude (keys by |k|), "
                        "query (keys by the logit error they cause: query energy x channel scale^2)")
    c.add_argument("--seed", type=int, default=0, help="seed of the sequence sampling and k-means")
    c.add_argument("--bit-budget", type=float, default=None,
                   help="also allocate each layer's (key bits, value bits) among 2-4 bits so that the average code "
                        "width is at most this many bits with least measured (Fisher-weighted with --sensitivity "
                        "fisher) quantization error; run the cache with --datatypes nuq-alloc (default: no "
                        "allocation)")
    _progress_arg(c)
    c.add_argument("--out", type=Path, required=True,
                   help="calibration file; .safetensors is added when missing, and a .json sidecar written beside")
    c.set_defaults(func=commands.cmd_calibrate)

    e = sub.add_parser("eval", parents=[debug], help="accuracy evaluations (ppl, longctx)")
    esub = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    ppl = esub.add_parser("ppl", parents=[debug], help="Wikitext-2 perplexity through the quantized cache")
    _model_args(ppl)
    add_quant_config_args(ppl)
    ppl.add_argument("--calibration", default=None,
                     help="calibration file from kvquant calibrate, for this model and these quantization flags "
                          "(checked before the model is loaded; default: none, key ranges from each prompt)")
    ppl.add_argument("--data", default="wikitext2-raw", help="dataset name or text file; its test split is scored")
    ppl.add_argument("--datatypes", default=DEFAULT_DATATYPES,
                     help="comma list: fp16 (the exact cache, shown as exact (fp32/fp16)), nuq2-4, int2-4, k<K>v<V> "
                          "(NUQ, K-bit keys, V-bit values: k4v2, k3v2), int-k<K>v<V>, nuq-alloc (per-layer widths "
                          "of a --calibration made with --bit-budget), plain, quanto2/4, quanto2k/4k, hqq2/4")
    ppl.add_argument("--device-map", default=None, metavar="auto",
                     help="passed to from_pretrained(device_map=...): 'auto' spreads the layers over the GPUs "
                          "(--device is then ignored; see docs/multi_gpu.md)")
    ppl.add_argument("--ctx", type=int, default=2048, help="tokens per window")
    ppl.add_argument("--prefill", type=int, default=None, help="tokens prefilled per window (default: ctx // 2)")
    ppl.add_argument("--chunk", type=int, default=32, help="tokens fed per step after the prefill")
    ppl.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    ppl.add_argument("--max-windows", type=int, default=None, help="windows scored (default: all of the split)")
    ppl.add_argument("--out", type=Path, default=Path("results/ppl.json"),
                     help="results JSON, rewritten after every datatype; \"complete\": false in its meta until done")
    ppl.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="keep the rows of an existing --out file of the same protocol (model, data, calibration, "
                          "windows, each datatype's config) and compute only the others; --no-resume recomputes "
                          "every row (default: resume)")
    _progress_arg(ppl)
    ppl.set_defaults(func=commands.cmd_eval_ppl)
    longctx.add_parser(esub, _model_args, _progress_arg)

    b = sub.add_parser("bench", help="benchmarks (extra arguments go to the benchmark; try --help)", add_help=False)
    b.add_argument("what", nargs="?", choices=BENCHMARKS,
                   help="benchmark to run; kvquant bench WHAT --help lists its options")
    b.set_defaults(func=None)

    lm = sub.add_parser("lm-eval", add_help=False,
                        help="lm-evaluation-harness with the kvquant model type (a cache per batch; arguments go "
                             "to lm-eval: --model kvquant --model_args pretrained=...,cache=nuq3 --tasks ...)")
    lm.set_defaults(func=None)

    r = sub.add_parser("report", parents=[debug], help="report.md with tables and plots from a results folder")
    r.add_argument("results_dir", type=Path, help="folder with bench generate / capacity / eval ppl / kernels output")
    r.add_argument("--out", default=None,
                   help="report file, or a folder (existing, or ending in /) for FOLDER/report.md "
                        "(default: RESULTS_DIR/report.md)")
    r.set_defaults(func=commands.cmd_report)

    from kvquant.sweep.cli import add_parser as add_sweep_parser

    add_sweep_parser(sub).set_defaults(func=cmd_sweep)
    p.description = describe(list(sub.choices))
    return p


class _UsageError(Exception):
    """A command line the parser rejects (raised instead of printing usage and exiting)."""


class _CheckingParser(ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


#: Commands a sweep may run (every command but the sweep itself and the demo).
SWEEP_COMMANDS = ("calibrate", "eval", "bench", "report")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name."""
    return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def check_command(argv: list[str]) -> str | None:
    """Why ``argv`` does not start with a command ``kvquant sweep`` can run (None when it does)."""
    if not argv or argv[0] not in SWEEP_COMMANDS:
        return (f"unknown command {' '.join(argv[:2]) or '(empty)'!r} (commands: calibrate, eval ppl, "
                f"bench {{{','.join(BENCHMARKS)}}}, report)")
    if argv[0] == "bench" and (len(argv) < 2 or argv[1] not in BENCHMARKS):
        return f"unknown benchmark {' '.join(argv[:2])!r} (bench {{{','.join(BENCHMARKS)}}})"
    if argv[0] == "eval":
        evals = _subcommands(_subcommands(build_parser())["eval"])
        if len(argv) < 2 or argv[1] not in evals:
            return f"unknown evaluation {' '.join(argv[:2])!r} (eval {{{','.join(evals)}}})"
    return None


def check_argv(argv: list[str]) -> str | None:
    """Why the kvquant command line ``argv`` would be rejected before running (unknown command or flag, bad
    value, invalid quantization setting), or None. Benchmarks check their own flags when they run: only their
    name is checked here."""
    problem = check_command(argv)
    if problem or argv[0] == "bench":
        return problem
    try:
        args, rest = build_parser(_CheckingParser).parse_known_args(argv)
        if rest:
            return f"unrecognized arguments: {' '.join(rest)}"
        quant_config_from_args(args)
    except _UsageError as exc:
        return str(exc)
    except ValueError as exc:
        return str(exc)
    return None


def cmd_sweep(a: argparse.Namespace) -> int:
    """``kvquant sweep``: a grid of kvquant commands, run locally or as Slurm job arrays."""
    from kvquant.sweep.cli import main as sweep_main
    from kvquant.sweep.grid import GridError

    try:
        return sweep_main(a, check_command=check_command, check_argv=check_argv)
    except GridError as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        raise CLIError("interrupted; run the same command again to resume", ExitCode.INTERRUPTED) from None


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int | None:
    if args.command == "bench":
        rest = [x for x in rest if x != "--debug"]
        if args.what is None:
            print(f"usage: kvquant bench {{{','.join(BENCHMARKS)}}} [options]\n"
                  "kvquant bench WHAT --help lists the options of one benchmark.")
            return 0 if {"-h", "--help"} & set(rest) else 2
        return commands.cmd_bench(args, rest)
    if args.command == "lm-eval":
        import importlib.util

        from kvquant.eval.lm_harness import main as lm_eval_main

        if importlib.util.find_spec("lm_eval") is None:
            raise CLIError("lm-eval is not installed (pip install kvquant[longctx])", ExitCode.MISSING)

        return lm_eval_main([x for x in rest if x != "--debug"])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:  # an invalid QuantConfig value is a usage error, before any model is loaded
        quant_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args.func(args)


def main(argv: list[str] | None = None) -> None:
    """Run ``kvquant`` with ``argv`` (default: ``sys.argv[1:]``). Returns on success; otherwise ends with
    ``SystemExit`` and the exit code of :mod:`kvquant.cli.errors`."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    prog = " ".join(["kvquant", args.command, *([args.what] if args.command == "eval" else [])])
    code = run_reporting_errors(prog, lambda: _dispatch(parser, args, rest), debug_requested(argv))
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
