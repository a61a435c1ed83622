"""The local executor: the jobs of a sweep one after another on this machine (a laptop, a single GPU box, CI).

A job whose dependencies did not complete in this run is recorded ``blocked``; Ctrl-C stops the running job,
records it as interrupted and ends the sweep (a later run resumes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from kvquant.sweep.jobs import Job, SweepDir
from kvquant.sweep.plan import BLOCKED, RUN, plan
from kvquant.sweep.runner import run_job
from kvquant.sweep.state import JobState, read_state, write_state


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_local(sweep: SweepDir, jobs: list[Job], *, retry_failed: bool = False,
              say: Callable[[str], None] = _print) -> list[JobState]:
    """Run every job that :func:`~kvquant.sweep.plan.plan` says to run, in order; returns the final state of
    every job. Progress: one line per job as it starts and ends, with the count done so far."""
    decisions = plan(sweep, jobs, retry_failed=retry_failed)
    todo = [d for d in decisions if d.action in (RUN, BLOCKED)]
    skipped = len(decisions) - len(todo)
    say(f"sweep: {len(jobs)} jobs, {len([d for d in todo if d.action == RUN])} to run, {skipped} left as they are "
        "(completed, failed or active)")
    states: dict[str, JobState] = {d.job.id: d.state for d in decisions}
    n = 0
    for d in decisions:
        if d.action not in (RUN, BLOCKED):
            continue
        n += 1
        job = d.job
        waiting = [dep for dep in job.deps if states[dep].status != "completed"]
        if waiting:
            st = read_state(sweep, job)
            st.status, st.failure = "blocked", None
            st.reason = "waits for " + ", ".join(f"{w} ({states[w].status})" for w in waiting)
            write_state(sweep, st)
            states[job.id] = st
            say(f"[{n}/{len(todo)}] {job.id}: blocked, {st.reason}")
            continue
        say(f"[{n}/{len(todo)}] {job.id}: kvquant {' '.join(job.command)} ({d.note})")
        st = run_job(job, sweep, say=lambda line: say("    " + line))
        states[job.id] = st
        took = f" in {st.seconds:.1f} s" if st.seconds is not None else ""
        say(f"[{n}/{len(todo)}] {job.id}: {st.status}{took}" + (f": {st.reason}" if st.reason else ""))
    return [states[j.id] for j in jobs]
