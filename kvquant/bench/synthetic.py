"""Synthetic KV activations with the statistics that make KV quantization hard."""

from __future__ import annotations

import torch


def heavy_tailed_kv(
    shape: tuple[int, int, int, int],
    seed: int,
    df: float = 4.0,
    outlier_channels: int = 2,
    outlier_gain: float = 15.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Student-t samples with per-channel scales and a few outlier channels.

    Args:
        shape: ``[B, H, S, D]``.
        seed: the same seed gives the same tensor.
        df: Student-t degrees of freedom (smaller = heavier tails).
        outlier_channels: channels (per head) whose scale is multiplied by ``outlier_gain``, like the
            outlier channels of real pre-RoPE keys.

    Returns:
        ``[B, H, S, D]`` tensor of ``dtype``.
    """
    B, H, S, D = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.distributions.StudentT(torch.tensor(float(df))).sample(shape)
        scale = 0.2 + 2.0 * torch.rand(1, H, 1, D)
        x = x * scale
        for h in range(H):
            ch = torch.randperm(D)[: min(outlier_channels, D)]
            x[:, h, :, ch] *= outlier_gain
    return x.to(dtype)
