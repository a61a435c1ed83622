"""Paged token storage shared by a batch of variable-length sequences.

Tokens of every sequence are stored compactly in fixed-size pages drawn from one pool (as in paged
attention): padding takes no space, and a sequence wastes at most the unused tail of its last page.
The pool and the per-sequence page table grow geometrically by a quarter, so appends are amortised O(1).
"""

from __future__ import annotations

import torch

from kvquant.sparse.growth import grown_capacity


class PageTable:
    """Page allocation for ``batch`` sequences.

    Attributes:
        table: ``[B, max_pages]`` int32 page ids (-1 where unallocated).
        pages_per_seq: ``[B]`` int64 pages allocated to each sequence.
        n_pages: pages in use in the pool (allocated ids are ``0 .. n_pages-1``).
        pools: named tensors whose first axis is the page id; they grow with the pool.
    """

    def __init__(self, batch: int, page_size: int, device: torch.device | str, initial_pages: int = 4) -> None:
        self.batch = batch
        self.page_size = page_size
        self.device = torch.device(device)
        self.table = torch.full((batch, 4), -1, dtype=torch.int32, device=self.device)
        self.pages_per_seq = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._pages_host = [0] * batch  # pages_per_seq on the host: allocation decisions read no device
        self.n_pages = 0
        self.capacity = max(initial_pages, 1)
        self.pools: dict[str, torch.Tensor] = {}

    def add_pool(self, name: str, per_page_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.pools[name] = torch.zeros((self.capacity, *per_page_shape), dtype=dtype, device=self.device)
        return self.pools[name]

    def _grow_pool(self, need: int, exact: bool = False) -> None:
        if need <= self.capacity:
            return
        cap = need if exact else grown_capacity(self.capacity, need)
        for name, t in self.pools.items():
            new = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
            new[: self.n_pages] = t[: self.n_pages]
            self.pools[name] = new
        self.capacity = cap

    def reserve(self, lengths: torch.Tensor | list[int], exact: bool = False) -> torch.Tensor:
        """Allocate pages so that sequence ``b`` can hold ``lengths[b]`` tokens.

        The pools grow by a quarter (amortised O(1) appends) unless ``exact``, which sizes them to what is
        asked (a known budget, e.g. ``max_new_tokens``: no slack). ``lengths`` given as a list of ints (known on
        the host) reads nothing from the device; a tensor is read once.

        Returns:
            ``[n_new]`` ids of the pages allocated now (fresh pages, all zero), in sequence order.
        """
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.reshape(-1).tolist()
        if len(lengths) != self.batch:
            raise ValueError(f"lengths must have one entry per sequence ({self.batch}), got {len(lengths)}")
        T = self.page_size
        need = [(int(n) + T - 1) // T for n in lengths]
        extra = [max(n - have, 0) for n, have in zip(need, self._pages_host)]
        total = sum(extra)
        if total == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        self._grow_pool(self.n_pages + total, exact)
        width = max(need)
        if width > self.table.shape[1]:
            grown = torch.full((self.batch, grown_capacity(self.table.shape[1], width)), -1, dtype=torch.int32,
                               device=self.device)
            grown[:, : self.table.shape[1]] = self.table
            self.table = grown
        rows = [b for b, e in enumerate(extra) for _ in range(e)]
        cols = [self._pages_host[b] + k for b, e in enumerate(extra) for k in range(e)]
        new_ids = self.n_pages + torch.arange(total, device=self.device)
        index = torch.tensor([rows, cols], dtype=torch.int64).to(self.device, non_blocking=True)
        self.table[index[0], index[1]] = new_ids.to(torch.int32)
        self.pages_per_seq += torch.tensor(extra, dtype=torch.int64).to(self.device, non_blocking=True)
        self._pages_host = [have + e for have, e in zip(self._pages_host, extra)]
        self.n_pages += total
        return new_ids

    def locate(self, seq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Page id and offset of token ``pos[i]`` of sequence ``seq[i]`` (pages must be reserved)."""
        page = self.table[seq, pos // self.page_size].long()
        return page, pos % self.page_size

    def select(self, index: torch.Tensor) -> tuple[PageTable, torch.Tensor]:
        """A compacted copy holding sequences ``index`` (duplicates allowed; pages are copied, never
        shared, so later appends cannot collide). Returns the new table and the old ids of its pages."""
        index = index.to(self.device, torch.int64)
        new = PageTable(index.numel(), self.page_size, self.device, 1)
        counts = self.pages_per_seq[index]
        total = int(counts.sum())
        cols = torch.arange(max(int(counts.max()) if counts.numel() else 0, 1), device=self.device)
        valid = cols[None, :] < counts[:, None]
        old_ids = self.table[index][:, : cols.numel()][valid].long()
        new.capacity = max(total, 1)
        new.table = torch.full((index.numel(), cols.numel()), -1, dtype=torch.int32, device=self.device)
        new.table[valid] = torch.arange(total, device=self.device, dtype=torch.int32)
        new.pages_per_seq = counts.clone()
        new._pages_host = counts.tolist()
        new.n_pages = total
        for name, t in self.pools.items():
            pool = torch.zeros((new.capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
            pool[:total] = t[old_ids]
            new.pools[name] = pool
        return new, old_ids

    def nbytes(self) -> int:
        """Bytes of the page table itself (columns in use)."""
        return int(self.batch * max(int(self.pages_per_seq.max()) if self.batch else 0, 0) * 4)
