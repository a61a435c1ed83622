"""Synchronise pending CUDA work so that it is counted inside a measured region."""

from __future__ import annotations

__all__ = ["synchronize_cuda"]


def synchronize_cuda() -> None:
    """Call ``torch.cuda.synchronize()`` when torch has an initialised CUDA context.

    Errors raised by the synchronisation itself (a failed kernel) propagate: they belong to the workload.
    Only the *current* CUDA device is synchronised: synchronising every visible device would create CUDA
    contexts (and draw power) on GPUs the program never used. If CUDA has not been initialised there is no
    queued GPU work, so nothing is done (and no context is created).
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of kvquant
        return
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
