"""Reading a store back (the PyTorch reference): codes and dequantized tokens of its quantized part."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvquant.quant.encode import decode_page_scales
from kvquant.quant.packing import unpack_units
from kvquant.quant.rope import apply_rope

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


#: Elements (batch x context x head size) per head group when :func:`read_past` reads a store back: the
#: dequantization's temporaries (int64 code unpacking, float32 levels and maps: up to about 24 bytes per element,
#: counted from the code) stay near 0.8 GB.
READ_GROUP_ELEMENTS = 1 << 25


def gather_pages(store: QuantizedKVCache, name: str, length: torch.Tensor,
                 heads: tuple[int, int] | None = None) -> tuple[torch.Tensor, int]:
    """Pool ``name`` gathered per sequence for its first ``length[b]`` tokens: ``[B, npg, H, ...]`` (heads
    ``h0 <= h < h1`` only with ``heads=(h0, h1)``) and the longest ``length``."""
    qmax = int(length.max()) if store.batch else 0
    npg = -(-qmax // store.config.page_size)
    tbl = store.pages.table[:, :npg].long().clamp_min(0)
    pool = store.pages.pools[name]
    if heads is not None:
        pool = pool[:, heads[0]:heads[1]]  # a view: only the slice is gathered
    return pool[tbl], qmax


def page_codes(store: QuantizedKVCache) -> torch.Tensor:
    """Codes of the quantized pages: ``[B, H, Q, D]`` uint8 (values: the sealed pages only)."""
    if not store.quantized:
        raise ValueError("an fp16 cache has no codes")
    words, qmax = gather_pages(store, "codes", store.sealed_len)
    B, npg = words.shape[:2]
    T, H, D = store.config.page_size, store.num_heads, store.head_dim
    c = unpack_units(words, store.bits).reshape(B, npg, H, T, D)
    return c.permute(0, 2, 1, 3, 4).reshape(B, H, npg * T, D)[:, :, :qmax]


def outlier_entries(store: QuantizedKVCache) -> tuple[torch.Tensor, ...]:
    """The exact outliers of the quantized part, one row per entry: ``(sequence, head, position in the quantized
    part, channel, value)`` (keys: every quantized token; values: the sealed pages)."""
    T, D = store.config.page_size, store.head_dim
    if store.kind == "key":
        i = torch.arange(int(store.q_len.max()) if store.batch else 0, device=store.device)
        b_idx, i_idx = (i[None, :] < store.q_len[:, None]).nonzero(as_tuple=True)
        page, off = store.pages.locate(b_idx, i_idx)
        owner, ch, v = store.outliers.entries_of(page * T + off)
        return b_idx[owner], ch // D, i_idx[owner], ch % D, v
    sealed = store.sealed_len
    npg = -(-(int(sealed.max()) if store.batch else 0) // T)
    pi = torch.arange(npg, device=store.device)
    b_idx, p_idx = (pi[None, :] * T < sealed[:, None]).nonzero(as_tuple=True)
    owner, head, chan, tok, v = store.outliers.entries(store.pages.table[b_idx, p_idx])
    return b_idx[owner], head, p_idx[owner] * T + tok, chan, v


def dequantize_pages(store: QuantizedKVCache, heads: tuple[int, int] | None = None,
                     entries: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """The quantized part as ``[B, H, Q, D]`` in ``store.dtype`` (``Q`` = longest ``q_len``; zeros past a
    sequence's end; values of an open page come from ``store.open``, exact). ``heads=(h0, h1)``: only those heads
    (``[B, h1 - h0, Q, D]``, the same numbers as the slice of the whole), whose temporaries are that much smaller;
    ``entries``: :func:`outlier_entries` of the store, when a caller reading several head groups found them once."""
    T = store.config.page_size
    B, D = store.batch, store.head_dim
    h0, h1 = (0, store.num_heads) if heads is None else heads
    H = h1 - h0
    if not store.quantized:
        raw, qmax = gather_pages(store, "raw", store.q_len, heads)  # [B, npg, H, T, D]
        return raw.permute(0, 2, 1, 3, 4).reshape(B, H, -1, D)[:, :, :qmax]
    qmax = int(store.q_len.max()) if B else 0
    sealed = store.sealed_len
    words, smax = gather_pages(store, "codes", sealed, heads)
    npg = words.shape[1]
    levels = store.codebook.decode(unpack_units(words, store.bits)).reshape(B, npg, H, T, D)
    if store.kind == "key":
        vals = (levels * store.channel_scale[:, None, h0:h1, None, :]
                + store.channel_zero[:, None, h0:h1, None, :])
    else:
        sc, _ = gather_pages(store, "scale", sealed, heads)
        zr, _ = gather_pages(store, "zero", sealed, heads)
        ref, _ = gather_pages(store, "vref", sealed, heads)
        scale, zero = decode_page_scales(sc, zr, ref)
        vals = levels * scale[..., None] + zero[..., None]
    out = vals.permute(0, 2, 1, 3, 4).reshape(B, H, npg * T, D).to(store.dtype)
    if store.keep_outliers and smax:
        b_idx, head, pos, chan, v = outlier_entries(store) if entries is None else entries
        if heads is not None:
            keep = ((head >= h0) & (head < h1)).nonzero().squeeze(1)
            b_idx, head, pos, chan, v = (t.index_select(0, keep) for t in (b_idx, head, pos, chan, v))
        out[b_idx, head - h0, pos, chan] = v.to(store.dtype)
    if out.shape[2] < qmax:
        out = torch.cat([out, out.new_zeros(B, H, qmax - out.shape[2], D)], 2)
    out = out[:, :, :qmax]
    if store.deferred and qmax:  # the open pages, exact
        j = torch.arange(qmax, device=store.device)[None, :]
        in_open = (j >= sealed[:, None]) & (j < store.q_len[:, None])
        ex = store.open[:, h0:h1].gather(2, (j % T).expand(B, -1)[:, None, :, None].expand(B, H, -1, D))
        out = torch.where(in_open[:, None, :, None], ex, out)
    return out


def read_past(store: QuantizedKVCache, mask: torch.Tensor, out: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The reference of :func:`kvquant.kernels.read_past.read_past`: the store dequantized a group of heads at a time
    (:data:`READ_GROUP_ELEMENTS`) straight into ``out [B, H, S, D]`` at the real positions of ``mask [B, S]`` (bool,
    checked by the caller), rotated by ``rope = (cos, sin) [B, S, D]`` when given (the same numbers as reading every
    head at once)."""
    B, S = mask.shape
    H, D = store.num_heads, store.head_dim
    step = max(1, min(H, READ_GROUP_ELEMENTS // max(1, B * S * D)))
    entries = store.outlier_entries() if step < H else None  # found once for every group
    for h0 in range(0, H, step):
        heads = (h0, min(H, h0 + step))
        x = store.dequantize_aligned(mask, heads, checked=True, entries=entries)
        out[:, heads[0]:heads[1]] = x if rope is None else apply_rope(x, *rope)
