"""The decode benchmark's synthetic caches: built in pieces past a size, with every token stored."""

from __future__ import annotations

import pytest
import torch

from kvquant.bench import kernels_decode
from kvquant.config import QuantConfig


@pytest.mark.parametrize("chunk", [1 << 28, 2 * 3 * 64 * 10])
def test_synthetic_caches_hold_every_token(seed: int, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels_decode, "SYNTH_CHUNK_ELEMENTS", chunk)  # the second: pieces of 10 tokens
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, residual_length=0, min_range_tokens=1, page_size=32)
    kc, vc = kernels_decode.synthetic_caches(2, 3, 64, 47, cfg, torch.float32, "cpu", seed=seed % 1000)
    for c in (kc, vc):
        assert c.lengths.tolist() == [47, 47]
        x, mask = c.dequantize()
        assert mask.all() and torch.isfinite(x).all()
        assert float(x.std()) > 0.1  # heavy-tailed data, not zeros
    assert kc.outliers.nnz > 0


def test_synthetic_caches_built_in_pieces_keep_the_outlier_fraction(seed: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache built in pieces stores as many outliers (and bits) as one built at once: the pieces of a stream share
    its channel statistics, so the key ranges of the first piece fit the rest."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, residual_length=0, min_range_tokens=1, page_size=32)
    B, H, D, L = 2, 2, 64, 2400
    built = {}
    for chunk in (1 << 28, B * H * D * 800):  # at once; pieces of 800 tokens
        monkeypatch.setattr(kernels_decode, "SYNTH_CHUNK_ELEMENTS", chunk)
        kc, vc = kernels_decode.synthetic_caches(B, H, D, L, cfg, torch.float32, "cpu", seed=seed % 1000)
        built[chunk] = kc.outliers.nnz / (B * H * D * L)
    once, pieces = built.values()
    assert 0.005 < once < 0.02, once
    assert pieces < 1.5 * once + 0.002, (once, pieces)
