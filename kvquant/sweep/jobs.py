"""A sweep's jobs (one kvquant command line each) and the layout of its results folder.

Layout of a results folder::

    RESULTS/
      <block>/<job name>/...        a job's outputs (``<block>/`` alone for a block without axes)
      logs/<block>/<job name>.out   the job's stdout and stderr (``.err``), every attempt appended
      .sweep/jobs.json              the jobs of the last run of the grid (what ``kvquant sweep status`` lists)
      .sweep/grid.<ext>             a copy of that grid file
      .sweep/state/<job id>.json    each job's state (written atomically)
      .sweep/slurm/                 submitit's folder (sbatch scripts, pickles, Slurm logs)

A job writes into ``<block>/.<job name>.partial/`` and the folder is renamed to its final name only when the
command exited 0 and every declared output exists, so a killed job never leaves a half-written result where
``kvquant report`` reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvquant.files import write_json_atomic

JOBS_SCHEMA = "kvquant.sweep.jobs/v1"


@dataclass
class Job:
    """One configuration of a grid: a kvquant command line, its outputs and its dependencies.

    Attributes:
        id: ``<block>/<name>`` (or ``<block>`` for a block without axes); unique in the grid.
        block: the block it comes from.
        command: the kvquant command (``["eval", "ppl"]``).
        args: the arguments, references replaced by paths; the outputs' flags are added by :meth:`argv`.
        outputs: flag -> path inside the job's folder (a trailing ``/``: a folder).
        deps: ids of the jobs that must complete first.
        axes: the grid values that tell this job apart (its own, then those of the jobs it depends on).
        timeout_min: time limit in minutes (None: none locally, submitit's default on Slurm).
        slurm: Slurm settings (the grid's, then the block's).
        env: extra environment variables.
    """

    id: str
    block: str
    command: list[str]
    args: list[str]
    outputs: dict[str, str] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    axes: dict[str, str] = field(default_factory=dict)
    timeout_min: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, job_dir: Path) -> list[str]:
        """The kvquant arguments with the outputs placed in ``job_dir``."""
        out = [*self.command, *self.args]
        for flag, rel in self.outputs.items():
            path = job_dir / rel
            out += [f"--{flag}", str(path) + ("/" if rel.endswith("/") else "")]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class SweepDir:
    """Paths inside one grid's results folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.meta = self.root / ".sweep"

    @property
    def jobs_file(self) -> Path:
        """The jobs of the last run (``.sweep/jobs.json``)."""
        return self.meta / "jobs.json"

    @property
    def slurm_folder(self) -> Path:
        """submitit's folder."""
        return self.meta / "slurm"

    def job_dir(self, job: Job | str) -> Path:
        """Where a completed job's outputs are."""
        return self.root / _id(job)

    def staging_dir(self, job: Job | str) -> Path:
        """Where a running job writes (renamed to :meth:`job_dir` on success)."""
        final = self.job_dir(job)
        return final.parent / f".{final.name}.partial"

    def log_paths(self, job: Job | str) -> tuple[Path, Path]:
        """The job's stdout and stderr logs."""
        base = self.root / "logs" / _id(job)
        return base.with_name(base.name + ".out"), base.with_name(base.name + ".err")

    def state_path(self, job: Job | str) -> Path:
        """The job's state file."""
        base = self.meta / "state" / _id(job)
        return base.with_name(base.name + ".json")

    def write_jobs(self, grid_name: str, jobs: list[Job]) -> None:
        """Record the expanded jobs (atomically)."""
        write_json_atomic(self.jobs_file, {"schema": JOBS_SCHEMA, "grid": grid_name,
                                           "jobs": [j.to_dict() for j in jobs]})

    def read_jobs(self) -> tuple[str, list[Job]]:
        """The grid name and jobs recorded by the last run.

        Raises:
            FileNotFoundError: no sweep has run in this folder.
        """
        if not self.jobs_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a sweep's results folder (no {self.jobs_file.name} in "
                                    f"{self.meta})")
        doc = json.loads(self.jobs_file.read_text(encoding="utf-8"))
        return str(doc.get("grid")), [Job.from_dict(d) for d in doc.get("jobs", [])]


def _id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job
