"""RULER's string-match scoring.

RULER scores a prediction by the references it contains, case-insensitively: ``string_match_all`` (every
synthetic task) is the fraction of references found, ``string_match_part`` (its QA tasks) is 1 when any is found.
Both are averaged over samples and reported in percent. Predictions are cleaned first as RULER does: everything
from the first non-printable character on is dropped, and surrounding whitespace is stripped.
"""

from __future__ import annotations

from collections.abc import Sequence


def clean_prediction(text: str) -> str:
    """A generated answer up to its first non-printable character (newlines and tabs allowed), stripped."""
    for i, ch in enumerate(text):
        if not ch.isprintable() and ch not in "\n\t":
            text = text[:i]
            break
    return text.strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction (0-1) of ``references`` contained in ``prediction``, case-insensitive."""
    if not references:
        raise ValueError("no reference answers")
    pred = clean_prediction(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any of ``references`` is contained in ``prediction`` (case-insensitive), else 0.0."""
    if not references:
        raise ValueError("no reference answers")
    pred = clean_prediction(prediction).lower()
    return float(any(ref.lower() in pred for ref in references))


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]], metric: str = "all") -> float:
    """Mean score of ``predictions`` against their ``references``, in percent (RULER's task score).

    Args:
        metric: ``"all"`` (:func:`string_match_all`) or ``"part"`` (:func:`string_match_part`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    fn = {"all": string_match_all, "part": string_match_part}[metric]
    return 100.0 * sum(fn(p, r) for p, r in zip(predictions, references)) / len(predictions)
