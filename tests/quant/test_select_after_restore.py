"""``select`` (beam reordering) right after an undone append copies only what the store holds."""

from __future__ import annotations

import torch

from kvquant import BatchedKVQuantizer, QuantConfig
from kvquant.quant.journal import checkpoint, restore


def test_select_after_an_undone_append_keeps_only_held_outliers(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = BatchedKVQuantizer(QuantConfig(datatype="nuq3", backend="torch", outlier_fraction=0.05, min_range_tokens=1))
    store = q.quantize_keys(torch.randn(3, 2, 70, 64, generator=g))
    index = torch.tensor([2, 0, 0])
    want = store.select(index)
    ck = checkpoint(store, 5)
    store.append(torch.randn(3, 2, 5, 64, generator=g) * 50)  # far outside the ranges: many key outliers
    assert store.outliers.nnz > want.outliers.nnz
    restore(store, ck)
    got = store.select(index)
    assert got.outliers.nnz == want.outliers.nnz
    k1, m1 = got.dequantize()
    k2, m2 = want.dequantize()
    assert torch.equal(m1, m2) and torch.equal(k1, k2)
