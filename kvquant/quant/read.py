"""Reading a store's quantized pages back: codes unpacked from the bit-planes, levels, scales and exact outliers.

The inverse of :mod:`kvquant.quant.write`; :meth:`~kvquant.quant.store.QuantizedKVCache.dequantize` adds the exact
sink and residual tokens around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvquant.quant.packing import unpack_bitplanes

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


def gather_pages(store: QuantizedKVCache, name: str) -> tuple[torch.Tensor, int]:
    """Pool ``name``'s pages of every sequence in order, ``[B, npg, ...]``, and the longest quantized run."""
    qmax = int(store.q_len.max()) if store.batch else 0
    npg = -(-qmax // store.config.page_size)
    tbl = store.pages.table[:, :npg].long().clamp_min(0)
    return store.pages.pools[name][tbl], qmax


def page_codes(store: QuantizedKVCache) -> torch.Tensor:
    """Dense codes of the quantized part: ``[B, H, Q, D]`` uint8 (Q = longest quantized run)."""
    if not store.quantized:
        raise ValueError("an fp16 cache has no codes")
    planes, _ = gather_pages(store, "planes")
    codes = unpack_bitplanes(planes, store.bits)  # [B, npg, H, D, T]
    B, npg, H, D, T = codes.shape
    return codes.permute(0, 2, 1, 4, 3).reshape(B, H, npg * T, D)[:, :, : int(store.q_len.max())]


def dequantize_pages(store: QuantizedKVCache) -> torch.Tensor:
    """The quantized part as ``[B, H, Q, D]`` in ``store.dtype``."""
    T = store.config.page_size
    B, H, D = store.batch, store.num_heads, store.head_dim
    if not store.quantized:
        raw, qmax = gather_pages(store, "raw")  # [B, npg, H, T, D]
        return raw.permute(0, 2, 1, 3, 4).reshape(B, H, -1, D)[:, :, :qmax]
    planes, qmax = gather_pages(store, "planes")
    npg = planes.shape[1]
    levels = store.codebook.decode(unpack_bitplanes(planes, store.bits))  # [B, npg, H, D, T]
    if store.kind == "key":
        vals = levels * store.channel_scale[:, None, :, :, None] + store.channel_zero[:, None, :, :, None]
    else:
        sc, _ = gather_pages(store, "scale")
        zr, _ = gather_pages(store, "zero")
        vals = levels * sc.float()[:, :, :, None, :] + zr.float()[:, :, :, None, :]
    out = vals.permute(0, 2, 1, 4, 3).reshape(B, H, npg * T, D)[:, :, :qmax].to(store.dtype)
    if store.keep_outliers and qmax:
        i = torch.arange(qmax, device=store.device)
        b_idx, i_idx = (i[None, :] < store.q_len[:, None]).nonzero(as_tuple=True)
        page, off = store.pages.locate(b_idx, i_idx)
        owner, ch, v = store.outliers.entries_of(page * T + off)
        out[b_idx[owner], ch // D, i_idx[owner], ch % D] = v.to(store.dtype)
    return out
