"""Reading a store back (the PyTorch reference): codes and dequantized tokens of its quantized part."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvquant.quant.packing import unpack_units

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


def gather_pages(store: QuantizedKVCache, name: str, length: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pool ``name`` gathered per sequence for its first ``length[b]`` tokens: ``[B, npg, ...]`` and the longest
    ``length``."""
    qmax = int(length.max()) if store.batch else 0
    npg = -(-qmax // store.config.page_size)
    tbl = store.pages.table[:, :npg].long().clamp_min(0)
    return store.pages.pools[name][tbl], qmax


def page_codes(store: QuantizedKVCache) -> torch.Tensor:
    """Codes of the quantized pages: ``[B, H, Q, D]`` uint8 (values: the sealed pages only)."""
    if not store.quantized:
        raise ValueError("an fp16 cache has no codes")
    words, qmax = gather_pages(store, "codes", store.sealed_len)
    B, npg = words.shape[:2]
    T, H, D = store.config.page_size, store.num_heads, store.head_dim
    c = unpack_units(words, store.bits).reshape(B, npg, H, T, D)
    return c.permute(0, 2, 1, 3, 4).reshape(B, H, npg * T, D)[:, :, :qmax]


def dequantize_pages(store: QuantizedKVCache) -> torch.Tensor:
    """The quantized part as ``[B, H, Q, D]`` in ``store.dtype`` (``Q`` = longest ``q_len``; zeros past a
    sequence's end; values of an open page come from ``store.open``, exact)."""
    T = store.config.page_size
    B, H, D = store.batch, store.num_heads, store.head_dim
    if not store.quantized:
        raw, qmax = gather_pages(store, "raw", store.q_len)  # [B, npg, H, T, D]
        return raw.permute(0, 2, 1, 3, 4).reshape(B, H, -1, D)[:, :, :qmax]
    qmax = int(store.q_len.max()) if B else 0
    sealed = store.sealed_len
    words, smax = gather_pages(store, "codes", sealed)
    npg = words.shape[1]
    levels = store.codebook.decode(unpack_units(words, store.bits)).reshape(B, npg, H, T, D)
    if store.kind == "key":
        vals = levels * store.channel_scale[:, None, :, None, :] + store.channel_zero[:, None, :, None, :]
    else:
        sc, _ = gather_pages(store, "scale", sealed)
        zr, _ = gather_pages(store, "zero", sealed)
        vals = levels * sc.float()[..., None] + zr.float()[..., None]
    out = vals.permute(0, 2, 1, 3, 4).reshape(B, H, npg * T, D).to(store.dtype)
    if store.keep_outliers and smax:
        if store.kind == "key":
            i = torch.arange(smax, device=store.device)
            b_idx, i_idx = (i[None, :] < store.q_len[:, None]).nonzero(as_tuple=True)
            page, off = store.pages.locate(b_idx, i_idx)
            owner, ch, v = store.outliers.entries_of(page * T + off)
            out[b_idx[owner], ch // D, i_idx[owner], ch % D] = v.to(store.dtype)
        else:
            pi = torch.arange(npg, device=store.device)
            b_idx, p_idx = (pi[None, :] * T < sealed[:, None]).nonzero(as_tuple=True)
            owner, head, chan, tok, v = store.outliers.entries(store.pages.table[b_idx, p_idx])
            out[b_idx[owner], head, p_idx[owner] * T + tok, chan] = v.to(store.dtype)
    if out.shape[2] < qmax:
        out = torch.cat([out, out.new_zeros(B, H, qmax - out.shape[2], D)], 2)
    out = out[:, :, :qmax]
    if store.deferred and qmax:  # the open pages, exact
        j = torch.arange(qmax, device=store.device)[None, :]
        in_open = (j >= sealed[:, None]) & (j < store.q_len[:, None])
        ex = store.open.gather(2, (j % T).expand(B, -1)[:, None, :, None].expand(B, H, -1, D))
        out = torch.where(in_open[:, None, :, None], ex, out)
    return out
