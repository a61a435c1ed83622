"""The command-line flags every ``kvquant`` command shares.

* :func:`add_quant_config_args` / :func:`quant_config_from_args`: one flag per :class:`~kvquant.config.QuantConfig`
  field (``--outlier-fraction``, ``--n-sink``, ``--residual-length``, ``--pre-rope/--post-rope``, ``--page-size``,
  ``--block-nnz``, ``--backend``, ``--min-range-tokens``, ``--rotation``, ``--rotation-seed``), derived from the
  dataclass fields, with the help text of the field's docs and its default. The datatype is each command's own
  flag (``--datatype`` or ``--datatypes``).
* :func:`add_device_arg` / :func:`resolve_device`: ``--device``.
* :func:`add_model_args`: ``--model``, ``--device``, ``--dtype``, ``--seed`` of the benchmarks.
* :func:`parse_size`, :func:`parse_size_list`, :func:`parse_datatypes`: sizes (``4K``, ``1K..32K``) and datatype lists.
* :class:`ArgumentParser` / :class:`HelpFormatter`: the parser of every command, with one-line usage errors and the
  defaults shown in ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch

from kvquant.config import BACKENDS, ROTATIONS, QuantConfig
from kvquant.datatypes import DATATYPE_HELP, parse_datatype

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")

#: Fields of :class:`QuantConfig` that are not a flag of :func:`add_quant_config_args` (each command names its
#: datatype(s) itself).
NOT_FLAGS = ("datatype",)

#: Extra names a field's flag also answers to (kept for scripts written against earlier commands).
FLAG_ALIASES: dict[str, tuple[str, ...]] = {}


# ----------------------------------------------------------------------------------------------------
# QuantConfig fields


def field_docs(cls: type = QuantConfig) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of a dataclass's docstring (one paragraph per field,
    continuation lines indented deeper than the field's name)."""
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    name, indent = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        ind = len(line) - len(line.lstrip())
        m = re.match(r"^\s*([A-Za-z_]\w*):\s*(.*)$", line)
        if m and (indent is None or ind == indent):
            indent = ind
            name = m.group(1)
            docs[name] = m.group(2).strip()
        elif name is not None and indent is not None and ind > indent:
            docs[name] += " " + line.strip()
        else:
            break
    return {k: re.sub(r"(:\w+:)?`+([^`]*)`+", r"\2", v).replace("%", "%%") for k, v in docs.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_quant_config_args(parser: argparse.ArgumentParser, *, defaults: Mapping[str, Any] | None = None,
                          aliases: Mapping[str, Sequence[str]] | None = None,
                          group_title: str = "quantization (QuantConfig)") -> argparse._ArgumentGroup:
    """Add a flag per :class:`QuantConfig` field (but the datatype) to ``parser``.

    Args:
        defaults: per-field defaults of this command (default: the field's own default).
        aliases: per-field extra flag names of this command (on top of :data:`FLAG_ALIASES`).
        group_title: title of the argument group in ``--help``.

    Every flag's ``dest`` is the field name. A boolean field ``x`` defaulting to True is ``--x`` / ``--no-x``;
    ``pre_rope`` also answers to ``--post-rope`` (= ``--no-pre-rope``). :func:`quant_config_from_args` reads them
    back.
    """
    defaults = dict(defaults or {})
    aliases = {**FLAG_ALIASES, **(aliases or {})}
    docs = field_docs()
    group = parser.add_argument_group(group_title)
    for f in dataclasses.fields(QuantConfig):
        if f.name in NOT_FLAGS:
            continue
        default = defaults.get(f.name, f.default)
        help_text = docs.get(f.name, "")
        names = [_flag(f.name), *aliases.get(f.name, ())]
        if f.type in (bool, "bool"):
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{help_text} (default: %(default)s)")
            if f.name == "pre_rope":
                group.add_argument("--post-rope", dest=f.name, action="store_false",
                                   help="quantize keys after RoPE (same as --no-pre-rope)")
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
        kwargs: dict[str, Any] = {"dest": f.name, "type": kind, "default": default,
                                  "help": f"{help_text} (default: %(default)s)"}
        if f.name == "backend":
            kwargs["choices"] = BACKENDS
        if f.name == "rotation":
            kwargs["choices"] = ROTATIONS
        group.add_argument(*names, **kwargs)
    return group


def quant_config_from_args(args: argparse.Namespace, datatype: str | None = None, **overrides: Any) -> QuantConfig:
    """The :class:`QuantConfig` of parsed flags (see :func:`add_quant_config_args`); ``datatype`` (default: the
    field's default) and ``overrides`` are applied on top. Raises ``ValueError`` for an invalid value."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig)
              if f.name not in NOT_FLAGS and hasattr(args, f.name)}
    if datatype is not None:
        values["datatype"] = datatype
    values.update(overrides)
    return QuantConfig(**values)


# ----------------------------------------------------------------------------------------------------
# device and model


def add_device_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = None) -> None:
    """``--device``: ``cpu``, ``cuda``, ``cuda:N``; ``default`` None means cuda when available, else cpu."""
    parser.add_argument("--device", default=default,
                        help="cpu | cuda | cuda:N (default: " + (default or "cuda if available, else cpu") + ")")


def resolve_device(device: str | None) -> str:
    """The device of ``--device``: None picks cuda when available, else cpu. A CUDA device on a machine without
    CUDA is an error (``SystemExit`` with the reason)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    return device


def add_model_args(p: argparse.ArgumentParser, device_default: str | None = None, random_models: bool = True) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--seed``."""
    help_model = "path, .gguf, alias (smollm2-135m, qwen2.5-coder-1.5b, stories260k) or hub id"
    if random_models:
        help_model += (", or random:<preset> with random weights (random:7b = Llama-2-7B shape, random:8b = "
                       "Llama-3-8B GQA, random:1b, random:small, random:tiny)")
    p.add_argument("--model", default=None, help=help_model)
    add_device_arg(p, device_default)
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: float16 on CUDA, "
                                                 "float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")


# ----------------------------------------------------------------------------------------------------
# sizes and datatype lists


def parse_size(text: str) -> int:
    """``"4096"`` -> 4096, ``"4K"``/``"4k"`` -> 4096, ``"1M"`` -> 1048576 (binary multiples).

    Raises:
        ValueError: not a positive integer size.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}: expected an integer optionally followed by K or M (e.g. 4096, 4K)")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise ValueError(f"bad size {text!r}: must be a positive integer number of tokens/sequences")
    return int(value)


