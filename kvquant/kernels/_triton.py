"""The optional ``triton`` import, shared by every kernel module (the torch paths work without it)."""

from __future__ import annotations

from kvquant.config import BACKENDS

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


def resolve_backend(requested: str, problems: list[str], on_cuda: bool) -> str:
    """The one rule every kvquant component uses to pick its backend.

    Args:
        requested: ``"torch"`` (the reference, always possible), ``"triton"`` (an error naming the problems if it
            cannot run) or ``"auto"`` (triton on CUDA when nothing stops it, else torch).
        problems: reasons this component's Triton path cannot run here (empty if it can); triton failing to
            import is added here.
        on_cuda: whether the data lives on a CUDA device (``auto`` runs the kernels only there; elsewhere they
            would run under the interpreter).

    Returns:
        ``"torch"`` or ``"triton"``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if triton is None:
        problems = [f"triton does not import ({TRITON_IMPORT_ERROR})", *problems]
    if requested == "triton":
        if problems:
            raise ValueError("backend='triton' is not possible: " + "; ".join(problems))
        return "triton"
    return "triton" if on_cuda and not problems else "torch"
