"""Run one job: ``python -m kvquant ARGS`` in its own process (a crash cannot take the sweep down), stdout and
stderr appended to the job's logs, a time limit, and the outcome recorded in the job's state file.

The command writes into a staging folder that is renamed to the job's folder only after it exited 0 and every
declared output exists; only then is the job recorded ``completed``. A failure records its exit code or signal
and a reason: timeout, out of memory (recognised in the log), the last error line of the log.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvquant.sweep.jobs import Job, SweepDir
from kvquant.sweep.state import JobState, now, outputs_missing, read_state, write_state

#: Log lines that mean the job ran out of memory (GPU or host).
OOM_RE = re.compile(r"CUDA out of memory|OutOfMemoryError|\bMemoryError\b|out of memory|CUBLAS_STATUS_ALLOC_FAILED",
                    re.IGNORECASE)
_ERROR_LINE_RE = re.compile(r"^([\w.]+(Error|Exception|Interrupt)\b|kvquant[\w ]*: error:|error:)", re.IGNORECASE)
#: Seconds between SIGTERM and SIGKILL when a job is stopped.
KILL_GRACE_S = 10.0


def _kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the job's process group, SIGKILL it if still there after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, offset: int, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def error_line(text: str) -> str | None:
    """The most telling line of a failed command's stderr: the last exception or ``error:`` line, else the last
    non-empty line (progress bars ignored)."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    lines = [ln for ln in lines if not re.search(r"\d+%\|", ln)]
    for ln in reversed(lines):
        if _ERROR_LINE_RE.match(ln):
            return ln[:300]
    return lines[-1][:300] if lines else None


def oom_line(text: str) -> str | None:
    """The last log line that says the process ran out of memory, or None."""
    hits = [ln.strip() for ln in re.split(r"[\r\n]+", text) if OOM_RE.search(ln)]
    return hits[-1][:300] if hits else None


def _publish(staging: Path, final: Path) -> None:
    """Move the staging folder to its final name (replacing an older result)."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _log_header(path: Path, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        return f.tell()


def run_job(job: Job, sweep: SweepDir, *, executor: str = "local", slurm_job_id: str | None = None,
            python: str = sys.executable, say: Callable[[str], None] | None = None) -> JobState:
    """Run ``job`` to its end and record the outcome; returns the final state.

    Args:
        executor: recorded in the state (``local`` | ``slurm``).
        slurm_job_id: recorded in the state.
        python: the interpreter that runs ``-m kvquant``.
        say: called with one line when the job starts (its pid and log files).

    An exception while waiting (Ctrl-C, Slurm's time-limit signal) stops the job's processes, records it as
    failed (``interrupted``, or ``timeout`` for Slurm's time limit) and propagates.
    """
    state = read_state(sweep, job)
    final = sweep.job_dir(job)
    staging = sweep.staging_dir(job)
    out_log, err_log = sweep.log_paths(job)
    state.attempts += 1
    state.status, state.failure, state.reason, state.exit_code, state.signal = "running", None, None, None, None
    state.executor, state.host, state.pid, state.slurm_job_id = executor, socket.gethostname(), None, slurm_job_id
    state.started, state.ended, state.seconds = now(), None, None
    state.argv = job.argv(final)
    state.log_out, state.log_err = str(out_log), str(err_log)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for rel in job.outputs.values():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
    argv = job.argv(staging)
    header = f"\n=== {state.started} {state.host}: attempt {state.attempts} of {job.id}\n"
    _log_header(out_log, header + "$ kvquant " + " ".join(argv) + "\n")
    err_offset = _log_header(err_log, header)
    env = {**os.environ, **job.env, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    timeout_s = job.timeout_min * 60 if job.timeout_min else None
    with open(out_log, "a", encoding="utf-8") as fo, open(err_log, "a", encoding="utf-8") as fe:
        try:
            proc = subprocess.Popen([python, "-m", "kvquant", *argv], stdout=fo, stderr=fe,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as exc:
            state.finish("failed", failure="exit", reason=f"could not start {python}: {exc}")
            write_state(sweep, state)
            return state
        state.pid = proc.pid
        write_state(sweep, state)
        if say is not None:
            say(f"{job.id}: started (pid {proc.pid}), logs {out_log} / {err_log.name}")
        timed_out = False
        try:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
        except BaseException as exc:
            _kill_group(proc)
            state.seconds = round(time.monotonic() - t0, 3)
            state.exit_code = proc.returncode if proc.returncode is not None and proc.returncode >= 0 else None
            if "timed-out" in str(exc):  # submitit's signal before Slurm's time limit
                state.finish("failed", failure="timeout", reason="timeout: Slurm's time limit was reached")
            else:
                state.finish("failed", failure="interrupted",
                             reason=f"interrupted ({type(exc).__name__}) while running")
            write_state(sweep, state)
            raise
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # what the command left behind
                os.killpg(proc.pid, signal.SIGKILL)
    state.seconds = round(time.monotonic() - t0, 3)
    rc = proc.returncode
    log_text = _tail(err_log, err_offset)
    if rc is not None and rc < 0:
        try:
            state.signal = signal.Signals(-rc).name
        except ValueError:
            state.signal = f"signal {-rc}"
    else:
        state.exit_code = rc
    if timed_out:
        state.finish("failed", failure="timeout",
                     reason=f"timeout: stopped after {job.timeout_min:g} min (timeout_min)")
    elif rc == 0:
        missing = outputs_missing(sweep, job, staging)
        if missing:
            state.finish("failed", failure="missing_outputs",
                         reason=f"exit 0 but outputs missing: {', '.join(missing)}")
        else:
            _publish(staging, final)
            state.finish("completed")
    elif oom_line(log_text):
        state.finish("failed", failure="oom", reason=f"out of memory: {oom_line(log_text)}")
    elif state.signal:
        hint = " (the out-of-memory killer, a user or the scheduler)" if state.signal == "SIGKILL" else ""
        state.finish("failed", failure="signal", reason=f"killed by {state.signal}{hint}")
    else:
        line = error_line(log_text)
        state.finish("failed", failure="exit", reason=f"exit code {rc}" + (f": {line}" if line else ""))
    write_state(sweep, state)
    return state
