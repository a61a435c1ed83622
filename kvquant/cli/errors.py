"""How ``kvquant`` ends when something goes wrong: one line on stderr and an exit code saying what kind of problem.

=====  =============================================================================================================
code   meaning
=====  =============================================================================================================
0      success
1      a bug in kvquant: the traceback is printed, then one line asking to report it
2      usage or bad input: a bad flag or flag combination, an unknown datatype, an invalid or mismatched
       calibration file, NaN/Inf where numbers are read
3      a file, model or data set is missing or cannot be read (or an output cannot be written)
4      the run failed at run time for lack of resources: out of (GPU) memory, a CUDA error, a full disk
130    interrupted (Ctrl-C)
=====  =============================================================================================================

Only codes 2-4 and 130 are "expected": the line says what to change, and ``--debug`` (or ``KVQUANT_DEBUG=1``) prints
the traceback before it. Anything else is taken for a bug (code 1) and always shows its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from enum import IntEnum

DEBUG_ENV = "KVQUANT_DEBUG"


class ExitCode(IntEnum):
    """The exit codes of ``kvquant`` (see the module docstring)."""

    OK = 0
    BUG = 1
    USAGE = 2
    MISSING = 3
    RUNTIME = 4
    INTERRUPTED = 130


class CLIError(Exception):
    """An error the command line reports as one line with ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.code = code


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined (list bullets ``- x`` become ``x;``), whitespace collapsed."""
    parts = []
    for line in str(message).splitlines():
        line = line.strip()
        if line.startswith("- "):
            line = line[2:].rstrip(";.") + ";"
        if line:
            parts.append(line)
    return " ".join(" ".join(parts).split()).rstrip(";")


def classify(exc: BaseException) -> ExitCode:
    """The exit code of an exception: :class:`CLIError`'s own, 2-4 or 130 for the expected kinds, 1 for a bug."""
    import torch

    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return ExitCode.RUNTIME
    if isinstance(exc, OSError):
        return ExitCode.RUNTIME if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ExitCode.MISSING
    if _is_model_fetch_error(exc):
        return ExitCode.MISSING
    if isinstance(exc, ValueError):  # the library's own validation of values, files and settings
        return ExitCode.USAGE
    if isinstance(exc, RuntimeError) and "CUDA" in str(exc):
        return ExitCode.RUNTIME
    return ExitCode.BUG


def _is_model_fetch_error(exc: BaseException) -> bool:
    from kvquant.models.fetch import ModelFetchError

    return isinstance(exc, ModelFetchError)


def debug_requested(argv: list[str] | None) -> bool:
    """``--debug`` among the arguments, or ``$KVQUANT_DEBUG`` set to anything but ``""``/``0``."""
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_reporting_errors(prog: str, body: Callable[[], int | None], debug: bool) -> int:
    """Run ``body`` and return its exit code (0 for ``None``); an exception becomes a line on stderr and its code
    (:func:`classify`), with the traceback first when ``debug`` or when it is a bug. ``SystemExit`` with a code passes
    through; one with a message (``raise SystemExit("...")``) is a usage error."""
    try:
        code = body()
    except SystemExit as exc:  # argparse's own exits pass; one carrying a message is a usage error
        if not isinstance(exc.code, str):
            raise
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {one_line(exc.code)}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except BaseException as exc:  # every exception ends as a line and a code
        code = classify(exc)
        if debug or code == ExitCode.BUG:
            traceback.print_exc(file=sys.stderr)
        if code == ExitCode.BUG:
            print(f"{prog}: internal error ({type(exc).__name__}: {one_line(str(exc))}); this is a bug in kvquant, "
                  "please report it with the traceback above", file=sys.stderr)
        elif code == ExitCode.INTERRUPTED:
            print(f"{prog}: interrupted", file=sys.stderr)
        else:
            hint = "" if debug or isinstance(exc, CLIError) else " (--debug shows the traceback)"
            print(f"{prog}: error: {one_line(str(exc)) or type(exc).__name__}{hint}", file=sys.stderr)
        return int(code)
    return int(code or 0)
