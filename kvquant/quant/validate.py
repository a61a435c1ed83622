"""Input checks with errors that name the problem."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same one; an index-less ``cuda`` means the current CUDA device."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type != "cuda":
            return a.index == b.index
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index


def check_kv(x: torch.Tensor, name: str = "x", heads: int | None = None, head_dim: int | None = None,
             device: torch.device | None = None, finite: bool = True) -> None:
    """Check a key/value tensor ``[B, H, S, D]``: type, rank, dtype, sizes, device, and finiteness (a device
    sync; ``finite=False`` leaves it to the caller)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, H, S, D], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape [B, H, S, D] (rank 4), got rank {x.ndim} {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (B = 0)")
    if x.shape[1] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} has zero heads or zero head_dim: {tuple(x.shape)}")
    if heads is not None and x.shape[1] != heads:
        raise ValueError(f"{name} has {x.shape[1]} heads, expected {heads}")
    if head_dim is not None and x.shape[3] != head_dim:
        raise ValueError(f"{name} has head_dim {x.shape[3]}, expected {head_dim}")
    if device is not None and not same_device(x.device, device):
        raise ValueError(f"{name} is on {x.device} but the cache lives on {device}")
    if finite and x.numel() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or Inf (first at index {bad})")


def check_mask(mask: torch.Tensor | None, batch: int, seq: int, device: torch.device,
               allow_empty_rows: bool = False, name: str = "attention_mask") -> torch.Tensor:
    """Check ``[B, S]`` padding mask (1 = real token); returns it as bool. ``None`` means all real."""
    if mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, S], got {type(mask).__name__}")
    if mask.shape != (batch, seq):
        raise ValueError(f"{name} must have shape [B, S] = [{batch}, {seq}], got {tuple(mask.shape)}")
    if not same_device(mask.device, device):
        raise ValueError(f"{name} is on {mask.device} but the tensor it masks is on {device}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be bool or integer 0/1, got {mask.dtype}")
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 1):
            raise ValueError(f"{name} must contain only 0 and 1")
        mask = mask.bool()
    if not allow_empty_rows and seq > 0:
        empty = (~mask.any(1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"{name} rows {empty.tolist()} have no real tokens (all padding)")
    return mask


def compact_order(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the positions of real tokens first, in order: ``[B, S]`` int64 (a stable sort)."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
