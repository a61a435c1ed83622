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
    # one block of 8 entries x (2 B value + 2 B index) + one slot x (4 B start + 2 B count + 1 B group count)
    assert m.nbytes() == 8 * 4 + 7
    m = BlockedCSRMatrix(100, torch.float16, "cpu", block_nnz=8, group_size=20)
    m.append_token(torch.ones(3, dtype=torch.float16), torch.tensor([1, 2, 3]))
    assert m.nbytes() == 8 * 4 + 6 + 5  # 5 groups


def test_bad_input():
    m = BlockedCSCMatrix(4)
    with pytest.raises(ValueError, match="indices"):
        m.append_token(torch.ones(1), torch.tensor([4]))
    with pytest.raises(ValueError, match="counts sum"):
        m.append_slots(torch.tensor([0]), torch.tensor([2]), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        BlockedCSRMatrix(0)
    with pytest.raises(ValueError, match="divisor"):
        BlockedCSRMatrix(10, group_size=3)
    with pytest.raises(ValueError, match="255"):
        BlockedCSRMatrix(512, group_size=256)
    assert BlockedCSRMatrix(300).group_size == 150  # default: the largest divisor <= 255 (uint8 counts)
    assert BlockedCSRMatrix(4096).group_size == 128 and BlockedCSRMatrix(64).group_size == 64
    with pytest.raises(ValueError, match="head_counts"):
        BlockedCSRMatrix(8, group_size=4).allocate_slots(torch.tensor([0]), torch.tensor([1]), 1,
                                                         head_counts=torch.ones(1, 3))


def recount(m, n_slots: int) -> torch.Tensor:
    """``[n_slots, G]`` per-group entry counts recomputed from the stored entries."""
    owner, idx, _ = m.entries_of(torch.arange(n_slots))
    out = torch.zeros(n_slots, m.n_groups, dtype=torch.int64)
    out.index_put_((owner, idx // m.group_size), torch.ones_like(owner), accumulate=True)
    return out


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 6), group=st.sampled_from([1, 2, 3, 8, 16]), shared=st.booleans(),
       steps=st.lists(st.tuples(st.sampled_from(["slots", "token", "dense", "alloc"]), st.integers(1, 7)),
                      min_size=1, max_size=10),
       density=st.floats(0.0, 1.0), block=st.integers(1, 16), seed=st.integers(0, 2**31 - 1),
       csc=st.booleans(), n_select=st.integers(0, 12))
def test_head_counts_exact_through_every_writer(heads, group, shared, steps, density, block, seed, csc, n_select):
    """``head_counts[slot, g]`` equals a recount of the slot's entries with ``index // group_size == g`` after
    any mix of writers (shuffled slot order, growth of slots and blocks from one slot / one block), and after
    ``select_slots``; the entries stay sorted, so group ``g``'s run starts at ``start + sum(counts[:g])``."""
    g = torch.Generator().manual_seed(seed)
    n_inner = heads * group
    gs = n_inner if shared and n_inner <= 255 else group
    total = sum(k for _, k in steps)
    dense = torch.randn(total, n_inner, generator=g).half()
    dense *= (torch.rand(total, n_inner, generator=g) < density)
    dense[dense == 0] *= 0  # no negative zeros: nonzero() and the dense comparison agree
    order = torch.randperm(total, generator=g)
    cls = BlockedCSCMatrix if csc else BlockedCSRMatrix
    m = cls(n_inner, torch.float16, "cpu", block, 1, group_size=gs)
    assert m.n_groups == n_inner // gs and m.head_counts.shape == (1, m.n_groups)
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
        else:
            r, c = (rows != 0).nonzero(as_tuple=True)
            if kind == "slots":
                m.append_slots(slots, (rows != 0).sum(1), rows[r, c], c)
            else:  # a kernel's path: allocate, fill in place, counts given or recounted
                counts = (rows != 0).sum(1)
                starts = m.allocate_slots(slots, counts, int(counts.sum()),
                                          head_counts=recount_rows(rows, gs) if k % 2 else None)
                pos = torch.repeat_interleave(starts, counts) + torch.arange(r.numel()) - torch.repeat_interleave(
                    torch.cumsum(counts, 0) - counts, counts)
                m.values[pos], m.indices[pos] = rows[r, c], c.to(m.indices.dtype)
                if not k % 2:
                    m.recount_groups(slots)
        start += k
    assert m.head_counts.shape[0] >= m.n_slots == total
    assert torch.equal(m.head_counts[:total].long(), recount(m, total))
    assert torch.equal(m.head_counts[:total].long(), recount_rows(dense, gs))
    assert torch.equal(m.head_counts[:total].long().sum(1), m.slot_count[:total].long())
    # run of group g = [start + sum(counts[:g]), + counts[g]) holds exactly the group's channels
    hc = m.head_counts[:total].long()
    first = m.slot_start[:total].long()[:, None] + torch.cumsum(hc, 1) - hc
    for s in range(total):
        for grp in range(m.n_groups):
            ch = m.indices[first[s, grp]: first[s, grp] + hc[s, grp]].long()
            assert ((ch // gs) == grp).all() and (ch.diff() > 0).all()
    sel = torch.randint(0, total, (n_select,), generator=g)
    new = m.select_slots(sel)
    assert new.group_size == gs
    assert torch.equal(new.head_counts[:n_select].long(), recount_rows(dense[sel], gs))
    assert new.nbytes() - new.nbytes(0) == n_select * (6 + new.n_groups)


def recount_rows(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[n, G]`` nonzeros of dense rows ``[n, n_inner]`` per group of ``group_size`` channels."""
    return (rows != 0).reshape(rows.shape[0], rows.shape[1] // group_size, group_size).sum(2)


@settings(max_examples=40, deadline=None)
@given(group=st.sampled_from([1, 4, 8]), n_groups=st.integers(1, 4),
       steps=st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=14),
       density=st.floats(0.0, 0.7), block=st.integers(1, 16), seed=st.integers(0, 2**31 - 1), csc=st.booleans())
def test_async_allocation_matches_synced_appends(group, n_groups, steps, density, block, seed, csc):
    """``allocate_slots_async`` (the count stays on the device; worst-case room reserved) interleaved with synced
    appends stores exactly what synced appends alone store; ``nnz`` / ``n_slots`` resolve to the true values."""
    g = torch.Generator().manual_seed(seed)
    n_inner = group * n_groups
    total = sum(k for k, _ in steps)
    dense = torch.randn(total, n_inner, generator=g).half()
    dense *= (torch.rand(total, n_inner, generator=g) < density)
    order = torch.randperm(total, generator=g)
    cls = BlockedCSCMatrix if csc else BlockedCSRMatrix
    ref, got = (cls(n_inner, torch.float16, "cpu", block, 1, group_size=group) for _ in range(2))
    start = 0
    for k, use_async in steps:
        slots = order[start:start + k]
        start += k
        rows = dense[slots]
        ref.append_dense(slots, rows, rows != 0)
        if not use_async:
            got.append_dense(slots, rows, rows != 0)
            continue
        mask = rows != 0
        counts = mask.sum(1)
        hc = mask.reshape(k, n_groups, group).sum(2)
        starts = got.allocate_slots_async(slots, counts, k * n_inner, int(slots.max()) + 1, hc)
        r, c = mask.nonzero(as_tuple=True)  # row-major: by slot, channels ascending
        pos = starts[r] + torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r]
        got.values[pos], got.indices[pos] = rows[r, c], c.to(got.index_dtype)
        assert got.nnz_upper >= ref.nnz  # the host bound never undercounts (read without resolving)
    assert (got.nnz, got.n_slots) == (ref.nnz, ref.n_slots)
    assert got.nnz_upper == got.nnz  # a read resolves the bound too
    assert torch.equal(got.to_dense(total), ref.to_dense(total))
    assert torch.equal(got.head_counts[:total], ref.head_counts[:total])