def parse_size_list(text: str) -> list[int]:
    """Parse a list of sizes: comma-separated items, each a size or a range ``A..B``.

    A range ``A..B`` means ``A, 2A, 4A, ...`` up to ``B`` inclusive (``1K..32K`` = 1024, 2048, ..., 32768);
    ``B`` must be ``A`` times a power of two. The result is sorted and without duplicates.

    Raises:
        ValueError: empty list, a bad size, a range with ``B < A`` or ``B`` not reached by doubling ``A``.
    """
    if not text or not text.strip():
        raise ValueError("empty size list")
    out: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in size list {text!r}")
        if ".." in item:
            lo_s, _, hi_s = item.partition("..")
            lo, hi = parse_size(lo_s), parse_size(hi_s)
            if hi < lo:
                raise ValueError(f"bad range {item!r}: end {hi} is smaller than start {lo}")
            ratio = hi / lo
            if ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
                raise ValueError(f"bad range {item!r}: a range doubles from its start, so {hi} must be {lo} "
                                 "times a power of two (e.g. 1K..32K)")
            v = lo
            while v <= hi:
                out.add(v)
                v *= 2
        else:
            out.add(parse_size(item))
    return sorted(out)


def parse_datatypes(text: str) -> list[str]:
    """Comma list of kvquant datatypes (``fp16,nuq4,nuq3,k4v2``), validated, order kept, no duplicates.

    Raises:
        ValueError: an unknown datatype (the message lists the known ones) or an empty list.
    """
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no datatype given; choose from {DATATYPE_HELP}")
    for n in names:
        parse_datatype(n)
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------
# parsers


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, ``(default: X)``, unless its help already speaks of its default or
    there is nothing to show (``None``, a flag that is off by default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        if isinstance(action, argparse.BooleanOptionalAction) or action.const is not None and action.nargs == 0:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one line on stderr (``PROG: error: ... (PROG --help ...)``)
    and exit code 2, and whose ``--help`` shows defaults (:class:`HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")
