"""``kvquant eval longctx``: passkey and RULER-style retrieval through the quantized cache and its baselines.

Example (the CPU table of docs/benchmarks.md)::

    kvquant eval longctx --model smollm2-135m --tasks passkey,niah_single_2 --lengths 2K --depths 0,50,100 --n 2 \\
        --caches fp16,nuq4,nuq3,nuq2,quanto4k,quanto2k,snapkv@nuq3 --batch 2 --out results/longctx.jsonl

Results go to a JSON-lines file, one record per (task, length, depth, cache); rerunning the command skips the cells
the file has. ``kvquant report FOLDER`` draws the needle heat maps and the accuracy-vs-bits table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvquant.cli.errors import CLIError
from kvquant.flags import add_quant_config_args, parse_size_list, quant_config_from_args

DEFAULT_CACHES = "fp16,nuq4,nuq3,nuq2,quanto4k,quanto2k"
DEFAULT_DEPTHS = "0,25,50,75,100"


def add_parser(esub: argparse._SubParsersAction, model_args, progress_arg) -> None:
    """Register ``eval longctx`` under ``kvquant eval``."""
    p = esub.add_parser("longctx", help="passkey and RULER needles through the cache, beside KIVI and eviction",
                        description=__doc__.split("\n")[0])
    model_args(p)
    add_quant_config_args(p)
    p.add_argument("--calibration", default=None, help="calibration from `kvquant calibrate` (default: heuristic "
                                                       "codebooks, key ranges from each prompt)")
    p.add_argument("--tasks", default="passkey,niah_single_2",
                   help="comma list: passkey, niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, "
                        "niah_multiquery, vt, cwe; `ruler` = every RULER task, `all` = everything")
    p.add_argument("--lengths", default="2K",
                   help="prompt lengths in model tokens, answer included: list and doubling ranges (2K..32K); "
                        "`max` = the model's context")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in percent of the haystack")
    p.add_argument("--n", type=int, default=4, help="samples per (task, length, depth) cell")
    p.add_argument("--caches", default=DEFAULT_CACHES,
                   help="comma list: fp16 (DynamicCache), nuq2-4/int2-4/k<K>v<V>/int-k<K>v<V>/nuq-alloc (kvquant), "
                        "quanto2/4[k]/hqq2/4 "
                        "(transformers' KIVI-style QuantizedCache), PRESS@DATATYPE or PRESS:RATIO (kvpress eviction "
                        "at the bytes of a kvquant datatype or a fixed ratio: snapkv@nuq3, knorm:0.75)")
    p.add_argument("--batch", type=int, default=4,
                   help="prompts per left-padded batch; a cache runs the depths of one (task, length) together, each "
                   "depth still its own record (presses run one at a time)")
    p.add_argument("--one-at-a-time", action="store_true", help="same as --batch 1")
    p.add_argument("--haystack", default="pg-essays",
                   help="essay haystack: pg-essays (shared/ or the hub), a named dataset, or a text file")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer budget of every task (default: each "
                                                                    "task's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (haystack crops, needles, keys)")
    p.add_argument("--tag", default=None, help="appended to the recorded cache names (nuq2+TAG), e.g. to tell a run "
                                               "with --residual-length 128 from the default one in one results folder")
    p.add_argument("--out", type=Path, default=Path("results/longctx.jsonl"),
                   help="JSON-lines results file; cells already in it are skipped")
    progress_arg(p)
    p.set_defaults(func=cmd_eval_longctx)


def _fail(msg: str) -> CLIError:
    return CLIError(msg)


def _lengths(text: str, model_max: int | None) -> list[int]:
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if model_max is not None:
        parts = [str(model_max) if t.lower() == "max" else t.replace("max", str(model_max)) for t in parts]
    try:
        lengths = parse_size_list(",".join(parts))
    except ValueError as exc:
        raise _fail(f"--lengths: {exc}") from None
    if model_max is not None and max(lengths) > model_max:
        raise _fail(f"--lengths: {max(lengths)} tokens is beyond the model's context ({model_max})")
    return lengths


def _depths(text: str) -> list[float]:
    try:
        depths = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise _fail(f"--depths: {text!r} is not a comma list of percentages") from None
    if not depths or any(not 0 <= d <= 100 for d in depths):
        raise _fail(f"--depths: {text!r}: every depth must be in 0..100 (percent)")
    return [int(d) if d == int(d) else d for d in depths]


def cmd_eval_longctx(a: argparse.Namespace) -> None:
    """Parse and check every option, load the model, haystack and calibration, run the grid."""
    from kvquant.eval.longctx.caches import cache_available, parse_caches
    from kvquant.eval.longctx.tasks import TASKS, parse_tasks

    try:
        tasks = parse_tasks(a.tasks)
        specs = parse_caches(a.caches)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    depths = _depths(a.depths)
    if a.n < 1:
        raise _fail("--n must be at least 1")
    batch = 1 if a.one_at_a_time else a.batch
    if batch < 1:
        raise _fail("--batch must be at least 1")
    runnable = []
    for spec in specs:
        ok, why = cache_available(spec)
        if ok:
            runnable.append(spec)
        else:
            print(f"skipping {spec.name}: {why}", file=sys.stderr)
    if not runnable:
        raise _fail("none of --caches can run here")
    cfg = quant_config_from_args(a)
    from kvquant.cli.inputs import check_calibration_fits, check_calibration_widths, read_calibration

    cal = read_calibration(a.calibration, cfg)  # before the model: a wrong file is one line at once
    check_calibration_widths([s.match or s.name for s in runnable], cal)

    import torch

    from kvquant.eval.longctx.grid import GridSettings, evaluate_longctx
    from kvquant.eval.longctx.haystack import Haystack
    from kvquant.eval.longctx.results import ResultsFile
    from kvquant.eval.longctx.runner import PromptEncoder

    haystack = None
    if any(TASKS[t].essay for t in tasks):
        from kvquant.data import load_text

        try:
            haystack = Haystack(load_text(a.haystack, "test"))
        except (FileNotFoundError, ValueError) as exc:
            raise _fail(f"--haystack {a.haystack}: {str(exc).splitlines()[0]}") from None
    from kvquant.flags import resolve_device
    from kvquant.models import load_model

    print(f"loading model {a.model or '(default)'} ...", file=sys.stderr)
    model, tok, spec = load_model(a.model, dtype=a.dtype, device=resolve_device(a.device))
    text_cfg = getattr(model.config, "text_config", None) or model.config
    lengths = _lengths(a.lengths, getattr(text_cfg, "max_position_embeddings", None))
    check_calibration_fits(cal, model, spec.name, cfg)
    settings = GridSettings(model_name=spec.name, tasks=tasks, lengths=lengths, depths=depths, n=a.n,
                            caches=runnable, batch_size=batch, seed=a.seed, max_new_tokens=a.max_new_tokens,
                            tag=a.tag)
    meta = {"haystack": a.haystack if haystack is not None else None, "calibration": a.calibration,
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "torch_version": torch.__version__}
    results = ResultsFile(a.out)
    try:
        new = evaluate_longctx(model, tok, settings, results, haystack=haystack,
                               encoder=PromptEncoder(tok, spec.bos_id), calibration=cal, base_config=cfg, meta=meta,
                               progress=a.progress)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    print(f"{len(new)} cell(s) run, {len(results.records)} in {a.out}")
