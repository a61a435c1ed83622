"""What a run of a sweep does with each job, from the recorded states: skip it (completed, same command line,
outputs present), run it, leave it (queued or running elsewhere), keep it failed (unless ``--retry-failed``) or
hold it back (a job it needs will not complete)."""

from __future__ import annotations

from dataclasses import dataclass

from kvquant.sweep.jobs import Job, SweepDir
from kvquant.sweep.state import JobState, read_state, reconcile_local, stale_reason

#: Decisions.
DONE, RUN, ACTIVE, FAILED, BLOCKED = "done", "run", "active", "failed", "blocked"


@dataclass
class Decision:
    """What happens to one job in this run, and why (``note``)."""

    job: Job
    action: str
    note: str
    state: JobState


def plan(sweep: SweepDir, jobs: list[Job], *, retry_failed: bool = False) -> list[Decision]:
    """A decision per job, in the jobs' order (every job after those it depends on).

    * ``done``: completed with the same command line and its outputs present;
    * ``active``: queued or running (a Slurm job, or a local run in another process);
    * ``failed``: failed before and ``retry_failed`` is off (the reason is kept); a job that was only interrupted
      (Ctrl-C, or the sweep stopped while it ran) runs again;
    * ``blocked``: a job it needs is failed, blocked or missing;
    * ``run``: everything else (never run, stale, retried, or waiting on jobs that run now or are active); a
      completed job runs again when a job it needs runs again.
    """
    out: list[Decision] = []
    by_id: dict[str, Decision] = {}
    for job in jobs:
        st = reconcile_local(sweep, read_state(sweep, job))
        stale = stale_reason(sweep, job, st)
        if st.status == "completed" and not stale:
            d = Decision(job, DONE, "completed", st)
        elif st.status in ("queued", "running"):
            d = Decision(job, ACTIVE, f"{st.status}" + (f" as Slurm job {st.slurm_job_id}" if st.slurm_job_id
                                                        else f" (pid {st.pid} on {st.host})"), st)
        elif st.status == "failed" and not retry_failed and st.failure != "interrupted":
            d = Decision(job, FAILED, f"failed: {st.reason} (--retry-failed runs it again)", st)
        else:
            note = {"completed": f"runs again: {stale}", "failed": f"runs again after: {st.reason}"}.get(
                st.status, "not run yet" if st.status in ("pending", "blocked") else st.status)
            d = Decision(job, RUN, note, st)
        rerun = [dep for dep in job.deps if dep in by_id and by_id[dep].action == RUN]
        if d.action == DONE and rerun:
            d = Decision(job, RUN, f"runs again: {', '.join(rerun)} runs again", st)
        bad = [dep for dep in job.deps if dep not in by_id or by_id[dep].action in (FAILED, BLOCKED)]
        if bad and d.action == RUN:
            d = Decision(job, BLOCKED, "waits for " + ", ".join(
                f"{b} ({by_id[b].action if b in by_id else 'not in the grid'})" for b in bad), st)
        out.append(d)
        by_id[job.id] = d
    return out
