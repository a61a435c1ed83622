"""Running ``kvquant sweep`` in-process from the tests."""

from __future__ import annotations


def run_sweep(argv: list[str]) -> int:
    """``kvquant sweep ARGV`` through the CLI's main; its exit code (0 when main returns)."""
    from kvquant.cli.main import main

    try:
        main(["sweep", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
