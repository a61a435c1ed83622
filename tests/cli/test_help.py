"""``--help`` of every command and benchmark: each option explains itself and shows its default; the top-level help
lists every command."""

from __future__ import annotations

import argparse
import importlib

import pytest

from kvquant.cli.commands import BENCHMARKS
from kvquant.cli.main import build_parser
from kvquant.flags import HelpFormatter


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the command line, by its command (``eval ppl``, ``bench generate``, ...)."""
    out: dict[str, argparse.ArgumentParser] = {}
    todo = [("kvquant", build_parser())]
    while todo:
        name, p = todo.pop()
        out[name] = p
        todo += [(f"{name} {sub}", sp) for sub, sp in _subparsers(p).items()]
    for what in BENCHMARKS:
        out[f"kvquant bench {what}"] = importlib.import_module(f"kvquant.bench.{what}").build_parser()
    return out


PARSERS = _all_parsers()


def _shows_default(p: argparse.ArgumentParser, a: argparse.Action) -> bool:
    if a.default in (None, False, argparse.SUPPRESS) or "%(default)" in (a.help or ""):
        return True
    if "default" in (a.help or ""):
        return True
    return issubclass(p.formatter_class, HelpFormatter) and bool(a.option_strings)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    p = PARSERS[name]
    p.format_help()  # every %(default)s expands
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = "/".join(a.option_strings) or a.dest
        assert a.help and a.help.strip(), f"{name}: {label} has no help text"
        assert _shows_default(p, a), f"{name}: {label} does not show its default {a.default!r}"


def test_defaults_appear_in_the_rendered_help() -> None:
    text = " ".join(PARSERS["kvquant eval ppl"].format_help().split())
    assert "tokens per window (default: 2048)" in text
    assert "(default: results/ppl.json)" in text


def test_top_level_help_lists_every_command_without_backquotes() -> None:
    p = PARSERS["kvquant"]
    commands = list(_subparsers(p))
    assert {"demo", "calibrate", "eval", "bench", "report"} <= set(commands)
    for c in commands:
        assert c in p.description, c
    text = p.format_help()
    assert "`" not in text and "Exit codes" in text
