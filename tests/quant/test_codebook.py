"""Codebooks: heuristic, k-means NUQ and uniform; bad input."""

import pytest
import torch

from kvquant import (
    Codebook,
    compute_nuq_codebook,
    create_heuristic_codebook,
    create_uniform_codebook,
)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebooks_sorted_symmetric_and_roundtrip(bits, tmp_path, seed):
    h = create_heuristic_codebook(f"nuq{bits}")
    u = create_uniform_codebook(bits)
    assert h.levels.numel() == 2**bits and (h.levels.diff() > 0).all()
    torch.testing.assert_close(h.levels, -h.levels.flip(0), rtol=0, atol=1e-4)
    x = torch.randn(5000).clamp(-1, 1)
    codes = h.encode(x)
    brute = (x[:, None] - h.levels[None]).abs().argmin(1)  # midpoint search == nearest level
    assert torch.equal(codes.long(), brute)
    assert torch.equal(u.levels, torch.linspace(-1, 1, 2**bits))
    h.save(tmp_path / "cb.safetensors")
    assert torch.equal(Codebook.load(tmp_path / "cb.safetensors").levels, h.levels)


def test_kmeans_deterministic_weighted_and_better_than_heuristic(seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.distributions.Laplace(0.0, 0.2).sample((20000,)).clamp(-1, 1)
    a = compute_nuq_codebook(data, 3, seed=1, max_samples=5000)
    b = compute_nuq_codebook(data, 3, seed=1, max_samples=5000)
    assert torch.equal(a.levels, b.levels)
    full = compute_nuq_codebook(data, 3)

    def mse(cb):
        return float(((cb.decode(cb.encode(data)) - data) ** 2).mean())

    assert mse(full) < mse(create_heuristic_codebook("nuq3")) and mse(full) < mse(create_uniform_codebook(3))
    w = torch.ones_like(data)
    w[data > 0] = 50.0  # weight the positive side: more levels go there
    wcb = compute_nuq_codebook(data, 3, weights=w)
    assert int((wcb.levels > 0).sum()) > int((full.levels > 0).sum())
    del g


def test_codebook_bad_input(tmp_path):
    with pytest.raises(ValueError, match="strictly increasing"):
        Codebook(torch.tensor([0.0, 0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="4, 8 or 16"):
        Codebook(torch.linspace(-1, 1, 5))
    with pytest.raises(ValueError, match="NaN"):
        compute_nuq_codebook(torch.tensor([float("nan")] * 20), 2)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read codebook"):
        Codebook.load(bad)
