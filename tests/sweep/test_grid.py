"""Grid files: parsing, validation (one-line errors) and expansion into jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvquant.sweep import GridError, expand, load_grid, parse_grid
from kvquant.sweep.slurm import known_settings

GRID = """
name: g
results: @RESULTS@
timeout_min: 5
slurm: {partition: gpu, gpus_per_node: 1}
jobs:
  calibrate:
    command: calibrate
    args:
      model: [m1, m2]
      seed: [0, 1]
      no-progress: true
      pre-rope: false
    outputs: {out: cal.safetensors}
  ppl:
    command: eval ppl
    args:
      model: [m1, m2]
      calibration: ${calibrate.out}
      ctx: [64, 128]
    outputs: {out: ppl.json}
    slurm: {mem_gb: 8}
    timeout_min: 2
"""


def _grid(tmp_path: Path, text: str = GRID, suffix: str = ".yaml"):
    path = tmp_path / f"grid{suffix}"
    path.write_text(text.replace("@RESULTS@", str(tmp_path / "res")))
    return load_grid(path)


def test_cartesian_product_names_and_pairing(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    jobs = expand(grid)
    ids = [j.id for j in jobs]
    assert ids[:4] == ["calibrate/model=m1,seed=0", "calibrate/model=m1,seed=1", "calibrate/model=m2,seed=0",
                       "calibrate/model=m2,seed=1"]
    # ppl pairs each model with the calibrations of the same model (model is an axis of both), takes their seed
    ppl = {j.id: j for j in jobs[4:]}
    assert len(ppl) == 2 * 2 * 2 and "ppl/model=m2,ctx=128,seed=1" in ppl
    j = ppl["ppl/model=m2,ctx=128,seed=1"]
    assert j.deps == ["calibrate/model=m2,seed=1"]
    cal = str(tmp_path / "res" / "calibrate" / "model=m2,seed=1" / "cal.safetensors")
    argv = j.argv(tmp_path / "x")
    assert argv[:2] == ["eval", "ppl"]
    assert argv[argv.index("--calibration") + 1] == cal and argv[argv.index("--ctx") + 1] == "128"
    assert argv[-2:] == ["--out", str(tmp_path / "x" / "ppl.json")]
    c = jobs[0].argv(tmp_path / "c")
    assert "--no-progress" in c and "--pre-rope" not in c and "--no-pre-rope" not in c
    # settings: grid-level under block-level
    assert j.timeout_min == 2 and jobs[0].timeout_min == 5
    assert j.slurm == {"partition": "gpu", "gpus_per_node": 1, "mem_gb": 8}


def test_toml_grid_is_the_same_grid(tmp_path: Path) -> None:
    toml = f"""
