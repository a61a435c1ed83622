"""Static decode: one token per sequence and step with device work only, every index read on the device, the same
launches every step, what a CUDA graph captures (:func:`kvquant.cache.graphs.generate`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvquant.sparse.blocked import BlockedCSCMatrix

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache

def begin_static(store: QuantizedKVCache, extra_tokens: int, outlier_headroom: float = 4.0) -> None:
    """Prepare for ``extra_tokens`` decode steps of one token per sequence with no host work per step (what a
    captured CUDA graph replays): pages, outlier slots and value blocks are reserved now; key outliers get room
    for ``outlier_headroom`` times the configured fraction of the new keys (writes past it are dropped and
    reported as an error when the cache is next read on the host). Every sequence must be past its sinks and
    residual window. A sequence still holding its tokens exactly (``hold_tokens``) ends its hold first
    (:meth:`~kvquant.quant.store.QuantizedKVCache.settle`: keys take their ranges from the tokens seen so far).
    :meth:`end_static` returns to normal appends."""
    if extra_tokens < 0:
        raise ValueError(f"extra_tokens must be >= 0, got {extra_tokens}")
    store.settle()
    store._host_stale = True
    if not store._fast_path_ready(1):
        raise ValueError("static decode needs every sequence past its sinks and residual window (prefill first)")
    store.reserve(extra_tokens)
    if isinstance(store.outliers, BlockedCSCMatrix) and store.keep_outliers:
        new = store.batch * extra_tokens * store.num_heads * store.head_dim
        f = min(1.0, outlier_headroom * max(store.config.outlier_fraction, 1e-3))
        store.outliers.reserve(nnz=store.outliers.nnz + int(f * new) + store.num_heads * store.head_dim * store.batch,
                              exact=True)
    if store._nonfinite is None:
        store._nonfinite = torch.zeros(1, dtype=torch.float32, device=store.device)
    store._arange_b = torch.arange(store.batch, device=store.device)
    store.static = True


def end_static(store: QuantizedKVCache) -> None:
    """Back to normal appends: the host re-reads the lengths, and checks now that no step met NaN/Inf and that the
    key outliers fit their reserved room (errors otherwise)."""
    store.static = False
    store._host_stale = True
    if isinstance(store.outliers, BlockedCSCMatrix):
        _ = store.outliers.nnz  # reads the device counters back: an overflow is an error
    if store._nonfinite is not None:
        store._raise_if_nonfinite(bool(store._nonfinite.isnan()))


def append_static(store: QuantizedKVCache, x: torch.Tensor) -> None:
    """One token per sequence (``x [B, H, 1, D]``) with device work only; state is updated in place."""
    x = x.to(store.dtype)
    tok = x[:, :, 0]
    store._nonfinite += (tok - tok).sum()
    R = store.config.residual_length
    if R:  # the oldest exact token leaves the window; the new one enters (in place)
        out = store.residual[:, :, 0].clone()
        store.residual[:, :, :-1] = store.residual[:, :, 1:].clone()
        store.residual[:, :, -1] = tok
        tok = out
    if store.deferred:
        store.open[store._arange_b, :, store.q_len % store.config.page_size] = tok
        store.ops.seal_open_pages(store)
    else:
        store.ops.write_keys(store, store._arange_b, store.q_len, tok, nonfinite=store._nonfinite, static=True)
    store.q_len += 1

