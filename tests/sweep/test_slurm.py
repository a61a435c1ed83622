"""The Slurm executor up to sbatch: fake ``sbatch``/``srun``/``sacct`` on PATH record what submitit submits (array
size, resources, dependencies); a recorded array task is then run the way a compute node runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvquant.sweep import SweepDir, read_state
from kvquant.sweep.slurm import recorded_sbatch_calls, write_fake_slurm
from tests.sweep.cli import run_sweep

pytest.importorskip("submitit")

GRID = """
name: slurm-test
results: {results}
timeout_min: 20
slurm:
  partition: a100
  account: proj42
  gpus_per_node: 1
  cpus_per_task: 4
  mem_gb: 32
  array_parallelism: 2
  setup: ["source /opt/venv/bin/activate", "export HF_HOME=/scratch/hf"]
jobs:
  calibrate:
    command: calibrate
    args:
      model: stories260k
      data: tinystories
      n-seqs: 2
      seq-len: 32
      batch-size: 2
      seed: [0, 1, 2]
      no-progress: true
    outputs:
      out: cal.safetensors
  ppl:
    command: eval ppl
    timeout_min: 90
    slurm:
      mem_gb: 16
    args:
      model: stories260k
      calibration: ${{calibrate.out}}
      ctx: [64, 128]
    outputs:
      out: ppl.json
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import submitit

    record = tmp_path / "slurm-record"
    bin_dir = write_fake_slurm(record / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KVQUANT_FAKE_SLURM_DIR", str(record))
    submitit.SlurmJob.watcher.clear()  # sacct answers are cached per process
    yield record
    submitit.SlurmJob.watcher.clear()


_sweep = run_sweep


def _sbatch_lines(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def _sacct(record: Path, states: dict[str, str]) -> None:
    (record / "sacct.txt").write_text("JobID|State|NodeList\n" + "".join(f"{k}|{v}|node1\n" for k, v in states.items()))


def test_submission_arrays_resources_and_dependencies(tmp_path: Path, fake_slurm: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(results=tmp_path / "res"))
    assert _sweep([str(grid), "--executor", "slurm"]) == 0
    calls = recorded_sbatch_calls(fake_slurm)
    # calibrate: one array of 3; ppl: one array of 2 per calibration it continues, each after that calibration
    assert len(calls) == 4
    for c in calls:
        assert len(c["argv"]) == 1 and c["argv"][0].endswith(".sh")  # `sbatch SCRIPT`
    cal = _sbatch_lines(calls[0]["script"])
    assert cal["array"] == "0-2%2" and cal["partition"] == "a100" and cal["account"] == "proj42"
    assert cal["gpus-per-node"] == "1" and cal["cpus-per-task"] == "4" and cal["mem"] == "32GB"
    assert cal["time"] == "20" and cal["job-name"] == "kvquant-slurm-test-calibrate" and "dependency" not in cal
    assert str(tmp_path / "res" / ".sweep" / "slurm") in cal["output"]
    assert "source /opt/venv/bin/activate\nexport HF_HOME=/scratch/hf" in calls[0]["script"]
    for i, c in enumerate(calls[1:]):
        ppl = _sbatch_lines(c["script"])
        assert ppl["array"] == "0-1%2" and ppl["time"] == "90" and ppl["mem"] == "16GB"
        assert ppl["dependency"] == f"afterok:1000_{i}" and ppl["kill-on-invalid-dep"] == "yes"
    sweep = SweepDir(tmp_path / "res")
    st = read_state(sweep, "ppl/ctx=128,seed=2")
    assert (st.status, st.slurm_job_id, st.executor) == ("queued", "1003_1", "slurm")
    assert "waits for calibrate/seed=2" in st.reason
    capsys.readouterr()

    # sacct: seed=0 ran (its task recorded completed), seed=1's node failed, seed=2 timed out; the ppl jobs after
    # seed=1 were cancelled by Slurm (their dependency can never be met), the others wait
    s0 = read_state(sweep, "calibrate/seed=0")
    s0.attempts = 1
    (sweep.job_dir("calibrate/seed=0")).mkdir(parents=True)
    (sweep.job_dir("calibrate/seed=0") / "cal.safetensors").write_text("x")
    from kvquant.sweep.state import write_state

    write_state(sweep, s0.finish("completed"))
    _sacct(fake_slurm, {"1000_0": "COMPLETED", "1000_1": "NODE_FAIL", "1000_2": "TIMEOUT", "1001_0": "RUNNING",
                        "1001_1": "PENDING", "1002_0": "CANCELLED by 0", "1002_1": "CANCELLED by 0",
                        "1003_0": "PENDING", "1003_1": "PENDING"})
    assert _sweep(["status", str(tmp_path / "res")]) == 0
    table = capsys.readouterr().out
    assert "node failure (sacct NODE_FAIL) [1000_1]" in table and "timeout: Slurm's time limit" in table
    assert read_state(sweep, "ppl/ctx=64,seed=1").status == "blocked"
    assert read_state(sweep, "calibrate/seed=2").failure == "timeout"
    assert read_state(sweep, "ppl/ctx=64,seed=0").status == "queued"

    # a re-run submits nothing new without --retry-failed (queued jobs are not submitted twice)
    assert _sweep([str(grid), "--executor", "slurm"]) == 0
    assert len(recorded_sbatch_calls(fake_slurm)) == 4
    # --retry-failed: the two failed calibrations in one array, the ppl jobs after them; seed=2's ppl array
    # is still pending in Slurm (it waits for the timed-out job): it is left alone
    assert _sweep([str(grid), "--executor", "slurm", "--retry-failed"]) == 0
    calls = recorded_sbatch_calls(fake_slurm)[4:]
    assert [_sbatch_lines(c["script"])["array"] for c in calls] == ["0-1%2", "0-1%2"]
    assert _sbatch_lines(calls[1]["script"])["dependency"] == "afterok:1004_0"
    assert read_state(sweep, "calibrate/seed=1").slurm_job_id == "1004_0"
    assert read_state(sweep, "ppl/ctx=128,seed=1").slurm_job_id == "1005_1"


def test_dry_run_prints_jobs_and_scripts_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(results=tmp_path / "res"))
    assert _sweep([str(grid), "--executor", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "calibrate/seed=0  [run: not run yet]" in out
    assert "kvquant eval ppl --model stories260k --calibration " + str(tmp_path / "res/calibrate/seed=1") in out
    assert "after: calibrate/seed=1" in out
    assert out.count("#!/bin/bash") == 4 and "#SBATCH --array=0-2%2" in out
    assert "#SBATCH --dependency=afterok:1000_2" in out
    assert f"#SBATCH --output={tmp_path / 'res/.sweep/slurm'}/%A_%a_0_log.out" in out  # the real folder
    assert not (tmp_path / "res").exists()  # nothing written
    assert os.environ.get("KVQUANT_FAKE_SLURM_DIR") is None


def test_without_slurm_submission_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(results=tmp_path / "res"))
    assert _sweep([str(grid), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvquant sweep: error: cannot submit to Slurm here: sbatch and srun not found on PATH")
    assert "\n" not in err and not (tmp_path / "res").exists()


def test_an_array_task_runs_its_job_as_on_a_compute_node(shared_dir: Path, tmp_path: Path, fake_slurm: Path) -> None:
    """The pickled task of array job 1000, index 1, run by submitit's own entry point (what srun starts on the
    node): the calibration runs and its state is recorded, with the Slurm job id."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(results=tmp_path / "res"))
    assert _sweep([str(grid), "--executor", "slurm"]) == 0
    sweep = SweepDir(tmp_path / "res")
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1000_1", "KVQUANT_SHARED": str(shared_dir),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", str(sweep.slurm_folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    st = read_state(sweep, "calibrate/seed=1")
    assert (st.status, st.executor, st.slurm_job_id, st.attempts) == ("completed", "slurm", "1000_1", 1)
    meta = json.loads((sweep.job_dir("calibrate/seed=1") / "cal.safetensors.json").read_text())
    assert meta["model_id"].split("@")[0] == "stories260k"  # NAME@weights:FINGERPRINT
    assert read_state(sweep, "calibrate/seed=0").status == "queued"  # only index 1 ran


def test_preempted_task_is_requeued_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit calls checkpoint() on Slurm's pre-emption signal, requeues and exits: the job is recorded queued
    again (not failed), with its attempt counted."""
    from kvquant.sweep import Job
    from kvquant.sweep import slurm as slurm_mod
    from kvquant.sweep.state import JobState, write_state

    job = Job("calibrate", "calibrate", ["calibrate"], [], {"out": "cal.safetensors"})
    sweep = SweepDir(tmp_path)
    task = slurm_mod.SlurmTask(job, str(tmp_path))

    def preempted(job, sweep, **kwargs):
        write_state(sweep, JobState(job.id, attempts=1).finish("failed", failure="interrupted", reason="x"))
        delayed = task.checkpoint()  # what submitit's signal handler does
        assert delayed.function is task
        raise SystemExit(-1)

    monkeypatch.setattr(slurm_mod, "run_job", preempted)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(SystemExit):
        task()
    st = read_state(sweep, job)
    assert st.status == "queued" and "preempted during attempt 1; requeued" in st.reason
