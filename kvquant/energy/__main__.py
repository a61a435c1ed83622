"""``python -m kvquant.energy --duration 2 --gpu 0``: measure GPU energy for N seconds and print JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .monitor import EnergyMonitor


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the idle / background energy of the given GPUs for ``--duration`` seconds.

    Prints the :class:`~kvquant.energy.EnergyMeasurement` as JSON on stdout. Returns 0, or 2 for a bad
    GPU id.
    """
    p = argparse.ArgumentParser(prog="python -m kvquant.energy", description=main.__doc__)
    p.add_argument("--duration", type=float, default=2.0, help="seconds to measure (default 2)")
    p.add_argument("--gpu", type=int, nargs="+", default=[0], help="NVML GPU index/indices (default 0)")
    p.add_argument("--period", type=float, default=0.05, help="power sampling period in s (default 0.05)")
    args = p.parse_args(argv)
    if args.duration < 0:
        p.error("--duration must be >= 0")
    gpu = args.gpu[0] if len(args.gpu) == 1 else list(args.gpu)
    try:
        monitor = EnergyMonitor(gpu, sample_period_s=args.period)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with monitor:
        time.sleep(args.duration)
    assert monitor.result is not None
    print(json.dumps(monitor.result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
