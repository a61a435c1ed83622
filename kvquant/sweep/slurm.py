"""The Slurm executor, through submitit: one job per configuration, the jobs of a block that need the same
jobs submitted as one job array, waiting on those jobs with ``--dependency=afterok:...`` (and
``--kill-on-invalid-dep=yes``, so a failed dependency cancels the waiting jobs instead of leaving them pending).

Each array task runs :class:`SlurmTask`: the job's kvquant command in a subprocess, exactly as the local executor
does (:func:`~kvquant.sweep.runner.run_job`), recording its state in the grid's folder. A task whose command
failed exits non-zero, so ``afterok`` never starts what depends on it. Pre-emption requeues the task (submitit's
checkpoint mechanism); a timed-out task is not requeued (the commands do not resume) and is recorded ``timeout``.
States Slurm ends without the task recording them (node failure, out of memory, cancelled) are read from
``sacct`` by :func:`refresh_states` (``kvquant sweep status``, and before every submission).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvquant.sweep.grid import GridError
from kvquant.sweep.jobs import Job, SweepDir
from kvquant.sweep.plan import ACTIVE, RUN, Decision
from kvquant.sweep.runner import run_job
from kvquant.sweep.state import JobState, read_state, write_state

#: submitit's settings common to its executors (the others are Slurm's own, ``slurm_`` prefixed for submitit).
GENERIC = {"mem_gb", "cpus_per_task", "gpus_per_node", "nodes", "tasks_per_node", "stderr_to_stdout"}
_INT_GENERIC = {"cpus_per_task", "gpus_per_node", "nodes", "tasks_per_node"}

#: sacct states -> (failure kind, reason) of a job that ended without recording its own outcome.
SACCT_FAILURES: dict[str, tuple[str, str]] = {
    "TIMEOUT": ("timeout", "timeout: Slurm's time limit (sacct TIMEOUT)"),
    "DEADLINE": ("timeout", "Slurm deadline reached (sacct DEADLINE)"),
    "OUT_OF_MEMORY": ("oom", "out of memory: Slurm's memory limit (sacct OUT_OF_MEMORY)"),
    "NODE_FAIL": ("node_fail", "node failure (sacct NODE_FAIL)"),
    "BOOT_FAIL": ("node_fail", "node failed to boot (sacct BOOT_FAIL)"),
    "PREEMPTED": ("preempted", "preempted and not requeued (sacct PREEMPTED)"),
    "CANCELLED": ("cancelled", "cancelled (sacct CANCELLED)"),
    "REVOKED": ("cancelled", "revoked (sacct REVOKED)"),
    "FAILED": ("exit", "failed (sacct FAILED)"),
    "COMPLETED": ("missing_outputs", "the Slurm job ended without recording its result (sacct COMPLETED)"),
}


def known_settings() -> set[str] | None:
    """Setting names a grid's ``slurm:`` section accepts (None when submitit is not installed)."""
    try:
        from submitit import SlurmExecutor
    except ImportError:
        return None
    return GENERIC | set(SlurmExecutor._valid_parameters())


def require_slurm() -> None:
    """Raise :class:`GridError` unless submitit is installed and Slurm's ``srun``/``sbatch`` are on ``PATH``."""
    try:
        import submitit  # noqa: F401
    except ImportError as exc:
        raise GridError("the slurm executor needs submitit: pip install 'kvquant[sweep]'") from exc
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise GridError(f"cannot submit to Slurm here: {' and '.join(missing)} not found on PATH; --dry-run shows "
                        "the jobs and the sbatch scripts")


