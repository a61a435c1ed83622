"""Expand a :class:`~kvquant.sweep.grid.Grid` into its jobs: the Cartesian product of each block's list-valued
arguments, paired with the jobs of the blocks it references (``${block.output}``) or waits for (``after:``).

Pairing: the jobs of block A that a job of block B pairs with are those that agree with it on the *match keys*:
B's ``match:`` list when given, else the axes of A's jobs that B also sets. For a reference, B gives one job per
paired job of A (no paired job is an error) and inherits its axes, so its name says which configuration it
continues. For ``after:``, a job of B waits for every paired job of A and is not multiplied.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from kvquant.sweep.grid import REF_RE, RESULTS_REF, Block, Grid, GridError, Scalar, block_order, split_ref
from kvquant.sweep.jobs import Job, SweepDir

_SLUG_RE = re.compile(r"[^A-Za-z0-9._+-]+")
_FIELD_RE = re.compile(r"\{([^{}]+)\}")


def value_text(v: Scalar) -> str:
    """A value as it goes on the command line and into names (``True`` -> ``true``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


def slug(v: str) -> str:
    """A value as it appears in a job name: its last path component, characters outside ``[A-Za-z0-9._+-]``
    replaced by ``_``."""
    v = v.rstrip("/").rsplit("/", 1)[-1] or v
    return _SLUG_RE.sub("_", v).strip("_") or "_"


def _render_args(args: dict[str, Scalar]) -> list[str]:
    out: list[str] = []
    for k, v in args.items():
        flag = k if k.startswith("-") else "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        else:
            out += [flag, value_text(v)]
    return out


#: Longest job name (a folder name; file systems allow 255 bytes).
MAX_NAME = 200


def _job_name(block: Block, axes: dict[str, str], where: str) -> str:
    if block.name_template is None:
        name = ",".join(f"{k}={slug(v)}" for k, v in axes.items())
        if len(name) > MAX_NAME:
            raise GridError(f"{where}: job name {name[:60]}... is longer than {MAX_NAME} characters; add a shorter "
                            "`name:` template")
        return name

    def field_value(m: re.Match[str]) -> str:
        key = m.group(1).strip()
        if key not in axes:
            raise GridError(f"{where}: name template field {{{key}}} is not an axis (axes: "
                            f"{', '.join(axes) or 'none'})")
        return slug(axes[key])

    name = _FIELD_RE.sub(field_value, block.name_template)
    if "/" in name or name.startswith(".") or not name:
        raise GridError(f"{where}: name template gives {name!r}, not a folder name")
    return name


def _paired(block: Block, other: str, candidates: list[Job], values_of: dict[str, dict[str, str]],
            values: dict[str, str], where: str, required: bool) -> list[Job]:
    """The jobs of block ``other`` that a job with argument values ``values`` pairs with (see the module doc)."""
    if block.match is not None:
        keys = list(block.match)
    else:
        keys = [k for k in dict.fromkeys(k for j in candidates for k in j.axes) if k in values]
    for k in keys:
        if k not in values:
            raise GridError(f"{where}: match key {k!r} is not an argument of this block")
        if not any(k in values_of[c.id] for c in candidates):
            raise GridError(f"{where}: match key {k!r} is not an argument of block {other!r}")
    chosen = [c for c in candidates if all(values_of[c.id].get(k) == values[k] for k in keys)]
    if not chosen and required:
        want = ", ".join(f"{k}={values[k]}" for k in keys)
        raise GridError(f"{where}: no job of block {other!r} has {want} (set `match:` to choose the arguments "
                        "that pair the two blocks)")
    return chosen


def expand(grid: Grid, root: str | Path | None = None) -> list[Job]:
    """The grid's jobs, every job after those it depends on.

    Args:
        root: the results folder (default: the grid's ``results``); outputs are placed under it.

    Raises:
        GridError: a reference no job satisfies, two jobs with the same name, a bad name template.
    """
    sweep = SweepDir(grid.results if root is None else root)
    by_block: dict[str, list[Job]] = {}
    values_of: dict[str, dict[str, str]] = {}  # job id -> every argument value (matching by later blocks)
    jobs: list[Job] = []
    for bname in block_order(grid):
        block = grid.blocks[bname]
        where = f"{grid.source}: jobs.{bname}"
        axis_names = [k for k, v in block.args.items() if isinstance(v, list)]
        axis_values = [block.args[k] for k in axis_names]
        scalars = {k: v for k, v in block.args.items() if not isinstance(v, list)}
        ref_blocks = list(dict.fromkeys(b for b, _ in block.references()))
        wait_blocks = [b for b in block.after if b not in ref_blocks]
        seen: dict[str, str] = {}
        for combo in itertools.product(*axis_values):
            own = dict(zip(axis_names, combo))
            values = {k: value_text(v) for k, v in {**scalars, **own}.items()}
            choices = [_paired(block, d, by_block[d], values_of, values, where, required=True) for d in ref_blocks]
            waits = [j.id for d in wait_blocks
                     for j in _paired(block, d, by_block[d], values_of, values, where, required=False)]
            for parents in itertools.product(*choices):
                axes = {k: value_text(v) for k, v in own.items()}
                for p in parents:
                    for k, v in p.axes.items():
                        if k in axes and axes[k] != v:
                            k = f"{p.block}.{k}"
                        axes.setdefault(k, v)
                name = _job_name(block, axes, where)
                job_id = f"{bname}/{name}" if name else bname
                if job_id in seen:
                    raise GridError(f"{where}: two jobs are both named {job_id!r} ({seen[job_id]} and "
                                    f"{_describe(axes)}); add a `name:` template that tells them apart")
                seen[job_id] = _describe(axes)
                outputs_of = {p.block: p for p in parents}
                args = {k: _substitute(v, outputs_of, sweep) for k, v in scalars.items()}
                job = Job(id=job_id, block=bname, command=list(block.command),
                          args=_render_args({k: own[k] if k in own else args[k] for k in block.args})
                          + [_substitute(x, outputs_of, sweep) for x in block.extra], outputs=dict(block.outputs),
                          deps=list(dict.fromkeys([p.id for p in parents] + waits)), axes=axes,
                          timeout_min=block.timeout_min if block.timeout_min is not None else grid.timeout_min,
                          slurm={**grid.slurm, **block.slurm}, env={**grid.env, **block.env})
                by_block.setdefault(bname, []).append(job)
                values_of[job.id] = {**values, **axes}
                jobs.append(job)
    return jobs


def _describe(axes: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items()) or "no axes"


def _substitute(value: Any, parents: dict[str, Job], sweep: SweepDir) -> Any:
    """``value`` with its references replaced by paths (non-strings as they are)."""
    def repl(m: re.Match[str]) -> str:
        if m.group(1).strip() == RESULTS_REF:
            return str(sweep.root)
        block, output = split_ref(m.group(1))
        job = parents[block]
        rel = job.outputs[output]
        return str(sweep.job_dir(job) / rel) + ("/" if rel.endswith("/") else "")

    return REF_RE.sub(repl, value) if isinstance(value, str) else value
