import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant import BlockedCSCMatrix, BlockedCSRMatrix
from kvquant.sparse.blocked import index_dtype, largest_group


def sparse_rows(n: int, n_inner: int, density: float, g: torch.Generator) -> torch.Tensor:
    dense = torch.randn(n, n_inner, generator=g).half()
    dense *= torch.rand(n, n_inner, generator=g) < density
    dense[dense == 0] = 0  # no negative zeros: nonzero() and the dense comparison agree
    return dense


# -- BlockedCSCMatrix: a column per token slot --------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 5), group=st.sampled_from([1, 3, 8, 16]),
       steps=st.lists(st.tuples(st.sampled_from(["slots", "token", "dense", "alloc"]), st.integers(1, 7)),
                      min_size=1, max_size=10),
       density=st.floats(0.0, 0.8), block=st.integers(1, 16), seed=st.integers(0, 2**31 - 1),
       n_select=st.integers(0, 9))
def test_csc_every_writer_matches_dense(heads, group, steps, density, block, seed, n_select):
    """Columns appended in shuffled slot order by every writer (one token, dense rows, slot lists, the kernels'
    allocate-then-fill) read back as the dense matrix, the textbook CSC and torch's sparse CSC; per-head counts are
    exact and each head's run holds exactly its channels, ascending; entries grow in whole blocks."""
    g = torch.Generator().manual_seed(seed)
    n_inner = heads * group
    total = sum(k for _, k in steps)
    dense = sparse_rows(total, n_inner, density, g)
    order = torch.randperm(total, generator=g)
    m = BlockedCSCMatrix(n_inner, torch.float16, "cpu", block, 1, group_size=group)
    start = 0
    for kind, k in steps:
        slots = order[start:start + k]
        rows = dense[slots]
        if kind == "token":
            for s in slots.tolist():
                idx = dense[s].nonzero().flatten()
                perm = torch.randperm(idx.numel(), generator=g)  # any order in, sorted out
                m.append_token(dense[s, idx[perm]], idx[perm], slot=s)
        elif kind == "dense":
            m.append_dense(slots, rows, rows != 0)
        elif kind == "slots":
            r, c = (rows != 0).nonzero(as_tuple=True)
            m.append_slots(slots, (rows != 0).sum(1), rows[r, c], c)
        else:
            mask = rows != 0
            counts = mask.sum(1)
            hc = mask.reshape(k, heads, group).sum(2)
            starts = m.allocate_slots(slots, counts, int(counts.sum()), head_counts=hc)
            r, c = mask.nonzero(as_tuple=True)
            pos = starts[r] + torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r]
            m.values[pos], m.indices[pos] = rows[r, c], (c % group).to(m.indices.dtype)
        start += k
    assert m.nnz == int((dense != 0).sum()) and m.n_slots == total
    assert m.capacity_nnz % block == 0
    assert torch.equal(m.to_dense(total), dense.T)
    assert torch.equal(m.to_torch_sparse(total).to_dense(), dense.T)
    val, idx, ptr = m.to_standard_csc(total)
    ref = dense.to_sparse_csr()  # rows of `dense` are the matrix's columns
    assert torch.equal(ptr, ref.crow_indices()) and torch.equal(idx, ref.col_indices())
    assert torch.equal(val, ref.values())
    hc = m.head_counts[:total].long()
    assert torch.equal(hc, (dense != 0).reshape(total, heads, group).sum(2))
    first = m.slot_start[:total].long()[:, None] + torch.cumsum(hc, 1) - hc
    for s in range(total):
        for h in range(heads):
            local = m.indices[first[s, h]: first[s, h] + hc[s, h]].long()
            assert (local < group).all() and (local.diff() > 0).all()
            assert torch.equal(m.values[first[s, h]: first[s, h] + hc[s, h]], dense[s, h * group + local])
    sel = torch.randint(0, total, (n_select,), generator=g)
    new = m.select_slots(sel)
    assert torch.equal(new.to_dense(n_select), dense[sel].T)
    assert new.nbytes() - new.nbytes(0) == n_select * (4 + new.n_groups)


def test_csc_indices_are_compact_and_growth_amortised():
    m = BlockedCSCMatrix(4096, torch.float16, "cpu", block_nnz=4, initial_cols=1, group_size=128)
    assert m.indices.dtype == torch.uint8 and index_dtype(300) == torch.int16
    reallocs, cap = 0, m.capacity_nnz
    for _ in range(5_000):
        m.append_token(torch.ones(2, dtype=torch.float16), torch.tensor([1, 4000]))
        if m.capacity_nnz != cap:
            reallocs, cap = reallocs + 1, m.capacity_nnz
    assert m.nnz == 10_000 and reallocs <= math.ceil(math.log(10_000, 1.25))  # geometric: logarithmically many
    # one block of entries x (2 B value + 1 B channel) + a slot x (4 B start + 32 head counts)
    m = BlockedCSCMatrix(4096, torch.float16, "cpu", block_nnz=8, group_size=128)
    m.append_token(torch.ones(3, dtype=torch.float16), torch.tensor([1, 2, 3]))
    assert m.nbytes() == 8 * 3 + 4 + 32


