"""``kvquant sweep GRID`` and ``kvquant sweep status DIR``: the command-line side of :mod:`kvquant.sweep`."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from kvquant.sweep.expand import expand
from kvquant.sweep.grid import Grid, GridError, load_grid
from kvquant.sweep.jobs import Job, SweepDir
from kvquant.sweep.local import run_local
from kvquant.sweep.plan import RUN, Decision, plan
from kvquant.sweep.slurm import dry_run_scripts, known_settings, refresh_states, require_slurm, submit
from kvquant.sweep.state import format_status, status_rows

#: ``check(argv) -> problem or None``: the kvquant CLI's own check of a command line.
Checker = Callable[[list[str]], "str | None"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``kvquant sweep`` on the CLI's subcommands."""
    s = sub.add_parser(
        "sweep", help="run a grid of kvquant commands, locally or on Slurm (resumable)",
        description="Run every configuration of a grid file (YAML or TOML; see docs/sweep.md) locally or as "
                    "Slurm job arrays; a re-run skips completed jobs. `kvquant sweep status DIR` lists the jobs "
                    "and their states; `kvquant report DIR` merges the results.")
    s.add_argument("grid", help="grid file (.yaml, .yml, .toml); or `status` and a results folder or grid file")
    s.add_argument("folder", nargs="?", default=None, help="with `status`: the results folder (or the grid file)")
    s.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: one job after another here; slurm: job arrays through submitit (default: local)")
    s.add_argument("--results", type=Path, default=None, help="results folder (default: the grid's `results:`)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the jobs (command lines, dependencies, what would run) and, with --executor "
                        "slurm, the sbatch scripts submitit would submit; run nothing")
    s.add_argument("--retry-failed", action="store_true", help="run failed jobs again (default: keep them failed)")
    return s


def _load(path: Path, check_command: Checker | None) -> Grid:
    return load_grid(path, check_command=check_command, slurm_known=known_settings())


def _check_jobs(grid: Grid, sweep: SweepDir, jobs: list[Job], check_argv: Checker | None) -> None:
    if check_argv is None:
        return
    for job in jobs:
        problem = check_argv(job.argv(sweep.job_dir(job)))
        if problem:
            raise GridError(f"{grid.source}: jobs.{job.block}: job {job.id}: {problem}")


def _claim(sweep: SweepDir, grid: Grid) -> None:
    """Refuse a results folder that holds another grid's sweep."""
    if sweep.jobs_file.is_file():
        other, _ = sweep.read_jobs()
        if other != grid.name:
            raise GridError(f"{sweep.root} holds the sweep of grid {other!r}, not {grid.name!r}: give this grid "
                            "its own `results:` folder (or --results)")


def _command_line(job: Job, sweep: SweepDir) -> str:
    return "kvquant " + shlex.join(job.argv(sweep.job_dir(job)))


def print_plan(decisions: list[Decision], sweep: SweepDir, out: TextIO | None = None) -> None:
    """The jobs, one paragraph each: id, what this run does with it, command line, dependencies (to ``out``,
    default stdout)."""
    out = out or sys.stdout
    for d in decisions:
        print(f"{d.job.id}  [{d.action}: {d.note}]", file=out)
        print(f"    {_command_line(d.job, sweep)}", file=out)
        if d.job.deps:
            print(f"    after: {', '.join(d.job.deps)}", file=out)
        if d.job.timeout_min:
            print(f"    timeout: {d.job.timeout_min:g} min", file=out)
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.action] = counts.get(d.action, 0) + 1
    print(f"{len(decisions)} jobs: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=out)


def cmd_status(target: Path) -> int:
    """``kvquant sweep status DIR`` (or a grid file: its results folder)."""
    root = target
    if target.is_file():
        root = _load(target, None).results
    sweep = SweepDir(root)
    try:
        _, jobs = sweep.read_jobs()
    except FileNotFoundError as exc:
        raise GridError(str(exc)) from exc
    refresh_states(sweep, jobs)
    print(f"sweep {sweep.root}")
    print(format_status(status_rows(sweep, jobs), width=shutil.get_terminal_size((140, 20)).columns))
    return 0


def main(a: argparse.Namespace, check_command: Checker | None = None, check_argv: Checker | None = None) -> int:
    """Run ``kvquant sweep`` for parsed arguments; returns the exit code (1 when a job failed or is blocked).

    Raises:
        GridError: a mistake in the grid file or the folder (the CLI prints it as one line).
    """
    if a.grid == "status":
        if a.folder is None:
            raise GridError("usage: kvquant sweep status RESULTS_DIR (or GRID_FILE)")
        return cmd_status(Path(a.folder))
    if a.folder is not None:
        raise GridError(f"unexpected argument {a.folder!r} (kvquant sweep GRID [options])")
    grid = _load(Path(a.grid), check_command)
    sweep = SweepDir(a.results or grid.results)
    jobs = expand(grid, sweep.root)
    _check_jobs(grid, sweep, jobs, check_argv)
    _claim(sweep, grid)
    if a.executor == "slurm" and not a.dry_run:
        refresh_states(sweep, jobs)
    decisions = plan(sweep, jobs, retry_failed=a.retry_failed)
    if a.dry_run:
        print(f"grid {grid.name} ({grid.source}) -> {sweep.root}, executor {a.executor}, dry run")
        print_plan(decisions, sweep)
        if a.executor == "slurm" and any(d.action == RUN for d in decisions):
            for sub, script in dry_run_scripts(sweep, decisions, grid.name):
                print(f"\n# ---- sbatch script: {len(sub.jobs)} job(s) of {sub.block}"
                      + (f", after {', '.join(sub.after)}" if sub.after else "")
                      + " (job ids 1000, 1001, ... stand for Slurm's) ----")
                print(script.rstrip())
        return 0
    if a.executor == "slurm":
        require_slurm()
    sweep.write_jobs(grid.name, jobs)
    shutil.copyfile(grid.source, sweep.meta / f"grid{grid.source.suffix}")
    print(f"grid {grid.name}: {len(jobs)} jobs -> {sweep.root}", file=sys.stderr)
    if a.executor == "slurm":
        subs = submit(sweep, decisions, grid.name, say=lambda line: print(line, file=sys.stderr))
        if not subs:
            print("nothing to submit", file=sys.stderr)
        print(format_status(status_rows(sweep, jobs)))
        print(f"follow with: kvquant sweep status {sweep.root}")
        return 0
    states = run_local(sweep, jobs, retry_failed=a.retry_failed)
    print(format_status(status_rows(sweep, jobs), width=shutil.get_terminal_size((140, 20)).columns))
    print(f"report: kvquant report {sweep.root}")
    return 0 if all(s.status == "completed" for s in states) else 1
