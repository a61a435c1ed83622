"""Inverse rotary embedding of incoming keys in one launch (Triton).

What :func:`kvquant.cache.rope.invert_rope` does in PyTorch — ``(x * cos - rotate_half(x) * sin) / (cos^2 + sin^2)``
in float32, then cast to the keys' dtype — in one kernel instead of about eight launches per layer and step.
Every operation is rounded as torch rounds it (no FMA contraction, IEEE division), so the result is bit-identical
to the reference; the cache's pre-RoPE keys are the same on both backends.
"""

from __future__ import annotations

import torch

from kvquant.kernels._triton import tl, triton

if triton is not None:
    from kvquant.kernels.quantize_append import _to_storage

    @triton.jit
    def _unrope_kernel(X, sxb, sxh, sxs, C, scb, scs, S, ssb, sss, OUT, H, NS,
                       D: tl.constexpr, HP: tl.constexpr, BF16: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one (sequence, position) per program, all heads
        b = pid // NS
        si = pid % NS
        hh = tl.arange(0, HP)[:, None]
        d = tl.arange(0, D)[None, :]
        half: tl.constexpr = D // 2
        m = hh < H
        base = X + b * sxb + hh * sxh + si * sxs
        x = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(base + (d + half) % D, mask=m, other=0.0).to(tl.float32)
        rot = tl.where(d < half, -xr, xr)  # rotate_half: [x1, x2] -> [-x2, x1]
        c = tl.load(C + b * scb + si * scs + d).to(tl.float32)
        s = tl.load(S + b * ssb + si * sss + d).to(tl.float32)
        y = tl.math.div_rn(x * c - rot * s, c * c + s * s)
        if BF16:  # round to nearest even by hand (the interpreter's cast truncates)
            y = _to_storage(y, True)
        tl.store(OUT + ((b * H + hh) * NS + si) * D + d, y.to(OUT.dtype.element_ty), mask=m)


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
    _unrope_kernel[(B * S,)](
        x, x.stride(0), x.stride(1), x.stride(2), cos, cos.stride(0), cos.stride(1), sin, sin.stride(0),
        sin.stride(1), out, H, S, D=D, HP=triton.next_power_of_2(H), BF16=x.dtype == torch.bfloat16, num_warps=4,
        enable_fp_fusion=False,
    )
    return out
