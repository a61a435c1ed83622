"""How pre-allocated storage grows: geometrically (amortised O(1) appends) by a quarter, so at most a fifth of what is
held is slack. Doubling would leave up to half of a long cache unused."""

from __future__ import annotations


def grown_capacity(capacity: int, need: int) -> int:
    """The capacity to grow to when ``need`` units do not fit in ``capacity``: ``need`` or 1.25 x ``capacity``."""
    return max(need, capacity + max(capacity // 4, 1))
