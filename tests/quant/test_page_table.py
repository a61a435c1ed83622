"""``PageTable``: page allocation from host-known lengths (no device read) against the device-read path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant.quant.paged import PageTable


def _check_table(pt: PageTable) -> None:
    """Every sequence's first ``pages_per_seq[b]`` columns hold distinct allocated ids, the rest -1; the host mirror
    agrees with the device counts."""
    assert pt._pages_host == pt.pages_per_seq.tolist()
    ids = []
    for b, n in enumerate(pt._pages_host):
        row = pt.table[b].tolist()
        assert all(0 <= i < pt.n_pages for i in row[:n]) and all(i == -1 for i in row[n:])
        ids += row[:n]
    assert sorted(ids) == list(range(pt.n_pages))
    assert pt.capacity >= pt.n_pages


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), page=st.sampled_from([32, 64]),
       steps=st.lists(st.lists(st.integers(0, 300), min_size=5, max_size=5), min_size=1, max_size=6),
       exact=st.booleans())
def test_reserve_from_host_lengths_matches_tensor_lengths(batch: int, page: int, steps: list[list[int]],
                                                          exact: bool) -> None:
    a, b = PageTable(batch, page, "cpu"), PageTable(batch, page, "cpu")
    for want in steps:
        lengths = want[:batch]
        got_a = a.reserve(lengths, exact=exact)
        got_b = b.reserve(torch.tensor(lengths), exact=exact)
        assert torch.equal(got_a, got_b)
        assert torch.equal(a.table, b.table) and torch.equal(a.pages_per_seq, b.pages_per_seq)
        assert a.n_pages == b.n_pages
        _check_table(a)
        assert all(n * page >= length for n, length in zip(a._pages_host, lengths))


def test_reserve_refuses_a_wrong_number_of_lengths() -> None:
    with pytest.raises(ValueError, match="one entry per sequence"):
        PageTable(3, 32, "cpu").reserve([10, 20])


def test_select_keeps_the_host_mirror() -> None:
    pt = PageTable(3, 32, "cpu")
    pt.reserve([40, 100, 0])
    new, _ = pt.select(torch.tensor([1, 1, 0]))
    _check_table(new)
    assert new._pages_host == [4, 4, 2]
    new.reserve([200, 10, 70])
    _check_table(new)
