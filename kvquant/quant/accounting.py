"""What a store holds, in bytes: the honest count behind every ``bits_per_element`` kvquant reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvquant.sparse.blocked import BlockedCSCMatrix

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


def memory_report(store: QuantizedKVCache) -> dict[str, float]:
    """Bytes held by component, with ``bits_per_element`` over the real tokens stored.

    Counts everything kept: packed codes of every page in use (including the unused tail of each
    sequence's last page), scales, outlier values, indices and per-slot/per-page counts (to block
    granularity), the exact open pages of values, sink and residual tokens, the page table and the
    per-channel ranges. ``allocated`` adds capacity reserved but not yet used.
    """
    P = store.pages.n_pages
    pools = store.pages.pools

    def pool_bytes(name: str) -> int:
        t = pools[name]
        return P * t[0].numel() * t.element_size() if t.shape[0] else 0

    rep: dict[str, float] = {}
    if store.quantized:
        rep["codes"] = pool_bytes("codes")
        scales = pool_bytes("scale") + pool_bytes("zero") + pool_bytes("vref") if store.kind == "value" else 0
        if store.channel_scale is not None:
            scales += 2 * store.channel_scale.numel() * 4
        rep["scales"] = scales
        if isinstance(store.outliers, BlockedCSCMatrix):
            rep["outliers"] = store.outliers.nbytes() if store.keep_outliers else 0
        else:
            rep["outliers"] = store.outliers.nbytes(P) if store.keep_outliers else 0
    else:
        rep["dense"] = pool_bytes("raw")
    if store.open is not None:
        rep["open_page"] = store.open.numel() * store.open.element_size()
    rep["sink"] = store.sink.numel() * store.sink.element_size()
    rep["residual"] = store.residual.numel() * store.residual.element_size()
    rep["page_table"] = store.pages.nbytes()
    total = sum(rep.values())
    elements = int(store.lengths.sum()) * store.num_heads * store.head_dim
    rep["total"] = total
    rep["allocated"] = nbytes_allocated(store)
    rep["elements"] = elements
    rep["fp16_bytes"] = 2 * elements
    rep["bits_per_element"] = 8 * total / elements if elements else float("nan")
    rep["bits_per_element_allocated"] = 8 * rep["allocated"] / elements if elements else float("nan")
    if isinstance(store.outliers, BlockedCSCMatrix):
        n_out = store.outliers.nnz
    elif store.keep_outliers:
        n_out = int(store.outliers.counts[: store.pages.capacity].long().sum())
    else:
        n_out = 0
    rep["outlier_fraction"] = n_out / max(int(store.q_len.sum()) * store.num_heads * store.head_dim, 1)
    return rep



def nbytes_allocated(store: QuantizedKVCache) -> int:
    """Bytes reserved, including pre-allocated capacity not yet used."""
    pools = sum(t.numel() * t.element_size() for t in store.pages.pools.values())
    extra = store.sink.numel() * store.sink.element_size() + store.residual.numel() * store.residual.element_size()
    if store.open is not None:
        extra += store.open.numel() * store.open.element_size()
    if store.channel_scale is not None:
        extra += 2 * store.channel_scale.numel() * 4
    if store.outliers is not None:  # its counts and starts exist even when no outlier is kept
        extra += store.outliers.nbytes_allocated()
    return pools + extra + store.pages.table.numel() * 4 + bookkeeping_bytes(store)


def bookkeeping_bytes(store: QuantizedKVCache) -> int:
    """Bytes of the store's small per-sequence state: lengths, pages per sequence and its code lookup table (the
    codebook itself belongs to the calibration, shared by the stores of a layer, and is not counted)."""
    small = (store.q_len, store.sink_len, store.res_len, store.ranged, store.pages.pages_per_seq,
             getattr(store, "lut", None))
    return sum(t.numel() * t.element_size() for t in small if t is not None)