def test_csc_async_counters_stay_on_the_device_until_read():
    m = BlockedCSCMatrix(8, torch.float16, "cpu", block_nnz=4, group_size=4)
    dev = m.begin_async_append(max_total=16, top_bound=4)
    assert m.capacity_nnz >= 16 and m.nnz_upper == 16
    dev[0] += 5
    dev[1] = 3
    assert (m.nnz, m.n_slots) == (5, 3) and m.nnz_upper == 5
    dev = m.device_counters()
    dev[2] = 1  # a captured step ran out of room
    with pytest.raises(RuntimeError, match="reserved capacity"):
        _ = m.nnz


def test_csc_bad_input():
    m = BlockedCSCMatrix(4, group_size=4)
    with pytest.raises(ValueError, match="indices"):
        m.append_token(torch.ones(1), torch.tensor([4]))
    with pytest.raises(ValueError, match="counts sum"):
        m.append_slots(torch.tensor([0]), torch.tensor([2]), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="same length"):
        m.append_token(torch.ones(2), torch.tensor([1]))
    with pytest.raises(ValueError, match="positive"):
        BlockedCSCMatrix(0)
    with pytest.raises(ValueError, match="divisor"):
        BlockedCSCMatrix(10, group_size=3)
    with pytest.raises(ValueError, match="255"):
        BlockedCSCMatrix(512, group_size=256)
    assert BlockedCSCMatrix(300).group_size == largest_group(300) == 150
    with pytest.raises(ValueError, match="head_counts"):
        BlockedCSCMatrix(8, group_size=4).allocate_slots(torch.tensor([0]), torch.tensor([1]), 1,
                                                         head_counts=torch.ones(1, 3))


# -- BlockedCSRMatrix: a block per page, a row per channel ----------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), channels=st.sampled_from([1, 8, 16]), T=st.sampled_from([1, 4, 32]),
       n=st.integers(1, 4), per_token=st.integers(0, 6), seed=st.integers(0, 2**31 - 1))
def test_csr_blocks_match_dense(heads, channels, T, n, per_token, seed):
    """Pages written as blocks (any block ids) read back as the dense values at the masked places, with each head's
    entries sorted by channel then token, and the textbook CSR of each (page, head) equal to torch's."""
    g = torch.Generator().manual_seed(seed)
    H, D = heads, channels
    per_token = min(per_token, H * D)
    dense = torch.randn(n, H, T, D, generator=g).half()
    # at most `per_token` entries per token (over all heads): the k largest |x| of each token
    k = per_token
    mag = dense.float().abs().transpose(1, 2).reshape(n, T, H * D)
    keep = torch.zeros_like(mag, dtype=torch.bool)
    if k:
        keep.scatter_(2, mag.topk(k, dim=2).indices, True)
    mask = keep.reshape(n, T, H, D).transpose(1, 2) & (torch.rand(n, H, T, D, generator=g) < 0.7)
    m = BlockedCSRMatrix(H, D, T, per_token, torch.float16, "cpu")
    blocks = torch.randperm(2 * n, generator=g)[:n]
    m.reserve(2 * n)
    m.write_blocks(blocks, dense, mask)
    got = m.to_dense(blocks)
    assert torch.equal(got, torch.where(mask, dense, torch.zeros_like(dense)))
    assert m.nnz_of(blocks) == int(mask.sum())
    owner, head, chan, tok, val = m.entries(blocks)
    key = ((owner * H + head) * D + chan) * T + tok
    assert (key.diff() > 0).all()  # ordered by block, head, channel, token
    for i in range(n):
        for h in range(H):
            val_, idx, ptr = m.to_standard_csr(int(blocks[i]), h)
            ref = torch.where(mask[i, h], dense[i, h], torch.zeros_like(dense[i, h])).T.contiguous().to_sparse_csr()
            assert torch.equal(ptr, ref.crow_indices()) and torch.equal(idx, ref.col_indices())
            assert torch.equal(val_, ref.values())
    other = torch.tensor([int(b) for b in range(2 * n) if b not in blocks.tolist()][:n])
    m.copy_blocks(blocks[: other.numel()], other)
    assert torch.equal(m.to_dense(other), got[: other.numel()])


def test_csr_accounting_and_limits():
    m = BlockedCSRMatrix(2, 8, 4, per_token=3)
    # a block: 4 tokens x 3 entries x (2 B value + 1 B token), counts [2, 8] uint8, head starts [2] int32
    assert m.nbytes(1) == 4 * 3 * 3 + 16 + 8
    with pytest.raises(ValueError, match="more than per_token"):
        m.write_blocks(torch.tensor([0]), torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[n, H, T, D\]"):
        m.write_blocks(torch.tensor([0]), torch.ones(1, 2, 4, 7), torch.ones(1, 2, 4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_len"):
        BlockedCSRMatrix(2, 8, 300, 1)
    with pytest.raises(ValueError, match="per_token"):
        BlockedCSRMatrix(2, 8, 4, 17)
    m.reserve(5)
    assert m.capacity_blocks >= 5
