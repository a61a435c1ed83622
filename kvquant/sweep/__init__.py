"""``kvquant sweep``: grids of kvquant commands, run locally or as Slurm job arrays (submitit), resumable, with one
results folder per grid that ``kvquant report`` merges.

Grid file (YAML, or the same structure in TOML)::

    name: tiny                    # optional: the grid's name (default: the file's stem)
    results: results/sweep_tiny   # optional: its results folder (default: results/<name>), relative to the
                                  #   current directory
    timeout_min: 30               # optional: per-job time limit (local: the job is stopped; Slurm: --time)
    env: {HF_HOME: /scratch/hf}   # optional: environment variables for every job
    slurm:                        # optional: settings of the Slurm executor (submitit's names)
      partition: gpu
      account: my-account
      gpus_per_node: 1
      cpus_per_task: 8
      mem_gb: 64
      array_parallelism: 16       # array tasks running at once
      setup: ["source ~/venvs/kvquant/bin/activate"]
    jobs:
      calibrate:                  # a block: one kvquant command over the product of its list-valued args
        command: calibrate        # calibrate | eval ppl | bench generate | bench capacity | bench kernels ...
        args:                     # flags without the dashes; true = bare flag, false/null = left out
          model: stories260k
          data: tinystories
          n-seqs: 2
          seed: [0, 1]            # a list is an axis: one job per value (product over all lists)
          no-progress: true
        outputs:                  # flag -> file (or folder/) inside the job's folder; must exist at the end
          out: cal.safetensors
      ppl:
        command: eval ppl
        args:
          model: stories260k
          calibration: ${calibrate.out}   # the file a calibrate job writes: a dependency
          ctx: [64, 128]
          datatypes: fp16,nuq4,nuq3
        outputs: {out: ppl.json}
        timeout_min: 60           # per block: timeout_min, slurm (on top of the grid's), env, and
        # match: [model]          #   which arguments pair a ppl job with calibrate jobs (default: the
        #                         #   calibrate axes that ppl also sets); after: [block] (wait for all the
        #                         #   paired jobs of a block); name: "{seed}-{ctx}" (job name template);
        #                         #   extra: [raw, args] (positional arguments; "${results}": the folder)

Jobs: a block gives one job per combination of its list values; a block referencing another block
(``${block.output}``) gives one job per combination and per paired job of that block, runs after it, and
takes its axes into the job's name (above: ``ppl/ctx=64,seed=0`` ... four jobs after ``calibrate/seed=0`` and
``calibrate/seed=1``). A job's outputs go to ``RESULTS/<block>/<name>/`` (see :mod:`kvquant.sweep.jobs` for the
whole layout), its logs to ``RESULTS/logs/``, its state to ``RESULTS/.sweep/state/``.

Modules: :mod:`~kvquant.sweep.grid` (reading and validating the file), :mod:`~kvquant.sweep.expand` (jobs from
a grid), :mod:`~kvquant.sweep.jobs` (a job, the folder layout), :mod:`~kvquant.sweep.state` (state files),
:mod:`~kvquant.sweep.plan` (what a run does with each job), :mod:`~kvquant.sweep.runner` (running one job),
:mod:`~kvquant.sweep.local` and :mod:`~kvquant.sweep.slurm` (the executors), :mod:`~kvquant.sweep.cli`.
"""

from kvquant.sweep.expand import expand
from kvquant.sweep.grid import Block, Grid, GridError, load_grid, parse_grid
from kvquant.sweep.jobs import Job, SweepDir
from kvquant.sweep.local import run_local
from kvquant.sweep.plan import Decision, plan
from kvquant.sweep.runner import run_job
from kvquant.sweep.state import JobState, format_status, read_state, status_rows

__all__ = ["Block", "Decision", "Grid", "GridError", "Job", "JobState", "SweepDir", "expand", "format_status",
           "load_grid", "parse_grid", "plan", "read_state", "run_job", "run_local", "status_rows"]