def executor_parameters(job: Job, grid_name: str) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keywords of a job: generic settings as they are, Slurm's prefixed
    ``slurm_``, the time limit (``timeout_min``, whole minutes) and a job name ``kvquant-<grid>-<block>``."""
    params: dict[str, Any] = {"name": f"kvquant-{grid_name}-{job.block}"}
    for k, v in job.slurm.items():
        if k in GENERIC:
            params[k] = int(v) if k in _INT_GENERIC else float(v) if k == "mem_gb" else v
        else:
            params[f"slurm_{k}"] = v
    if job.timeout_min is not None:
        params["timeout_min"] = int(math.ceil(job.timeout_min))
    return params


class _Task:
    """Base of :class:`SlurmTask` (submitit's ``Checkpointable`` when submitit is installed)."""


try:
    from submitit.helpers import Checkpointable as _Base
except ImportError:  # the grid tools work without submitit; only submitting needs it
    _Base = _Task  # type: ignore[misc,assignment]


class SlurmTask(_Base):  # type: ignore[misc,valid-type]
    """What one array task runs: the job's command through :func:`~kvquant.sweep.runner.run_job`.

    Raises (so that the Slurm job fails and ``afterok`` dependents never start) when the job did not complete.
    """

    def __init__(self, job: Job, root: str) -> None:
        self.job = job
        self.root = root
        self._checkpointed = False

    def __call__(self) -> str:
        import submitit

        sweep = SweepDir(self.root)
        self._checkpointed = False
        try:
            state = run_job(self.job, sweep, executor="slurm", slurm_job_id=submitit.JobEnvironment().job_id)
        except SystemExit:
            if self._checkpointed:  # submitit requeued the job after a pre-emption signal
                st = read_state(sweep, self.job)
                st.status, st.failure = "queued", None
                st.reason = f"preempted during attempt {st.attempts}; requeued by Slurm"
                write_state(sweep, st)
            raise
        if state.status != "completed":
            raise RuntimeError(f"{self.job.id}: {state.reason}")
        return state.status

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on Slurm's pre-emption / time-limit signal: requeue the same task (a time-out
        is not requeued: the grid's executor allows no requeue after a time-out)."""
        self._checkpointed = True
        return super().checkpoint(*args, **kwargs)  # type: ignore[misc]


@dataclass
class Submission:
    """One sbatch call: the jobs of one array and what they wait for."""

    block: str
    jobs: list[Job]
    after: list[str]
    params: dict[str, Any]
    slurm_ids: list[str] = field(default_factory=list)


def group_submissions(decisions: list[Decision], grid_name: str) -> list[Submission]:
    """The arrays to submit for the jobs to run, in dependency order: the jobs of one block with the same jobs to
    wait for (and the same settings) form one array."""
    run_ids = {d.job.id for d in decisions if d.action == RUN}
    active = {d.job.id: d.state.slurm_job_id for d in decisions if d.action == ACTIVE}
    groups: dict[tuple, Submission] = {}
    for d in decisions:
        if d.action != RUN:
            continue
        waits = [dep for dep in d.job.deps if dep in run_ids or active.get(dep)]
        params = executor_parameters(d.job, grid_name)
        key = (d.job.block, tuple(sorted(waits)), repr(sorted(params.items())))
        groups.setdefault(key, Submission(d.job.block, [], sorted(waits), params)).jobs.append(d.job)
    return list(groups.values())


def submit(sweep: SweepDir, decisions: list[Decision], grid_name: str, *, folder: Path | None = None,
           record: bool = True, say: Callable[[str], None] | None = None) -> list[Submission]:
    """Submit the jobs to run (one array per :func:`group_submissions` group) and record them ``queued``.

    Args:
        folder: submitit's folder (default: the sweep's ``.sweep/slurm``).
        record: write the jobs' states (False for a dry run).

    Raises:
        GridError: submitit missing, or no Slurm on this machine.
    """
    require_slurm()
    import submitit

    folder = folder or sweep.slurm_folder
    subs = group_submissions(decisions, grid_name)
    slurm_id: dict[str, str] = {d.job.id: d.state.slurm_job_id for d in decisions
                                if d.action == ACTIVE and d.state.slurm_job_id}
    for sub in subs:
        try:
            ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=0)
        except RuntimeError as exc:
            raise GridError(f"cannot submit to Slurm here ({exc}); --dry-run shows the scripts") from exc
        params = dict(sub.params)
        if sub.after:
            params["slurm_dependency"] = "afterok:" + ":".join(slurm_id[j] for j in sub.after)
            extra = dict(params.get("slurm_additional_parameters") or {})
            extra.setdefault("kill-on-invalid-dep", "yes")
            params["slurm_additional_parameters"] = extra
        try:
            ex.update_parameters(**params)
        except (ValueError, NameError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GridError(f"jobs.{sub.block}: slurm settings rejected by submitit: {first}") from exc
        tasks = [SlurmTask(j, str(sweep.root)) for j in sub.jobs]
        submitted = ex.submit_array(tasks)
        sub.slurm_ids = [s.job_id for s in submitted]
        for job, sid in zip(sub.jobs, sub.slurm_ids):
            slurm_id[job.id] = sid
            if record:
                st = read_state(sweep, job)
                st.status, st.failure, st.executor, st.slurm_job_id = "queued", None, "slurm", sid
                st.reason = ("waits for " + ", ".join(sub.after)) if sub.after else None
                st.argv = job.argv(sweep.job_dir(job))
                write_state(sweep, st)
        if say is not None:
            ids = sub.slurm_ids[0].split("_")[0] if len(sub.slurm_ids) > 1 else sub.slurm_ids[0]
            say(f"submitted {len(sub.jobs)} job(s) of {sub.block} as Slurm job {ids}"
                + (f", after {len(sub.after)} job(s)" if sub.after else ""))
    return subs


def refresh_states(sweep: SweepDir, jobs: list[Job]) -> list[JobState]:
    """Ask Slurm (``sacct``, through submitit) about the jobs recorded ``queued`` or ``running`` on Slurm and
    record those that ended without recording it themselves (see :data:`SACCT_FAILURES`); a job cancelled
    because a job it needs failed is recorded ``blocked``. Returns the states that changed."""
    pending = [(j, st) for j in jobs for st in [read_state(sweep, j)]
               if st.status in ("queued", "running") and st.executor == "slurm" and st.slurm_job_id]
    if not pending:
        return []
    try:
        import submitit
    except ImportError:
        return []
    changed = []
    handles = {j.id: submitit.SlurmJob(folder=sweep.slurm_folder, job_id=st.slurm_job_id) for j, st in pending}
    for i, (job, st) in enumerate(pending):
        try:  # one sacct call for all the jobs (the first), then its answers
            raw = handles[job.id].get_info(mode="force" if i == 0 else "cache").get("State") or "UNKNOWN"
        except Exception:  # sacct missing or failing: leave the state as it is
            continue
        sacct = raw.split()[0].upper().rstrip("+")
        if sacct not in SACCT_FAILURES:
            continue
        fresh = read_state(sweep, job)  # the task may have recorded its end meanwhile
        if fresh.status not in ("queued", "running") or fresh.slurm_job_id != st.slurm_job_id:
            continue
        failure, reason = SACCT_FAILURES[sacct]
        failed_deps = [d for d in job.deps if read_state(sweep, d).status in ("failed", "blocked")]
        if sacct == "CANCELLED" and failed_deps:
            fresh.status, fresh.failure = "blocked", None
            fresh.reason = "cancelled by Slurm: " + ", ".join(failed_deps) + " did not complete"
            write_state(sweep, fresh)
        else:
            fresh.finish("failed", failure=failure, reason=f"{reason} [{st.slurm_job_id}]")
            write_state(sweep, fresh)
        changed.append(fresh)
    return changed


# ----------------------------------------------------------------------------------------------------
# fake Slurm commands: the dry run (and the tests) let submitit submit to a recorder

_FAKE_SBATCH = """#!{python}
# Records an sbatch call (arguments and script) for kvquant sweep --dry-run; submits nothing.
import json, os, sys
d = os.environ["KVQUANT_FAKE_SLURM_DIR"]
n = len([f for f in os.listdir(d) if f.startswith("sbatch_")])
script = open(sys.argv[-1]).read() if os.path.isfile(sys.argv[-1]) else None
with open(os.path.join(d, "sbatch_%04d.json" % n), "w") as f:
    json.dump({{"argv": sys.argv[1:], "script": script}}, f)
print("Submitted batch job %d" % (1000 + n))
"""
_FAKE_SACCT = """#!{python}
# Prints the sacct table saved in sacct.txt (for tests of kvquant sweep status); nothing else.
import os, sys
p = os.path.join(os.environ["KVQUANT_FAKE_SLURM_DIR"], "sacct.txt")
sys.stdout.write(open(p).read() if os.path.exists(p) else "JobID|State|NodeList\\n")
"""
_FAKE_SRUN = "#!/bin/sh\necho 'fake srun: not a Slurm cluster' >&2\nexit 1\n"


def write_fake_slurm(bin_dir: Path, python: str | None = None) -> Path:
    """Write fake ``sbatch`` (records its arguments and script in ``$KVQUANT_FAKE_SLURM_DIR/sbatch_NNNN.json``,
    prints job ids 1000, 1001, ...), ``sacct`` (prints ``$KVQUANT_FAKE_SLURM_DIR/sacct.txt``) and ``srun`` (so
    that submitit believes it is on a cluster) into ``bin_dir``."""
    import sys

    bin_dir.mkdir(parents=True, exist_ok=True)
    py = python or sys.executable
    for name, text in (("sbatch", _FAKE_SBATCH.format(python=py)), ("sacct", _FAKE_SACCT.format(python=py)),
                       ("srun", _FAKE_SRUN)):
        p = bin_dir / name
        p.write_text(text)
        p.chmod(0o755)
    return bin_dir


@contextlib.contextmanager
def fake_slurm(record_dir: Path) -> Iterator[Path]:
    """Put fake Slurm commands first on ``PATH`` (recording into ``record_dir``) for the block's duration."""
    bin_dir = write_fake_slurm(record_dir / "bin")
    old_path, old_dir = os.environ.get("PATH", ""), os.environ.get("KVQUANT_FAKE_SLURM_DIR")
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old_path}"
    os.environ["KVQUANT_FAKE_SLURM_DIR"] = str(record_dir)
    try:
        yield record_dir
    finally:
        os.environ["PATH"] = old_path
        if old_dir is None:
            os.environ.pop("KVQUANT_FAKE_SLURM_DIR", None)
        else:
            os.environ["KVQUANT_FAKE_SLURM_DIR"] = old_dir


def recorded_sbatch_calls(record_dir: Path) -> list[dict[str, Any]]:
    """The sbatch calls a fake ``sbatch`` recorded, in order: ``{"argv": [...], "script": "..."}``."""
    import json

    return [json.loads(p.read_text()) for p in sorted(record_dir.glob("sbatch_*.json"))]


def dry_run_scripts(sweep: SweepDir, decisions: list[Decision], grid_name: str) -> list[tuple[Submission, str]]:
    """The sbatch scripts submitit would submit for these decisions, without submitting: submitit submits to a
    fake ``sbatch`` that records them (job ids 1000, 1001, ... stand for the real ones). Paths in the scripts are
    the sweep's real ones."""
    with tempfile.TemporaryDirectory(prefix="kvquant-sweep-dry-") as tmp:
        rec = Path(tmp)
        folder = rec / "slurm"
        with fake_slurm(rec):
            subs = submit(sweep, decisions, grid_name, folder=folder, record=False)
        calls = recorded_sbatch_calls(rec)
        real = str(sweep.slurm_folder)
        scripts = [re.sub(re.escape(str(folder)), real, c.get("script") or "") for c in calls]
    return list(zip(subs, scripts))
