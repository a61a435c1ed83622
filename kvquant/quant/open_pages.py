"""Values are quantized a page at a time: the open page of each sequence holds its last, incomplete page exactly, and
fills into the store's page pool when complete (then its outliers can be stored sorted by channel)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


def append_open_steady(store: QuantizedKVCache, tok: torch.Tensor) -> None:
    """Values, one token per sequence (``tok [B, H, D]``): into its open page; pages that fill are quantized.
    The host knows every sequence's length, so no device sync."""
    T = store.config.page_size
    b = torch.arange(store.batch, device=store.device)
    store.open[b, :, store.q_len % T] = tok
    full = [i for i, q in enumerate(store._q_host) if (q + 1) % T == 0]
    if full:
        idx = torch.tensor(full, device=store.device)
        need = [q + 1 if (q + 1) % T == 0 else 0 for q in store._q_host]  # tokens each sequence's pages must hold
        seal(store, idx, store.q_len[idx] // T, store.open[idx], need)


def write_open(store: QuantizedKVCache, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
               run_counts: torch.Tensor, host: tuple[list[int], list[int]]) -> None:
    """Values: tokens go to their sequence's open page; every page that fills is quantized (sealed).

    ``tokens [N, H, D]`` are grouped by sequence, oldest first: ``run_counts[b]`` of sequence ``b`` at positions
    ``q_len[b] ...`` (``seq``, ``pos`` per token); ``host``: ``(q_len, run_counts)`` as lists, read by the caller.
    Nothing is read from the device here."""
    T = store.config.page_size
    B = store.batch
    q0_h, n_h = host
    first_h = [q // T for q in q0_h]  # pages [first, end) of each sequence fill now
    end_h = [(q + n) // T for q, n in zip(q0_h, n_h)]
    n_full = [e - f for f, e in zip(first_h, end_h)]
    run_first = [0, *itertools.accumulate(n_h)][:B]
    total = sum(n_full)
    if total:
        store.pages.reserve([e * T for e in end_h])
        store.grow_outliers()
    if total and not any(q % T for q in q0_h):  # no open tokens before: each sequence's pages are views of tokens
        H, D = store.num_heads, store.head_dim
        for b in range(B):
            if n_full[b]:
                pages = tokens[run_first[b]: run_first[b] + n_full[b] * T].reshape(n_full[b], T, H, D)
                idx = torch.full((n_full[b],), b, device=store.device)
                seal(store, idx, first_h[b] + torch.arange(n_full[b], device=store.device), pages.transpose(1, 2))
    elif total:
        owner_h = [b for b in range(B) for _ in range(n_full[b])]
        page_h = [first_h[b] + k for b in range(B) for k in range(n_full[b])]
        owner, pidx = torch.tensor([owner_h, page_h], dtype=torch.int64).to(store.device, non_blocking=True)
        # source of each token of those pages: the open page (positions < q0) or the appended tokens
        q0 = store.q_len
        p = pidx[:, None] * T + torch.arange(T, device=store.device)  # [total, T] positions
        run_start = torch.tensor(run_first, dtype=torch.int64).to(store.device, non_blocking=True)
        from_open = p < q0[owner][:, None]
        src_new = run_start[owner][:, None] + p - q0[owner][:, None]
        stream = torch.cat([store.open.permute(0, 2, 1, 3).reshape(B * T, store.num_heads, store.head_dim),
                            tokens])
        src = torch.where(from_open, owner[:, None] * T + p % T, B * T + src_new.clamp_min(0))
        page_tokens = stream[src.reshape(-1)].reshape(total, T, store.num_heads, store.head_dim).transpose(1, 2)
        seal(store, owner, pidx, page_tokens)
    # tokens past the last full page stay in the open page
    rest = [run_first[b] + j for b in range(B) for j in range(max(end_h[b] * T - q0_h[b], 0), n_h[b])]
    if rest:
        r = torch.tensor(rest, dtype=torch.int64).to(store.device, non_blocking=True)
        store.open[seq[r], :, pos[r] % T] = tokens[r]


def seal(store: QuantizedKVCache, seq: torch.Tensor, page_index: torch.Tensor, page_tokens: torch.Tensor,
         need: list[int] | None = None) -> None:
    """Quantize full pages of values: page ``page_index[i]`` of sequence ``seq[i]`` from ``page_tokens[i]``
    ``[H, T, D]``. ``need``: first allocate pages for ``need[b]`` tokens of sequence ``b`` (host-known, no device
    read); ``None``: the caller allocated them."""
    if need is not None:
        store.pages.reserve(need)
        store.grow_outliers()
    store.ops.write_value_pages(store, store.pages.table[seq, page_index].long(), page_tokens)
