"""The local executor end to end on the tiny real model: calibrate -> eval ppl -> report, a job stopped by its time
limit, another killed with SIGKILL, and resuming (completed jobs are not run again; failed ones only on request)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kvquant.sweep import SweepDir, expand, load_grid, read_state, run_job
from tests.sweep.cli import run_sweep

#: A job that runs for minutes (every window of WikiText-2 through the tiny model): it is always stopped first.
SLOW_ARGS = ("      model: stories260k\n      data: wikitext2-raw\n      ctx: 256\n"
             "      datatypes: fp16,nuq4,nuq3,nuq2\n      no-progress: true\n")


def _grid(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(f"""
name: e2e
results: {tmp_path / 'res'}
jobs:
  calibrate:
    command: calibrate
    args:
      model: stories260k
      data: tinystories
      n-seqs: 2
      seq-len: 64
      batch-size: 2
      no-progress: true
    outputs:
      out: cal.safetensors
  ppl:
    command: eval ppl
    args:
      model: stories260k
      data: tinystories
      calibration: ${{calibrate.out}}
      ctx: 64
      chunk: 16
      max-windows: 1
      datatypes: fp16,nuq3
      no-progress: true
    outputs:
      out: ppl.json
  slow:
    command: eval ppl
    timeout_min: 0.05
    args:
{SLOW_ARGS}    outputs:
      out: ppl.json
  after-slow:
    command: eval ppl
    after: [slow]
    args:
      model: stories260k
      datatypes: fp16
    outputs:
      out: ppl.json
""")
    return path


_sweep = run_sweep


def test_local_sweep_runs_resumes_and_retries(shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    grid = _grid(tmp_path)
    sweep = SweepDir(tmp_path / "res")
    assert _sweep([str(grid)]) == 1  # a job failed
    out = capsys.readouterr()
    assert "[1/4] calibrate: completed" in out.err and "[3/4] slow: failed" in out.err
    assert "[4/4] after-slow: blocked, waits for slow (failed)" in out.err
    cal, ppl, slow, after = (read_state(sweep, j) for j in ("calibrate", "ppl", "slow", "after-slow"))
    assert (cal.status, ppl.status, cal.attempts, ppl.attempts) == ("completed", "completed", 1, 1)
    assert slow.status == "failed" and slow.failure == "timeout" and "0.05 min" in slow.reason
    assert slow.exit_code is None and slow.signal in ("SIGTERM", "SIGKILL")
    assert after.status == "blocked" and after.attempts == 0
    # results: the finished jobs' files where they belong, the stopped job's only in its hidden staging folder
    doc = json.loads((tmp_path / "res/ppl/ppl.json").read_text())
    assert doc["meta"]["calibration"] == str(tmp_path / "res/calibrate/cal.safetensors")
    assert {r["datatype"] for r in doc["results"]} == {"fp16", "nuq3"}
    assert not (tmp_path / "res/slow").exists() and (tmp_path / "res/.slow.partial").is_dir()
    assert "attempt 1 of slow" in (tmp_path / "res/logs/slow.out").read_text()
    # the status table says the same
    assert _sweep(["status", str(tmp_path / "res")]) == 0
    table = capsys.readouterr().out
    assert "slow" in table and "timeout: stopped after 0.05 min" in table
    assert "2 completed, 1 failed, 1 blocked" in table

    # resume: nothing completed runs again, the failed job stays failed without --retry-failed
    cal_mtime = (tmp_path / "res/calibrate/cal.safetensors").stat().st_mtime_ns
    assert _sweep([str(grid)]) == 1
    err = capsys.readouterr().err
    assert "calibrate:" not in err.replace("waits for", "") and "1 to run" not in err
    assert read_state(sweep, "calibrate").attempts == 1 and read_state(sweep, "ppl").attempts == 1
    assert (tmp_path / "res/calibrate/cal.safetensors").stat().st_mtime_ns == cal_mtime
    assert read_state(sweep, "slow").attempts == 1

    # --retry-failed runs it again (and it is stopped again)
    assert _sweep([str(grid), "--retry-failed"]) == 1
    capsys.readouterr()
    slow = read_state(sweep, "slow")
    assert slow.attempts == 2 and slow.failure == "timeout" and len(slow.history) == 2
    assert (tmp_path / "res/logs/slow.out").read_text().count("attempt") == 2

    # a changed command line makes a completed job stale: it runs again
    grid.write_text(grid.read_text().replace("datatypes: fp16,nuq3", "datatypes: fp16,nuq2"))
    from kvquant.cli.main import check_command
    from kvquant.sweep.plan import plan

    decisions = {d.job.id: d for d in plan(sweep, expand(load_grid(grid, check_command=check_command)))}
    assert decisions["ppl"].action == "run" and "command line changed" in decisions["ppl"].note
    assert decisions["calibrate"].action == "done"

    # kvquant report merges the folder: the perplexity table, the Pareto front, the sweep's failed jobs
    from kvquant.cli.main import main

    main(["report", str(tmp_path / "res")])
    report = (tmp_path / "res/report.md").read_text()
    assert "### stories260k (`ppl/ppl.json`" in report and "Pareto-optimal (bits/element vs ΔPPL)" in report
    assert "| `slow` | failed | 2 | timeout: stopped after 0.05 min" in report
    assert "| `after-slow` | blocked |" in report
    assert ".partial" not in report


def test_a_killed_job_is_recorded_with_its_signal(shared_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    grid = _grid(tmp_path)
    (job,) = [j for j in expand(load_grid(grid)) if j.id == "slow"]
    job.timeout_min = None
    sweep = SweepDir(tmp_path / "res")
    killed: list[int] = []

    def kill_when_running() -> None:  # once the command is loading the model
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = read_state(sweep, job)
            if st.status == "running" and st.pid and "loading model" in Path(st.log_err).read_text():
                os.kill(st.pid, signal.SIGKILL)
                killed.append(st.pid)
                return
            time.sleep(0.05)

    t = threading.Thread(target=kill_when_running)
    t.start()
    state = run_job(job, sweep)
    t.join()
    assert killed == [state.pid]
    assert (state.status, state.failure, state.signal, state.exit_code) == ("failed", "signal", "SIGKILL", None)
    assert state.reason.startswith("killed by SIGKILL")
    assert read_state(sweep, job).status == "failed" and not sweep.job_dir(job).exists()
