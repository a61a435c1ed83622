"""Helpers shared by the blocked sparse matrices."""

from __future__ import annotations

import torch


def _grow(t: torch.Tensor, n: int, fill: int | float = 0) -> torch.Tensor:
    out = torch.full((n, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def largest_group(n: int, limit: int = 255) -> int:
    """The largest divisor of ``n`` that is ``<= limit`` (a channel group whose counts fit in uint8)."""
    return next(g for g in range(min(n, limit), 0, -1) if n % g == 0)


def index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype holding indices ``0 .. n-1`` (uint8 up to 256)."""
    return torch.uint8 if n <= 256 else torch.int16 if n <= 2**15 else torch.int32
