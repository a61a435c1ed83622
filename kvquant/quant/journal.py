"""Undo records of a store: what an append changes, kept so that a failed multi-layer step can be undone.

A transformers forward appends to every layer in turn; when a later layer (or anything after it) raises, the
layers already written must go back to where they were, or the cache holds the layers out of step. An append
rebinds the store's lengths, sinks and residual window to new tensors (never writing into the old ones), so a
checkpoint is mostly references and costs no device work; what is written in place is copied:

* the key outlier matrix's device counters (a decode step advances them on the device);
* the values' open pages, only for appends of several tokens per sequence (a page that seals and a new one that
  starts in the same append overwrite it; a one-token step never does).

Pages, outlier slots and blocks that an undone append allocated stay allocated (reserved for the tokens that will
come), and what it wrote beyond the restored lengths is overwritten by the next append.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvquant.sparse.blocked import BlockedCSCMatrix

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


@dataclass
class StoreCheckpoint:
    """A store's state before an append (see :func:`checkpoint`)."""

    fields: dict[str, Any]
    open_copy: torch.Tensor | None
    outlier_host: tuple[int, int, bool, int] | None
    outlier_device: torch.Tensor | None
    flag_clean: bool


_REBOUND = ("sink", "residual", "sink_len", "q_len", "res_len", "ranged", "channel_scale", "channel_zero")


def checkpoint(store: QuantizedKVCache, tokens_per_seq: int) -> StoreCheckpoint:
    """The state to restore if the coming append of ``tokens_per_seq`` tokens per sequence must be undone."""
    if store.static:
        raise RuntimeError("a static decode step cannot be checkpointed (its state is updated in place)")
    fields = {name: getattr(store, name) for name in _REBOUND}
    open_copy = store.open.clone() if store.open is not None and tokens_per_seq > 1 else None
    host = dev = None
    o = store.outliers
    if isinstance(o, BlockedCSCMatrix):
        host = (o._nnz, o._n_slots, o._dev_ahead, o._nnz_upper)
        if o._dev_ahead and o._dev_counts is not None:
            dev = o._dev_counts.clone()
    return StoreCheckpoint(fields, open_copy, host, dev, store._unchecked_appends == 0)


def restore(store: QuantizedKVCache, ck: StoreCheckpoint) -> None:
    """Put ``store`` back to checkpoint ``ck`` (taken on this same store)."""
    for name, value in ck.fields.items():
        setattr(store, name, value)
    if ck.open_copy is not None:
        store.open.copy_(ck.open_copy)
    o = store.outliers
    if isinstance(o, BlockedCSCMatrix) and ck.outlier_host is not None:
        o._nnz, o._n_slots, o._dev_ahead, o._nnz_upper = ck.outlier_host
        if ck.outlier_device is not None:
            o._dev_counts.copy_(ck.outlier_device)
    if ck.flag_clean:  # the flag was clean before the append: whatever the append met is undone with it
        if store._nonfinite is not None:
            store._nonfinite.zero_()
        store._unchecked_appends = 0
    store._host_stale = True
