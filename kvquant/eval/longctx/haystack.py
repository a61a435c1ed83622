"""Haystack text: the filler the needles are hidden in.

* ``noise``: "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated
  (Landmark Attention's passkey filler, RULER's ``noise`` haystack);
* ``essay``: sentences of a real text (Paul Graham's essays, as RULER and needle-in-a-haystack tests use), read from
  wherever the caller loaded it, starting at a seeded sentence and wrapping around.
"""

from __future__ import annotations

import bisect
import random
import re

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (split after ``.``/``!``/``?`` and whitespace), whitespace-normalised, empty ones
    dropped."""
    sentences = (" ".join(s.split()) for s in _SENTENCE_END.split(text))
    return [s for s in sentences if s]


class Haystack:
    """Filler units drawn in order from a text (one unit: one sentence) or the noise sentence.

    Args:
        text: the essay text; ``None`` for the noise haystack.
        min_sentences: an essay text must have at least this many sentences.
    """

    def __init__(self, text: str | None = None, min_sentences: int = 20) -> None:
        self.sentences = split_sentences(text) if text is not None else []
        if text is not None and len(self.sentences) < min_sentences:
            raise ValueError(f"haystack text has {len(self.sentences)} sentences, need at least {min_sentences}")

    @property
    def is_noise(self) -> bool:
        return not self.sentences

    def units(self, n: int, rng: random.Random | None = None) -> list[str]:
        """``n`` filler units: the noise sentence ``n`` times, or ``n`` consecutive sentences from a random start
        (``rng``; the first sentence without one), wrapping around the text."""
        if self.is_noise:
            return [NOISE] * n
        start = rng.randrange(len(self.sentences)) if rng is not None else 0
        m = len(self.sentences)
        return [self.sentences[(start + i) % m] for i in range(n)]


def insert_at_depths(units: list[str], items: list[tuple[float, str]]) -> list[str]:
    """``units`` with each ``(depth, text)`` inserted at ``depth`` percent of the filler's characters (0: before the
    first unit, 100: after the last), at the unit boundary nearest to it; items at one place keep their order."""
    n = len(units)
    bounds = [0]  # characters before boundary i
    for u in units:
        bounds.append(bounds[-1] + len(u) + 1)
    slots: dict[int, list[str]] = {}
    for depth, text in items:
        if not 0.0 <= depth <= 100.0:
            raise ValueError(f"depth must be in [0, 100] percent, got {depth}")
        target = depth / 100.0 * bounds[-1]
        i = bisect.bisect_left(bounds, target)
        if i > n or (i > 0 and target - bounds[i - 1] <= bounds[i] - target):
            i -= 1
        slots.setdefault(i, []).append(text)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(slots.get(i, ()))
        if i < n:
            out.append(units[i])
    return out
