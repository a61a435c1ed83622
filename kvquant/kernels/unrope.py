"""Inverse rotary embedding of incoming keys in one launch (Triton; the body is :mod:`kvquant.kernels.jit.unrope`).

What :func:`kvquant.quant.rope.invert_rope` does in PyTorch — ``(x * cos - rotate_half(x) * sin) / (cos^2 + sin^2)``
in float32, then cast to the keys' dtype — in one kernel instead of about eight launches per layer and step.
Every operation is rounded as torch rounds it (no FMA contraction, IEEE division), so the result is bit-identical
to the reference; the cache's pre-RoPE keys are the same on both backends.
"""

from __future__ import annotations

import torch

from kvquant.kernels._triton import triton
from kvquant.kernels.jit import unrope as _jit

_ELEMENTS_PER_PROGRAM = 4096  # at least this many key elements per program (several positions of small heads)


def invert_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys from post-RoPE ones, bit-identical to ``invert_rope(x, cos, sin).to(x.dtype)``.

    Args:
        x: ``[B, H, S, D]`` keys after the rotary embedding (fp16/bf16/fp32; last dim contiguous), ``D`` even and a
            power of two.
        cos, sin: ``[B, S, D]`` the rotary tables the model used (any float dtype; last dim contiguous).

    Returns:
        ``[B, H, S, D]`` contiguous, in ``x.dtype``.
    """
    if triton is None:
        raise RuntimeError("invert_rope_triton needs triton")
    B, H, S, D = x.shape
    if D < 2 or D & (D - 1):
        raise ValueError(f"head size must be a power of two, got {D}")
    if tuple(cos.shape) != (B, S, D) or tuple(sin.shape) != (B, S, D):
        raise ValueError(f"cos/sin must be [B, S, D] = {(B, S, D)}, got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty(B, H, S, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    hp = triton.next_power_of_2(H)
    bs = max(1, min(64, _ELEMENTS_PER_PROGRAM // (hp * D)))  # positions per program
    _jit._unrope_kernel[(B * triton.cdiv(S, bs),)](
        x, x.stride(0), x.stride(1), x.stride(2), cos, cos.stride(0), cos.stride(1), sin, sin.stride(0),
        sin.stride(1), out, H, S, D=D, HP=hp, BS=bs, BF16=x.dtype == torch.bfloat16, num_warps=4,
        enable_fp_fusion=False,
    )
    return out
