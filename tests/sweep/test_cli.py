"""``kvquant sweep`` on the command line: user mistakes are one line and exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sweep.cli import run_sweep

_run = run_sweep


@pytest.mark.parametrize("text, message", [
    ("jobs:\n  a:\n    command: evaluate ppl\n", "jobs.a: unknown command 'evaluate ppl'"),
    ("jobs:\n  b:\n    command: eval ppl\n    args:\n      calibration: ${cal.out}\n",
     "jobs.b: ${cal.out} names no job block (blocks: b)"),
    ("jobs:\n  a:\n    command: calibrate\n    args: {n-seqz: 2}\n    outputs: {out: c.safetensors}\n",
     "jobs.a: job a: unrecognized arguments: --n-seqz 2"),
    ("jobs:\n  a:\n    command: calibrate\n", "job a: the following arguments are required: --out"),
    ("jobs:\n  a:\n    command: eval ppl\n    args: {outlier-fraction: 0.7}\n", "outlier_fraction must be in"),
    ("jobs: {a: [1, 2}\n", "not valid YAML"),
])
def test_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, text: str, message: str) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(f"results: {tmp_path / 'res'}\n" + text)
    assert _run([str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvquant sweep: error: ") and message in err and "\n" not in err, err


def test_status_of_a_folder_without_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _run(["status", str(tmp_path)]) == 2
    assert "is not a sweep's results folder" in capsys.readouterr().err
    assert _run(["status"]) == 2


def test_a_folder_holds_one_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kvquant.sweep import SweepDir

    SweepDir(tmp_path).write_jobs("other", [])
    grid = tmp_path / "g.yaml"
    grid.write_text(f"results: {tmp_path}\njobs:\n  k:\n    command: bench kernels\n")
    assert _run([str(grid)]) == 2
    assert "holds the sweep of grid 'other', not 'g'" in capsys.readouterr().err


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("jobs:\n  a:\n    command: calibrate\n    after: [nothing]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "kvquant", "sweep", str(grid)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kvquant sweep: error: {grid}: jobs.a: `after: nothing` names no other job block"
