"""Dense bit-packing of 2/3/4-bit codes into int32 bit-planes.

A run of 32 codes becomes ``bits`` int32 words: word ``j`` holds bit ``j`` of each code, code ``i`` at
lane ``i``. No bit is wasted for any width (3-bit codes take exactly 3 bits), every width uses the same
code, and one code is recovered with ``bits`` shifts and masks — in PyTorch here, in registers in the
Triton kernels.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; expected 1..8")


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along the last axis.

    Args:
        codes: ``[..., N]`` integer codes in ``[0, 2**bits)``, ``N`` a multiple of 32.

    Returns:
        ``[..., bits, N // 32]`` int32.
    """
    _check_bits(bits)
    n = codes.shape[-1]
    if n % 32:
        raise ValueError(f"last axis must be a multiple of 32 to pack, got {n}")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], 1, n // 32, 32)
    shifts = torch.arange(bits, device=codes.device).view(bits, 1, 1)
    lanes = torch.arange(32, device=codes.device)
    planes = (((c >> shifts) & 1) << lanes).sum(-1)  # [..., bits, N/32] in [0, 2**32)
    planes = torch.where(planes >= 2**31, planes - 2**32, planes)
    return planes.to(torch.int32)


def unpack_bitplanes(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitplanes`: ``[..., bits, W]`` int32 -> ``[..., W * 32]`` uint8."""
    _check_bits(bits)
    if planes.shape[-2] != bits:
        raise ValueError(f"expected {bits} bit-planes in axis -2, got {planes.shape[-2]}")
    lanes = torch.arange(32, device=planes.device, dtype=torch.int32)
    bit = (planes.unsqueeze(-1) >> lanes) & 1  # [..., bits, W, 32]
    weights = (1 << torch.arange(bits, device=planes.device, dtype=torch.int32)).view(bits, 1, 1)
    codes = (bit * weights).sum(-3)  # [..., W, 32]
    return codes.reshape(*planes.shape[:-2], planes.shape[-1] * 32).to(torch.uint8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes of any length along the last axis (zero-padded to 32): ``[..., N]`` -> ``[..., bits, ceil(N/32)]``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    n = codes.shape[-1]
    pad = (-n) % 32
    if pad:
        codes = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    return pack_bitplanes(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns ``[..., length]`` uint8."""
    return unpack_bitplanes(packed, bits)[..., :length]