name = "g"
results = "{tmp_path / 'res'}"
[jobs.calibrate]
command = "calibrate"
outputs = {{ out = "cal.safetensors" }}
[jobs.calibrate.args]
model = ["m1", "m2"]
[jobs.ppl]
command = "eval ppl"
outputs = {{ out = "ppl.json" }}
[jobs.ppl.args]
calibration = "${{calibrate.out}}"
"""
    jobs = expand(_grid(tmp_path, toml, ".toml"))
    # ppl sets no calibrate axis: it runs with every calibration
    assert [j.id for j in jobs] == ["calibrate/model=m1", "calibrate/model=m2", "ppl/model=m1", "ppl/model=m2"]


def test_match_and_name_template(tmp_path: Path) -> None:
    text = GRID.replace("    timeout_min: 2\n",
                        "    timeout_min: 2\n    match: [model]\n    name: \"{model}-{ctx}-s{seed}\"\n")
    jobs = expand(_grid(tmp_path, text))
    assert "ppl/m1-64-s0" in [j.id for j in jobs]
    # match: [] pairs every ppl configuration with every calibration; a calibrate axis whose value differs from
    # the ppl job's own is named after its block
    text = GRID.replace("    timeout_min: 2\n", "    match: []\n")
    ppl = [j.id for j in expand(_grid(tmp_path, text)) if j.block == "ppl"]
    assert len(ppl) == 16 and "ppl/model=m1,ctx=64,calibrate.model=m2,seed=1" in ppl
    # a template that does not tell the jobs apart is an error naming both
    text = GRID.replace("    timeout_min: 2\n", "    name: \"{model}\"\n")
    with pytest.raises(GridError, match="two jobs are both named 'ppl/m1'"):
        expand(_grid(tmp_path, text))


@pytest.mark.parametrize("text, message", [
    ("jobs: [1, 2", "not valid YAML"),
    ("name: g\n", "`jobs:` is missing"),
    ("jobz: {}\n", "unknown top-level key"),
    ("jobs:\n  a:\n    command: calibrat\n", "unknown command 'calibrat'"),
    ("jobs:\n  a:\n    command: bench generat\n", "unknown benchmark"),
    ("jobs:\n  a:\n    command: calibrate\n    args:\n      data: ${nope.out}\n", "names no job block"),
    ("jobs:\n  a:\n    command: calibrate\n  b:\n    command: eval ppl\n    args:\n      calibration: ${a.cal}\n",
     "block 'a' has no output 'cal'"),
    ("jobs:\n  a:\n    command: calibrate\n    args: {seed: []}\n", "empty list"),
    ("jobs:\n  a:\n    command: calibrate\n    args: {seed: {x: 1}}\n", "not a mapping"),
    ("jobs:\n  a:\n    command: calibrate\n    outputs: {out: ../x}\n", "inside the job's folder"),
    ("jobs:\n  a:\n    command: calibrate\n    after: [b]\n  b:\n    command: calibrate\n    after: [a]\n", "cycle"),
    ("jobs:\n  a:\n    command: calibrate\n    slurm: {partion: gpu}\n", "unknown slurm setting 'partion'"),
    ("jobs:\n  a:\n    command: calibrate\n    slurm: {time: 5}\n", "use timeout_min"),
    ("jobs:\n  a:\n    command: calibrate\n    timeout_min: -1\n", "positive number"),
    ("jobs:\n  a:\n    command: calibrate\n    colour: red\n", "unknown key(s) colour"),
])
def test_grid_mistakes_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    from kvquant.cli.main import check_command

    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(GridError) as exc:
        load_grid(path, check_command=check_command, slurm_known=known_settings())
    assert message in str(exc.value) and "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_unmatched_reference_is_an_error(tmp_path: Path) -> None:
    text = GRID.replace("      model: [m1, m2]\n      calibration", "      model: [m1, m3]\n      calibration")
    with pytest.raises(GridError, match="no job of block 'calibrate' has model=m3"):
        expand(_grid(tmp_path, text))


def test_missing_grid_file_and_wrong_extension(tmp_path: Path) -> None:
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "none.yaml")
    (tmp_path / "g.json").write_text("{}")
    with pytest.raises(GridError, match=r"\.yaml, \.yml or \.toml"):
        load_grid(tmp_path / "g.json")


def test_examples_expand(tmp_path: Path) -> None:
    from kvquant.cli.main import check_argv, check_command
    from kvquant.sweep.jobs import SweepDir

    root = Path(__file__).resolve().parents[2] / "examples"
    for name, n in (("sweep_tiny.yaml", 5), ("sweep_a100.yaml", 20)):
        grid = load_grid(root / name, check_command=check_command, slurm_known=known_settings())
        jobs = expand(grid, tmp_path / name)
        assert n is None or len(jobs) == n
        for j in jobs:
            assert check_argv(j.argv(SweepDir(tmp_path).job_dir(j))) is None, j.id


def test_parse_grid_defaults(tmp_path: Path) -> None:
    grid = parse_grid({"jobs": {"k": {"command": "bench kernels", "outputs": {"out": "kernels.json"}}}},
                      tmp_path / "mygrid.yaml")
    assert grid.name == "mygrid" and grid.results == Path("results/mygrid")
    (job,) = expand(grid, tmp_path)
    assert job.id == "k" and job.argv(tmp_path / "k") == ["bench", "kernels", "--out", str(tmp_path / "k/kernels.json")]


def test_after_waits_for_every_paired_job_and_results_reference(tmp_path: Path) -> None:
    text = GRID + """  report:
    command: report
    after: [ppl]
    extra: ["${results}"]
    outputs: {out: report.md}
  per-model:
    command: report
    after: [ppl]
    args: {model: [m1, m2]}
    extra: ["${results}"]
"""
    jobs = expand(_grid(tmp_path, text))
    (report,) = [j for j in jobs if j.block == "report"]
    assert report.id == "report" and len(report.deps) == 8 and all(d.startswith("ppl/") for d in report.deps)
    assert report.argv(tmp_path / "r")[:2] == ["report", str(tmp_path / "res")]
    per_model = [j for j in jobs if j.block == "per-model"]
    assert [len(j.deps) for j in per_model] == [4, 4]  # paired on model, the axis both blocks have
    assert all("model=m2" in d for d in per_model[1].deps)


def test_reserved_block_names(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("jobs:\n  logs:\n    command: bench kernels\n")
    with pytest.raises(GridError, match="'logs' is a folder of the results folder"):
        load_grid(tmp_path / "g.yaml")
