"""Read and validate a grid file (YAML or TOML) into a :class:`Grid`; every problem is a one-line
:class:`GridError` naming the file and the place.

The schema is described in :mod:`kvquant.sweep` (and ``docs/sweep.md``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``${block.output}``: the file a job of another block writes (a dependency); ``${results}``: the results folder.
REF_RE = re.compile(r"\$\{([^}]*)\}")
#: The reference to the grid's results folder.
RESULTS_REF = "results"
#: Names a block cannot have (folders of the results folder that are not jobs).
RESERVED_BLOCKS = {"logs", "figures"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"name", "results", "timeout_min", "slurm", "env", "jobs"}
_BLOCK_KEYS = {"command", "args", "outputs", "after", "match", "name", "timeout_min", "slurm", "env", "extra"}
#: Slurm settings the sweep sets itself.
_SLURM_RESERVED = {"dependency", "array", "job_name", "name", "time", "map_count", "folder", "command"}

Scalar = str | int | float | bool | None


class GridError(ValueError):
    """A mistake in a grid file (or a sweep's folder), as one line for the user."""


@dataclass(frozen=True)
class Block:
    """One entry of ``jobs:``: a kvquant command over the Cartesian product of its list-valued arguments.

    Attributes:
        name: the key under ``jobs:``; the first part of every job id of the block.
        command: the kvquant command, split (``("eval", "ppl")``).
        args: flag name (no leading dashes) -> scalar, or list of scalars (an axis of the grid).
        outputs: flag name -> path inside the job's folder (ending in ``/``: a folder) that the flag receives.
        after: blocks that must complete first, without using their files.
        match: arguments that pair this block's jobs with the jobs of the blocks it references or waits for
            (``None``: the other block's axes that this block also sets).
        name_template: the job name, ``{axis}`` replaced by the job's value (``None``: ``axis=value,...``).
        timeout_min: per-job time limit (local and Slurm), minutes.
        slurm: Slurm settings on top of the grid's.
        env: environment variables on top of the grid's.
        extra: raw arguments appended to the command line (positional arguments); references allowed.
    """

    name: str
    command: tuple[str, ...]
    args: dict[str, Scalar | list[Scalar]]
    outputs: dict[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    match: tuple[str, ...] | None = None
    name_template: str | None = None
    timeout_min: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    def references(self) -> list[tuple[str, str]]:
        """``(block, output)`` of every ``${block.output}`` in the arguments and ``extra``, in order, without
        repeats (``${results}`` is not a block's)."""
        found: list[tuple[str, str]] = []
        texts = [x for v in self.args.values() for x in (v if isinstance(v, list) else [v])] + list(self.extra)
        for s in texts:
            if isinstance(s, str):
                for m in REF_RE.finditer(s):
                    if m.group(1).strip() == RESULTS_REF:
                        continue
                    ref = split_ref(m.group(1))
                    if ref not in found:
                        found.append(ref)
        return found

    def depends_on(self) -> list[str]:
        """Blocks this block needs: those it references, then those of ``after``."""
        return list(dict.fromkeys([b for b, _ in self.references()] + list(self.after)))


@dataclass(frozen=True)
class Grid:
    """A parsed grid file.

    Attributes:
        name: the grid's name (``name:``, default the file's stem).
        source: the grid file.
        results: the results folder (``results:``, default ``results/<name>``; relative to the current directory).
        blocks: the blocks in file order.
        timeout_min: default per-job time limit, minutes (``None``: no limit on the local executor, submitit's
            default on Slurm).
        slurm: Slurm settings for every block.
        env: environment variables for every job.
    """

    name: str
    source: Path
    results: Path
    blocks: dict[str, Block]
    timeout_min: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def split_ref(text: str) -> tuple[str, str]:
    """``"calibrate.out"`` -> ``("calibrate", "out")`` (the inside of a ``${...}`` reference)."""
    block, dot, output = text.strip().partition(".")
    return block, output if dot else ""


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a ``.yaml``/``.yml``/``.toml`` grid file.

    Raises:
        GridError: missing file, unknown extension, syntax error, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise GridError(f"{path}: YAML grids need PyYAML (pip install 'kvquant[sweep]')") from exc
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise GridError(f"{path}:{where}: not valid YAML ({problem})") from exc
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError as exc:
                raise GridError(f"{path}: TOML grids need Python 3.11+ or the tomli package") from exc
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise GridError(f"{path}: not valid TOML ({exc})") from exc
    else:
        raise GridError(f"{path}: a grid file ends in .yaml, .yml or .toml")
    if not isinstance(doc, dict):
        raise GridError(f"{path}: a grid file is a mapping with a `jobs:` section")
    return doc


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _flag_name(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key.strip("-"):
        raise GridError(f"{where}: argument name {key!r} is not a flag name")
    return key.lstrip("-")


def _minutes(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise GridError(f"{where}: timeout_min must be a positive number of minutes, not {v!r}")
    return float(v)


def _env(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and _scalar(x) for k, x in v.items()):
        raise GridError(f"{where}: env is a mapping of variable names to values")
    return {k: "" if x is None else str(x) for k, x in v.items()}


def _slurm(v: Any, where: str, known: set[str] | None) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise GridError(f"{where}: slurm is a mapping of settings (partition, account, gpus_per_node, ...)")
    out = {}
    for k, x in v.items():
        key = str(k).removeprefix("slurm_")
        if key in _SLURM_RESERVED:
            hint = "use timeout_min" if key == "time" else "the sweep sets it"
            raise GridError(f"{where}: slurm setting {k!r} is not allowed ({hint})")
        if key == "timeout_min":
            raise GridError(f"{where}: put timeout_min beside `slurm:`, not in it (both executors use it)")
        if known is not None and key not in known:
            raise GridError(f"{where}: unknown slurm setting {k!r} (known: {', '.join(sorted(known))})")
        out[key] = x
    return out


def _names(v: Any, where: str, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise GridError(f"{where}: {what} is a list of names")
    return tuple(x.lstrip("-") for x in v)


def _block(name: str, raw: Any, where: str, check_command: Callable[[list[str]], str | None] | None,
           slurm_known: set[str] | None) -> Block:
    if not _NAME_RE.match(name) or "/" in name:
        raise GridError(f"{where}: job block name {name!r} must be letters, digits, '.', '_' or '-'")
    if name in RESERVED_BLOCKS:
        raise GridError(f"{where}: {name!r} is a folder of the results folder; give the block another name")
    if not isinstance(raw, dict):
        raise GridError(f"{where}: a job block is a mapping with `command:` and `args:`")
    unknown = sorted(set(raw) - _BLOCK_KEYS)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_BLOCK_KEYS))})")
    command = raw.get("command")
    if isinstance(command, str):
        command = command.split()
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise GridError(f"{where}: `command:` is a kvquant command, e.g. `calibrate` or `eval ppl`")
    if command[0] == "kvquant":
        command = command[1:]
    if check_command is not None:
        problem = check_command(list(command))
        if problem:
            raise GridError(f"{where}: {problem}")
    args_raw = raw.get("args") or {}
    if not isinstance(args_raw, dict):
        raise GridError(f"{where}: `args:` is a mapping of flag names to values (a list value is an axis)")
    args: dict[str, Scalar | list[Scalar]] = {}
    for k, v in args_raw.items():
        flag = _flag_name(k, where)
        if isinstance(v, list):
            if not v:
                raise GridError(f"{where}: argument {flag!r} is an empty list (an axis needs at least one value)")
            if not all(_scalar(x) for x in v):
                raise GridError(f"{where}: argument {flag!r}: an axis is a list of plain values")
            if any(isinstance(x, str) and REF_RE.search(x) for x in v):
                raise GridError(f"{where}: argument {flag!r}: a ${{...}} reference cannot be an axis value")
            if len({str(x) for x in v}) != len(v):
                raise GridError(f"{where}: argument {flag!r} lists a value twice")
        elif not _scalar(v):
            raise GridError(f"{where}: argument {flag!r} must be a value or a list of values, not a mapping")
        args[flag] = v
    outputs_raw = raw.get("outputs") or {}
    if not isinstance(outputs_raw, dict):
        raise GridError(f"{where}: `outputs:` is a mapping of flag names to file names, e.g. `out: ppl.json`")
    outputs: dict[str, str] = {}
    for k, v in outputs_raw.items():
        flag = _flag_name(k, where)
        if not isinstance(v, str) or not v.strip():
            raise GridError(f"{where}: output {flag!r} must be a file name (or a folder ending in /)")
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise GridError(f"{where}: output {flag!r}: {v!r} must be a path inside the job's folder")
        if flag in args:
            raise GridError(f"{where}: {flag!r} is both an argument and an output")
        outputs[flag] = v
    extra = raw.get("extra") or []
    if isinstance(extra, str):
        extra = extra.split()
    if not isinstance(extra, list) or not all(_scalar(x) and x is not None for x in extra):
        raise GridError(f"{where}: `extra:` is a list of raw arguments")
    template = raw.get("name")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise GridError(f"{where}: `name:` is a template such as \"{{model}}-{{seed}}\"")
    match = raw.get("match")
    block = Block(name=name, command=tuple(command), args=args, outputs=outputs,
                  after=_names(raw.get("after"), where, "`after:`"),
                  match=None if match is None else _names(match, where, "`match:`"),
                  name_template=template, timeout_min=_minutes(raw.get("timeout_min"), where),
                  slurm=_slurm(raw.get("slurm"), f"{where}: slurm", slurm_known), env=_env(raw.get("env"), where),
                  extra=tuple(str(x) for x in extra))
    texts = [v for v in args.values() if isinstance(v, str)] + list(block.extra)
    for m in (m for v in texts for m in REF_RE.finditer(v)):
        b, o = split_ref(m.group(1))
        if m.group(1).strip() != RESULTS_REF and (not b or not o):
            raise GridError(f"{where}: reference ${{{m.group(1)}}} must be ${{block.output}} or ${{results}}")
    return block


def parse_grid(doc: Mapping[str, Any], source: str | Path, *,
               check_command: Callable[[list[str]], str | None] | None = None,
               slurm_known: set[str] | None = None) -> Grid:
    """Validate the raw mapping of a grid file.

    Args:
        doc: the file's content (:func:`read_grid_file`).
        source: the file (for messages and the default name).
        check_command: returns a problem (one line) for an unknown kvquant command, or None.
        slurm_known: Slurm setting names to accept (None: any).

    Raises:
        GridError: the first problem found.
    """
    source = Path(source)
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise GridError(f"{source}: unknown top-level key(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(sorted(_TOP_KEYS))})")
    name = doc.get("name", source.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise GridError(f"{source}: `name:` {name!r} must be letters, digits, '.', '_' or '-'")
    results = doc.get("results", f"results/{name}")
    if not isinstance(results, str) or not results.strip():
        raise GridError(f"{source}: `results:` is a folder path")
    jobs = doc.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        raise GridError(f"{source}: `jobs:` is missing or empty (a mapping of job blocks)")
    blocks = {str(k): _block(str(k), v, f"{source}: jobs.{k}", check_command, slurm_known) for k, v in jobs.items()}
    for b in blocks.values():
        for ref, out in b.references():
            where = f"{source}: jobs.{b.name}"
            if ref not in blocks:
                raise GridError(f"{where}: ${{{ref}.{out}}} names no job block (blocks: {', '.join(blocks)})")
            if ref == b.name:
                raise GridError(f"{where}: ${{{ref}.{out}}} refers to its own block")
            if out not in blocks[ref].outputs:
                known = ", ".join(blocks[ref].outputs) or "none"
                raise GridError(f"{where}: ${{{ref}.{out}}}: block {ref!r} has no output {out!r} (outputs: {known})")
        for a in b.after:
            if a not in blocks or a == b.name:
                raise GridError(f"{source}: jobs.{b.name}: `after: {a}` names no other job block")
    _check_acyclic(blocks, source)
    return Grid(name=name, source=source, results=Path(results), blocks=blocks,
                timeout_min=_minutes(doc.get("timeout_min"), str(source)),
                slurm=_slurm(doc.get("slurm"), f"{source}: slurm", slurm_known), env=_env(doc.get("env"), str(source)))


def _check_acyclic(blocks: dict[str, Block], source: Path) -> None:
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise GridError(f"{source}: job blocks depend on each other in a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for d in blocks[name].depends_on():
            visit(d, [*path, name])
        state[name] = 2

    for n in blocks:
        visit(n, [])


def block_order(grid: Grid) -> list[str]:
    """Block names so that every block comes after those it depends on (file order otherwise)."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for d in grid.blocks[name].depends_on():
            visit(d)
        done.append(name)

    for n in grid.blocks:
        visit(n)
    return done


def load_grid(path: str | Path, **kwargs: Any) -> Grid:
    """:func:`read_grid_file` then :func:`parse_grid` (keyword arguments go to it)."""
    return parse_grid(read_grid_file(path), path, **kwargs)
