import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant import BlockedCSCMatrix, BlockedCSRMatrix


@settings(max_examples=40, deadline=None)
@given(n_inner=st.integers(1, 40), steps=st.lists(st.integers(1, 9), min_size=1, max_size=12),
       density=st.floats(0.0, 0.6), block=st.integers(1, 16), seed=st.integers(0, 2**31 - 1),
       csc=st.booleans())
def test_random_appends_match_dense(n_inner, steps, density, block, seed, csc):
    """Random batched and single appends in shuffled slot order, crossing many block boundaries."""
    g = torch.Generator().manual_seed(seed)
    total = sum(steps)
    dense = torch.randn(total, n_inner, generator=g).half()
    dense *= (torch.rand(total, n_inner, generator=g) < density)
    order = torch.randperm(total, generator=g)  # slots arrive in any order (decode interleaving)
    cls = BlockedCSCMatrix if csc else BlockedCSRMatrix
    m = cls(n_inner, torch.float16, "cpu", block, 1)
    start = 0
    for k in steps:
        slots = order[start:start + k]
        if k == 1:
            s = int(slots[0])
            idx = dense[s].nonzero().flatten()
            m.append_token(dense[s, idx], idx, slot=s)
        else:
            m.append_dense(slots, dense[slots], dense[slots] != 0)
        start += k
    assert m.nnz == int((dense != 0).sum())
    expect = dense.T if csc else dense
    assert torch.equal(m.to_dense(total), expect)
    val, idx, ptr = m.to_standard_csc(total) if csc else m.to_standard_csr(total)
    assert torch.equal(m.to_torch_sparse(total).to_dense(), expect)
    ref = expect.T.to_sparse_csr() if csc else expect.to_sparse_csr()
    assert torch.equal(ptr, ref.crow_indices())
    assert torch.equal(idx, ref.col_indices())
    assert torch.equal(val, ref.values())
    assert m.capacity_nnz % block == 0


def test_append_token_next_column_and_exact_values():
    m = BlockedCSCMatrix(8, torch.float16, "cpu", block_nnz=2)
    v = torch.tensor([1e4, -3.140625], dtype=torch.float16)
    assert m.append_token(v, torch.tensor([7, 0])) == 0
    assert m.append_token(torch.tensor([], dtype=torch.float16), torch.tensor([], dtype=torch.long)) == 1
    assert m.append_token(v[:1], torch.tensor([3])) == 2
    d = m.to_dense()
    assert d.shape == (8, 3)
    assert d[7, 0] == v[0] and d[0, 0] == v[1] and d[3, 2] == v[0] and d[:, 1].abs().sum() == 0
    owner, idx, val = m.entries_of(torch.tensor([0]))
    assert idx.tolist() == [0, 7] and val.tolist() == [v[1].item(), v[0].item()]  # stored sorted by index
    with pytest.raises(ValueError, match="same length"):
        m.append_token(v, torch.tensor([1]))


def test_growth_is_amortised():
    """Capacity doubles: 10k single-token appends cause only O(log n) reallocations."""
    m = BlockedCSRMatrix(16, torch.float16, "cpu", block_nnz=4, initial_rows=1)
    reallocs, cap = 0, m.capacity_nnz
    for _ in range(10_000):
        m.append_token(torch.ones(2, dtype=torch.float16), torch.tensor([1, 5]))
        if m.capacity_nnz != cap:
            reallocs, cap = reallocs + 1, m.capacity_nnz
    assert m.nnz == 20_000
    assert reallocs <= 15


def test_nbytes_counts_blocks_and_slots():
    m = BlockedCSRMatrix(100, torch.float16, "cpu", block_nnz=8)
    m.append_token(torch.ones(3, dtype=torch.float16), torch.tensor([1, 2, 3]))
    # one block of 8 entries x (2 B value + 2 B index) + one slot x (4 B start + 2 B count)
    assert m.nbytes() == 8 * 4 + 6


def test_bad_input():
    m = BlockedCSCMatrix(4)
    with pytest.raises(ValueError, match="indices"):
        m.append_token(torch.ones(1), torch.tensor([4]))
    with pytest.raises(ValueError, match="counts sum"):
        m.append_slots(torch.tensor([0]), torch.tensor([2]), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        BlockedCSRMatrix(0)
