"""Per-layer bit allocation: choose each layer's (key bits, value bits) under an average-bits budget.

Every layer ``l`` has a measured error for each side and width, ``key_errors[l][b]`` and ``value_errors[l][b]``
(:func:`kvquant.calibration.calibrate.calibrate` measures them on the calibration activations: the squared
quantization error of the layer's keys or values at that width, weighted by the Fisher information when calibrated
with ``sensitivity="fisher"``, the estimate of the loss increase KVQuant and KVTuner use). The allocation minimises
the summed error of all layers subject to the average code width, ``mean over layers of (key bits + value bits) / 2``,
being at most the budget: a multiple-choice knapsack, solved exactly by dynamic programming over the total bits
(widths are small integers). Keys and values of a layer have the same number of elements, so the average width is
the average bits of a dense code over the whole cache; the measured bits per element add the outliers, scales and
sinks (about half a bit at 1 % outliers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from kvquant.datatypes import WIDTHS


def candidate_pairs(widths: Sequence[int] = WIDTHS) -> list[tuple[int, int]]:
    """Every (key bits, value bits) pair of ``widths``."""
    return [(k, v) for k, v in itertools.product(sorted(set(widths)), repeat=2)]


def allocate_bits(
    key_errors: Sequence[dict[int, float]],
    value_errors: Sequence[dict[int, float]],
    budget: float,
    candidates: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """The per-layer ``(key bits, value bits)`` of least total error whose average width is at most ``budget``.

    Args:
        key_errors, value_errors: per layer, ``{bits: error}`` of that side at each width (non-negative, finite).
        budget: the largest allowed mean of ``(key bits + value bits) / 2`` over the layers.
        candidates: the pairs a layer may take (default: every pair of the widths both error tables have).

    Returns:
        One ``(key bits, value bits)`` per layer. Among allocations of equal error the one with fewer bits wins.

    Raises:
        ValueError: empty or mismatched tables, a candidate without a measured error, or a budget below the
            smallest candidate's width.
    """
    n = len(key_errors)
    if n == 0 or len(value_errors) != n:
        raise ValueError(f"need one key and one value error table per layer, got {n} and {len(value_errors)}")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"bit budget must be a positive number of bits, got {budget}")
    if candidates is None:
        widths = set.intersection(*(set(e) for e in (*key_errors, *value_errors)))
        candidates = candidate_pairs(sorted(widths))
    candidates = sorted(set((int(k), int(v)) for k, v in candidates))
    if not candidates:
        raise ValueError("no candidate (key bits, value bits) pair")
    for layer in range(n):
        for kb, vb in candidates:
            for side, table, b in (("key", key_errors[layer], kb), ("value", value_errors[layer], vb)):
                e = table.get(b)
                if e is None:
                    raise ValueError(f"layer {layer} has no measured {side} error at {b} bits "
                                     f"(measured: {sorted(table)})")
                if not math.isfinite(e) or e < 0:
                    raise ValueError(f"layer {layer}: {side} error at {b} bits must be finite and >= 0, got {e}")
    cheapest = min(k + v for k, v in candidates)
    total = math.floor(2 * n * budget + 1e-9)  # the budget in summed (key + value) bits over the layers
    if total < n * cheapest:
        raise ValueError(f"bit budget {budget} is below the narrowest candidate, {cheapest / 2} bits on average")
    # best[c]: (error, bits, choices) of the layers so far using exactly c summed bits
    best: dict[int, tuple[float, list[tuple[int, int]]]] = {0: (0.0, [])}
    for layer in range(n):
        nxt: dict[int, tuple[float, list[tuple[int, int]]]] = {}
        for used, (err, picks) in best.items():
            for kb, vb in candidates:
                c = used + kb + vb
                if c > total:
                    continue
                e = err + key_errors[layer][kb] + value_errors[layer][vb]
                if c not in nxt or e < nxt[c][0]:
                    nxt[c] = (e, [*picks, (kb, vb)])
        best = nxt
    _, _, picks = min((err, c, picks) for c, (err, picks) in best.items())
    return picks


def mean_bits(allocation: Sequence[tuple[int, int]]) -> float:
    """Average dense code width of an allocation, ``mean of (key bits + value bits) / 2``."""
    return sum(k + v for k, v in allocation) / (2 * len(allocation))
