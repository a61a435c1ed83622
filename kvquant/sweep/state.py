"""Each job's state, one JSON file per job written atomically (a temporary file, then ``os.replace``), so that
Slurm array tasks never write the same file and a crash leaves the previous state or the new one.

States: ``pending`` (never run), ``queued`` (submitted to Slurm), ``running``, ``completed`` (exit 0 and every
output present), ``failed`` (with a reason: exit code, signal, timeout, out of memory, node failure,
preemption, interrupted), ``blocked`` (a job it needs did not complete).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvquant.files import write_json_atomic
from kvquant.sweep.jobs import Job, SweepDir

STATE_SCHEMA = "kvquant.sweep.state/v1"
STATUSES = ("pending", "queued", "running", "completed", "failed", "blocked")


def now() -> str:
    """The current UTC time, ISO 8601, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobState:
    """What is known about one job.

    Attributes:
        id: the job id.
        status: one of :data:`STATUSES`.
        attempts: how many times it started.
        argv: the command line of the last attempt (a completed job whose command line changed is run again).
        failure: kind of failure: ``exit``, ``signal``, ``timeout``, ``oom``, ``node_fail``, ``preempted``,
            ``cancelled``, ``missing_outputs``, ``interrupted`` (None unless failed).
        reason: one line for the reader (why it failed, is blocked or queued).
        exit_code: the command's exit code (None when killed by a signal or not run).
        signal: the signal name that ended it (``SIGKILL``), if any.
        executor: ``local`` or ``slurm``.
        host, pid: where the last attempt runs or ran (pid of the kvquant process).
        slurm_job_id: the Slurm job id (``<array>_<index>``) of the last submission.
        started, ended: ISO times of the last attempt; seconds: its duration.
        log_out, log_err: the log files.
    """

    id: str
    status: str = "pending"
    attempts: int = 0
    argv: list[str] | None = None
    failure: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    executor: str | None = None
    host: str | None = None
    pid: int | None = None
    slurm_job_id: str | None = None
    started: str | None = None
    ended: str | None = None
    seconds: float | None = None
    log_out: str | None = None
    log_err: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (with the schema)."""
        return {"schema": STATE_SCHEMA, **asdict(self)}

    def finish(self, status: str, *, failure: str | None = None, reason: str | None = None) -> JobState:
        """Set a final status and remember the attempt in :attr:`history` (returns self)."""
        self.status, self.failure, self.reason = status, failure, reason
        self.ended = now()
        self.history.append({"attempt": self.attempts, "status": status, "failure": failure, "reason": reason,
                             "exit_code": self.exit_code, "signal": self.signal, "ended": self.ended,
                             "slurm_job_id": self.slurm_job_id, "host": self.host})
        return self


def read_state(sweep: SweepDir, job: Job | str) -> JobState:
    """The job's state (``pending`` when it has no state file; an unreadable file counts as ``pending`` with the
    problem as reason)."""
    jid = job.id if isinstance(job, Job) else job
    path = sweep.state_path(jid)
    if not path.is_file():
        return JobState(jid)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return JobState(**{k: doc[k] for k in JobState.__dataclass_fields__ if k in doc})
    except (OSError, ValueError, TypeError) as exc:
        return JobState(jid, reason=f"state file unreadable ({type(exc).__name__}: {exc})")


def write_state(sweep: SweepDir, state: JobState) -> None:
    """Write the job's state file atomically."""
    write_json_atomic(sweep.state_path(state.id), state.to_dict())


def outputs_missing(sweep: SweepDir, job: Job, job_dir: Path | None = None) -> list[str]:
    """The declared outputs of ``job`` that do not exist in ``job_dir`` (default: its final folder); a folder
    output must exist and hold something."""
    base = sweep.job_dir(job) if job_dir is None else job_dir
    missing = []
    for rel in job.outputs.values():
        p = base / rel
        if rel.endswith("/"):
            if not p.is_dir() or not any(p.iterdir()):
                missing.append(rel)
        elif not p.is_file():
            missing.append(rel)
    return missing


def pid_alive(pid: int | None) -> bool:
    """Whether a process of that id exists on this machine."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reconcile_local(sweep: SweepDir, state: JobState) -> JobState:
    """A ``running`` state left by a local sweep that stopped (its kvquant process is gone) becomes ``failed``
    (``interrupted``) and is written back; anything else is returned as is."""
    if state.status == "running" and state.executor == "local" and state.host == socket.gethostname() \
            and not pid_alive(state.pid):
        state.exit_code = None
        state.finish("failed", failure="interrupted",
                     reason="interrupted: the sweep stopped while this job ran (its process is gone)")
        write_state(sweep, state)
    return state


def effective_status(sweep: SweepDir, job: Job, state: JobState) -> str:
    """The status to show: ``completed`` only when the state says so, the command line is the same and the
    outputs are still there (else ``pending``, i.e. it runs again)."""
    if state.status == "completed" and (state.argv != job.argv(sweep.job_dir(job))
                                        or outputs_missing(sweep, job)):
        return "pending"
    return state.status


def stale_reason(sweep: SweepDir, job: Job, state: JobState) -> str | None:
    """Why a ``completed`` job must run again (its command line changed, or outputs were removed), or None."""
    if state.status != "completed":
        return None
    if state.argv != job.argv(sweep.job_dir(job)):
        return "the command line changed since it completed"
    missing = outputs_missing(sweep, job)
    return f"outputs missing: {', '.join(missing)}" if missing else None


def status_rows(sweep: SweepDir, jobs: list[Job], *, reconcile: bool = True) -> list[dict[str, Any]]:
    """One row per job: id, status, attempts, seconds, reason, Slurm id, log, host, pid. ``reconcile``: record stopped
    local runs as failed first (:func:`reconcile_local`; False reads only)."""
    rows = []
    for job in jobs:
        st = read_state(sweep, job)
        if reconcile:
            st = reconcile_local(sweep, st)
        status = effective_status(sweep, job, st)
        reason = st.reason if status == st.status else stale_reason(sweep, job, st)
        rows.append({"id": job.id, "status": status, "attempts": st.attempts, "seconds": st.seconds,
                     "reason": reason, "slurm_job_id": st.slurm_job_id, "log": st.log_err, "deps": job.deps,
                     "host": st.host, "pid": st.pid})
    return rows


def format_status(rows: list[dict[str, Any]], width: int = 110) -> str:
    """A plain-text table of :func:`status_rows` and a count per status."""
    header = ("job", "status", "tries", "time", "reason / slurm id")
    table = []
    for r in rows:
        info = r["reason"] or ""
        if r.get("slurm_job_id") and r["status"] in ("queued", "running", "failed"):
            info = f"[{r['slurm_job_id']}] {info}".strip()
        secs = f"{r['seconds']:.0f}s" if isinstance(r.get("seconds"), (int, float)) else ""
        table.append((r["id"], r["status"], str(r["attempts"] or ""), secs, info))
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    budget = max(30, width - sum(widths[:-1]) - 8)
    for t in table:
        last = t[-1] if len(t[-1]) <= budget else t[-1][:budget - 1] + "…"
        lines.append("  ".join(v.ljust(w) for v, w in zip(t[:-1], widths[:-1])) + "  " + last)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append(", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts) or "no jobs")
    return "\n".join(line.rstrip() for line in lines)
