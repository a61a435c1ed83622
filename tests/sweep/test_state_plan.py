"""Job states and what a run does with each job (no subprocess: states are written by hand)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvquant.sweep import Job, JobState, SweepDir, format_status, plan, read_state, status_rows
from kvquant.sweep.runner import error_line, oom_line
from kvquant.sweep.state import stale_reason, write_state


def _jobs(tmp_path: Path) -> tuple[SweepDir, list[Job]]:
    sweep = SweepDir(tmp_path)
    a = Job("a/x=1", "a", ["calibrate"], ["--seed", "1"], {"out": "cal.safetensors"})
    b = Job("b/x=1", "b", ["eval", "ppl"], ["--calibration", str(sweep.job_dir("a/x=1") / "cal.safetensors")],
            {"out": "ppl.json"}, deps=["a/x=1"])
    c = Job("c", "c", ["bench", "capacity"], [], {"out": "cap/"}, deps=["b/x=1"])
    return sweep, [a, b, c]


def _complete(sweep: SweepDir, job: Job) -> None:
    d = sweep.job_dir(job)
    for rel in job.outputs.values():
        p = d / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
            (p / "capacity.json").write_text("{}")
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
    st = JobState(job.id, attempts=1, argv=job.argv(d), executor="local")
    write_state(sweep, st.finish("completed"))


def test_plan_skips_completed_keeps_failed_and_blocks_dependents(tmp_path: Path) -> None:
    sweep, (a, b, c) = _jobs(tmp_path)
    assert [d.action for d in plan(sweep, [a, b, c])] == ["run", "run", "run"]
    _complete(sweep, a)
    st = JobState(b.id, attempts=1, exit_code=1)
    write_state(sweep, st.finish("failed", failure="exit", reason="exit code 1: ValueError: boom"))
    ds = plan(sweep, [a, b, c])
    assert [d.action for d in ds] == ["done", "failed", "blocked"]
    assert "ValueError: boom" in ds[1].note and "--retry-failed" in ds[1].note and "b/x=1 (failed)" in ds[2].note
    ds = plan(sweep, [a, b, c], retry_failed=True)
    assert [d.action for d in ds] == ["done", "run", "run"]
    # a completed job runs again when its outputs are gone or its command line changed
    (sweep.job_dir(a) / "cal.safetensors").unlink()
    assert plan(sweep, [a])[0].action == "run" and "outputs missing" in plan(sweep, [a])[0].note
    _complete(sweep, a)
    a2 = Job(**{**a.to_dict(), "args": ["--seed", "2"]})
    assert plan(sweep, [a2])[0].action == "run" and "command line changed" in plan(sweep, [a2])[0].note
    # an empty folder output is not a result
    _complete(sweep, c)
    assert plan(sweep, [a, b, c], retry_failed=True)[2].action == "run"  # b runs again, so c waits for it
    for f in (sweep.job_dir(c) / "cap").iterdir():
        f.unlink()
    assert stale_reason(sweep, c, read_state(sweep, c)) == "outputs missing: cap/"


def test_a_running_state_of_a_dead_local_process_becomes_interrupted(tmp_path: Path) -> None:
    """A sweep killed while a job ran leaves it `running`: the next run records it interrupted and runs it again
    (an interruption is not a failure of the job); a job another live sweep runs is left alone."""
    sweep, (a, b, _) = _jobs(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists
    write_state(sweep, JobState(a.id, status="running", attempts=1, executor="local",
                                host=socket.gethostname(), pid=proc.pid))
    write_state(sweep, JobState(b.id, status="running", attempts=1, executor="local",
                                host=socket.gethostname(), pid=os.getpid()))  # alive: another sweep runs it
    ds = plan(sweep, [a, b])
    assert read_state(sweep, a).failure == "interrupted"
    assert ds[0].action == "run" and "interrupted: the sweep stopped while this job ran" in ds[0].note
    assert ds[1].action == "active" and f"pid {os.getpid()}" in ds[1].note


def test_state_files_are_atomic_json(tmp_path: Path) -> None:
    sweep, (a, *_) = _jobs(tmp_path)
    write_state(sweep, JobState(a.id, attempts=3))
    path = sweep.state_path(a)
    assert json.loads(path.read_text())["attempts"] == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    path.write_text("{not json")
    st = read_state(sweep, a)
    assert st.status == "pending" and "unreadable" in st.reason


def test_status_table(tmp_path: Path) -> None:
    sweep, jobs = _jobs(tmp_path)
    _complete(sweep, jobs[0])
    write_state(sweep, JobState(jobs[1].id, attempts=2, slurm_job_id="77_1").finish(
        "failed", failure="node_fail", reason="node failure (sacct NODE_FAIL) [77_1]"))
    text = format_status(status_rows(sweep, jobs))
    lines = text.splitlines()
    assert lines[0].split() == ["job", "status", "tries", "time", "reason", "/", "slurm", "id"]
    assert "b/x=1" in lines[2] and "failed" in lines[2] and "[77_1] node failure" in lines[2]
    assert lines[-1] == "1 pending, 1 completed, 1 failed"


@pytest.mark.parametrize("log, oom, line", [
    ("loading model\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", True,
     "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("fitting:  50%|#####     | 1/2\rTraceback (most recent call last):\n  File x\nValueError: bad ctx\n", False,
     "ValueError: bad ctx"),
    ("usage: kvquant calibrate ...\nkvquant calibrate: error: the following arguments are required: --out\n", False,
     "kvquant calibrate: error: the following arguments are required: --out"),
    ("", False, None),
])
def test_failure_reasons_from_the_log(log: str, oom: bool, line: str | None) -> None:
    assert (oom_line(log) is not None) == oom
    assert error_line(log) == line
