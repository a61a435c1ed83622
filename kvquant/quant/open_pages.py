"""Values are quantized a page at a time: the open page of each sequence holds its last, incomplete page exactly, and
fills into the store's page pool when complete (then its outliers can be stored sorted by channel)."""

from __future__ import annotations

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
        seal(store, idx, store.q_len[idx] // T, store.open[idx])


def write_open(store: QuantizedKVCache, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
                run_counts: torch.Tensor) -> None:
    """Values: tokens go to their sequence's open page; every page that fills is quantized (sealed)."""
    T = store.config.page_size
    B = store.batch
    q0 = store.q_len
    q1 = q0 + run_counts
    first_page, end_page = q0 // T, q1 // T  # pages [first_page, end_page) of each sequence fill now
    n_full = end_page - first_page
    total = int(n_full.sum())
    if total and not bool((q0 % T).any()):  # no open tokens before: each sequence's pages are views of tokens
        run_first = (torch.cumsum(run_counts, 0) - run_counts).tolist()
        n_host, p0_host = n_full.tolist(), first_page.tolist()
        H, D = store.num_heads, store.head_dim
        for b in range(B):
            if n_host[b]:
                pages = tokens[run_first[b]: run_first[b] + n_host[b] * T].reshape(n_host[b], T, H, D)
                idx = torch.full((n_host[b],), b, device=store.device)
                seal(store, idx, p0_host[b] + torch.arange(n_host[b], device=store.device), pages.transpose(1, 2))
    elif total:
        owner = torch.repeat_interleave(torch.arange(B, device=store.device), n_full)
        pidx = first_page[owner] + torch.arange(total, device=store.device) - (torch.cumsum(n_full, 0) - n_full)[owner]
        # source of each token of those pages: the open page (positions < q0) or the appended tokens
        p = pidx[:, None] * T + torch.arange(T, device=store.device)  # [total, T] positions
        run_first = torch.cumsum(run_counts, 0) - run_counts
        from_open = p < q0[owner][:, None]
        src_new = run_first[owner][:, None] + p - q0[owner][:, None]
        stream = torch.cat([store.open.permute(0, 2, 1, 3).reshape(B * T, store.num_heads, store.head_dim),
                            tokens])
        src = torch.where(from_open, owner[:, None] * T + p % T, B * T + src_new.clamp_min(0))
        page_tokens = stream[src.reshape(-1)].reshape(total, T, store.num_heads, store.head_dim).transpose(1, 2)
        seal(store, owner, pidx, page_tokens)
    # tokens past the last full page stay in the open page
    rest = pos >= end_page[seq] * T
    if bool(rest.any()):
        store.open[seq[rest], :, pos[rest] % T] = tokens[rest]


def seal(store: QuantizedKVCache, seq: torch.Tensor, page_index: torch.Tensor, page_tokens: torch.Tensor) -> None:
    """Quantize full pages of values: page ``page_index[i]`` of sequence ``seq[i]`` from ``page_tokens[i]``
    ``[H, T, D]``."""
    need = torch.zeros(store.batch, dtype=torch.int64, device=store.device)
    need.scatter_reduce_(0, seq, (page_index + 1) * store.config.page_size, "amax")
    store.pages.reserve(torch.maximum(need, store.pages.pages_per_seq * store.config.page_size))
    store.grow_outliers()
    store.ops.write_value_pages(store, store.pages.table[seq, page_index].long(), page_tokens)

