"""The optional ``triton`` import, shared by every kernel module (the torch paths work without it)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = e


def triton_available() -> bool:
    """Whether triton imported."""
    return triton is not None
