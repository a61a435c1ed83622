"""The storage scheme both blocked outlier matrices share (:mod:`kvquant.sparse.blocked` describes it): entries
(value, channel) in buffers that grow in whole blocks, a ``(start, count)`` pair and per-group counts per slot."""

from __future__ import annotations

import torch


def _grow(t: torch.Tensor, n: int, fill: int | float = 0) -> torch.Tensor:
    out = torch.full((n, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def largest_group(n: int, limit: int = 255) -> int:
    """The largest divisor of ``n`` that is ``<= limit`` (a channel group whose counts fit in uint8)."""
    return next(g for g in range(min(n, limit), 0, -1) if n % g == 0)


class BlockedSlotMatrix:
    """Shared storage of :class:`BlockedCSCMatrix` and :class:`BlockedCSRMatrix`."""

    def __init__(
        self,
        n_inner: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        block_nnz: int = 1024,
        initial_slots: int = 64,
        group_size: int | None = None,
    ) -> None:
        if n_inner <= 0:
            raise ValueError(f"n_inner (channels) must be positive, got {n_inner}")
        if block_nnz <= 0:
            raise ValueError(f"block_nnz must be positive, got {block_nnz}")
        group_size = largest_group(n_inner) if group_size is None else int(group_size)
        if group_size <= 0 or n_inner % group_size:
            raise ValueError(f"group_size must be a positive divisor of n_inner = {n_inner}, got {group_size}")
        if group_size > 255:
            raise ValueError(f"group_size must be <= 255 (per-group counts are uint8), got {group_size}; "
                             f"pass group_size=head_dim")
        self.n_inner = n_inner
        self.group_size = group_size
        self.n_groups = n_inner // group_size
        self.block_nnz = block_nnz
        self.index_dtype = torch.int16 if n_inner <= 2**15 else torch.int32
        self.count_dtype = torch.int16 if n_inner < 2**15 else torch.int32
        self.values = torch.empty(block_nnz, dtype=dtype, device=device)
        self.indices = torch.empty(block_nnz, dtype=self.index_dtype, device=device)
        self.slot_start = torch.zeros(max(initial_slots, 1), dtype=torch.int32, device=device)
        self.slot_count = torch.zeros(max(initial_slots, 1), dtype=self.count_dtype, device=device)
        # [slot_capacity, G] entries of each slot per channel group (<= group_size <= 255)
        self.head_counts = torch.zeros(max(initial_slots, 1), self.n_groups, dtype=torch.uint8, device=device)
        self._nnz = 0
        self._n_slots = 0  # one past the highest slot written
        # appends made without a device sync (begin_async_append) keep (nnz, n_slots) on the device, in
        # _dev_counts [2] int64, advanced in place by the writer; the host reads them back (one sync) the next
        # time it needs them. Meanwhile _nnz_upper bounds nnz on the host.
        self._dev_counts: torch.Tensor | None = None
        self._dev_ahead = False  # the device counts hold appends the host has not read yet
        self._nnz_upper = 0

    # -- properties -----------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        """Entries stored (a device sync after appends through :meth:`begin_async_append`)."""
        self._resolve()
        return self._nnz

    @nnz.setter
    def nnz(self, value: int) -> None:
        self._resolve()
        self._nnz = self._nnz_upper = int(value)

    @property
    def n_slots(self) -> int:
        """One past the highest slot written (a device sync after :meth:`begin_async_append`)."""
        self._resolve()
        return self._n_slots

    @n_slots.setter
    def n_slots(self, value: int) -> None:
        self._resolve()
        self._n_slots = int(value)

    @property
    def nnz_upper(self) -> int:
        """An upper bound of :attr:`nnz` known on the host (no sync); equal to it after a sync."""
        return self._nnz_upper

    def _resolve(self) -> None:
        if not self._dev_ahead:
            return
        nnz, top = self._dev_counts.tolist()
        self._dev_ahead = False
        self._nnz = self._nnz_upper = int(nnz)
        self._n_slots = max(self._n_slots, int(top))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def capacity_nnz(self) -> int:
        return self.values.shape[0]

    # -- growth ---------------------------------------------------------------------------------------
    def reserve(self, nnz: int | None = None, slots: int | None = None, exact: bool = False) -> None:
        """Make room for ``nnz`` entries and ``slots`` slots in total (amortised: at least doubles, unless
        ``exact``; entries are always allocated in whole blocks)."""
        if nnz is not None and nnz > self.capacity_nnz:
            want = nnz if exact else max(nnz, 2 * self.capacity_nnz)
            want = -(-want // self.block_nnz) * self.block_nnz
            self.values = _grow(self.values[: self.nnz], want)
            self.indices = _grow(self.indices[: self.nnz], want)
        if slots is not None and slots > self.slot_start.shape[0]:
            want = slots if exact else max(slots, 2 * self.slot_start.shape[0])
            self.slot_start = _grow(self.slot_start, want)
            self.slot_count = _grow(self.slot_count, want)
            self.head_counts = _grow(self.head_counts, want)

    # -- appends --------------------------------------------------------------------------------------
    def append_slots(
        self, slots: torch.Tensor, counts: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
    ) -> None:
        """Batched append: slot ``slots[i]`` gets the next ``counts[i]`` entries of ``values``/``indices``.

        Args:
            slots: ``[n]`` int, distinct, not written before.
            counts: ``[n]`` int, entries per slot, ``sum(counts) == len(values)``.
            values: ``[nnz]`` exact outlier values. indices: ``[nnz]`` channel index in ``[0, n_inner)``.
        """
        slots = slots.to(self.device, torch.int64).reshape(-1)
        counts = counts.to(self.device, torch.int64).reshape(-1)
        if slots.numel() != counts.numel():
            raise ValueError(f"slots has {slots.numel()} entries but counts has {counts.numel()}")
        total = int(counts.sum()) if counts.numel() else 0
        if values.numel() != total or indices.numel() != total:
            raise ValueError(f"counts sum to {total} but got {values.numel()} values, {indices.numel()} indices")
        if total and (int(indices.min()) < 0 or int(indices.max()) >= self.n_inner):
            raise ValueError(f"outlier indices must be in [0, {self.n_inner})")
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0:
            raise ValueError("slot ids must be non-negative")
        top = int(slots.max()) + 1
        self.reserve(nnz=self.nnz + total, slots=top)
        starts = self.nnz + torch.cumsum(counts, 0) - counts
        self.slot_start[slots] = starts.to(torch.int32)
        self.slot_count[slots] = counts.to(self.count_dtype)
        owner = torch.repeat_interleave(torch.arange(slots.numel(), device=self.device), counts)
        self.head_counts[slots] = self._group_counts(owner, indices.reshape(-1), slots.numel())
        self.values[self.nnz : self.nnz + total] = values.reshape(-1).to(self.dtype)
        self.indices[self.nnz : self.nnz + total] = indices.reshape(-1).to(self.index_dtype)
        self.nnz += total
        self.n_slots = max(self.n_slots, top)

    def _group_counts(self, owner: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
        """``[n, G]`` uint8: entries of each owner ``0 .. n-1`` per channel group (``owner``, ``indices``:
        ``[nnz]``)."""
        group = indices.to(self.device, torch.int64) // self.group_size
        key = owner.to(self.device, torch.int64) * self.n_groups + group
        return torch.bincount(key, minlength=n * self.n_groups).reshape(n, self.n_groups).to(torch.uint8)

    def allocate_slots(
        self, slots: torch.Tensor, counts: torch.Tensor, total: int, top: int | None = None,
        head_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Batched append whose entries a kernel writes in place (no intermediate copy).

        Reserves ``total`` entries after the current ones and gives slot ``slots[i]`` the next ``counts[i]``
        of them (exactly the layout :meth:`append_slots` writes). The caller must then fill
        ``values[starts[i] : starts[i] + counts[i]]`` and ``indices[...]`` (channels ascending within a slot;
        the decode kernel relies on it) before anything reads the matrix, and give the per-group counts:
        ``head_counts`` here, or :meth:`recount_groups` after filling the indices.

        Args:
            slots: ``[n]`` int, distinct, not written before. counts: ``[n]`` int, ``sum(counts) == total``.
            total: number of entries (a host int: the caller already knows it).
            top: ``max(slots) + 1`` if the caller knows it (saves a device sync).
            head_counts: ``[n, G]`` int, entries of slot ``slots[i]`` in channel group ``g`` (rows sum to
                ``counts``; not checked: no device sync). ``None``: rows left zero until :meth:`recount_groups`.

        Returns:
            ``starts [n]`` int64, the index of the first entry of each slot.
        """
        slots = slots.to(self.device, torch.int64).reshape(-1)
        counts = counts.to(self.device).reshape(-1)
        if slots.numel() != counts.numel():
            raise ValueError(f"slots has {slots.numel()} entries but counts has {counts.numel()}")
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        if slots.numel() == 0:
            if total:
                raise ValueError(f"no slots but total = {total}")
            return torch.empty(0, dtype=torch.int64, device=self.device)
        top = int(slots.max()) + 1 if top is None else int(top)
        if head_counts is not None and tuple(head_counts.shape) != (slots.numel(), self.n_groups):
            raise ValueError(f"head_counts must be [n, G] = {(slots.numel(), self.n_groups)}, got "
                             f"{tuple(head_counts.shape)}")
        self.reserve(nnz=self.nnz + total, slots=top)
        counts = counts.to(torch.int64)
        starts = self.nnz + torch.cumsum(counts, 0) - counts
        self.slot_start[slots] = starts.to(torch.int32)
        self.slot_count[slots] = counts.to(self.count_dtype)
        self.head_counts[slots] = 0 if head_counts is None else head_counts.to(self.device, torch.uint8)
        self.nnz += total
        self.n_slots = max(self.n_slots, top)
        return starts

    def begin_async_append(self, max_total: int, top_bound: int) -> torch.Tensor:
        """Make room for an append whose counts stay on the device (a decode step: no device sync).

        Reserves room for ``max_total`` more entries (an upper bound the caller knows, e.g. every element of
        the appended tokens) and for slots ``< top_bound``. Returns the device counters ``[2]`` int64
        ``(nnz, n_slots)``: the caller's kernel must advance them in place (entries ``nnz ..`` are free; slots
        must be new). :attr:`nnz` / :attr:`n_slots` read them back (one sync) only when something needs them.
        Capacity grows (doubling) when the host's upper bound of ``nnz`` would pass it, which costs one sync then.
        """
        self.reserve(slots=top_bound)
        upper = self._nnz_upper + max_total
        if upper > self.capacity_nnz:
            self.reserve(nnz=self.nnz + max_total)  # reading nnz syncs
            upper = self._nnz + max_total
        if self._dev_counts is None:
            self._dev_counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        if not self._dev_ahead:  # start from the host's counts: two fills, no sync
            self._dev_counts[0].fill_(self._nnz)
            self._dev_counts[1].fill_(self._n_slots)
        self._dev_ahead = True
        self._nnz_upper = upper
        return self._dev_counts

    def allocate_slots_async(
        self, slots: torch.Tensor, counts: torch.Tensor, max_total: int, top_bound: int, head_counts: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`allocate_slots` without a device sync, for small appends (a decode step), in torch ops on
        the counters of :meth:`begin_async_append` (the reference of the fused decode kernel in
        :mod:`kvquant.kernels.quantize_append`).

        Args:
            slots: ``[n]`` int64 distinct slots, ``< top_bound``. counts: ``[n]`` int entries per slot.
            max_total: upper bound of ``counts.sum()``. top_bound: upper bound of ``max(slots) + 1`` (host).
            head_counts: ``[n, G]`` per-group counts of each slot (rows sum to ``counts``; not checked).

        Returns:
            ``starts [n]`` int64, where each slot's entries go (the caller fills them).
        """
        slots = slots.reshape(-1)
        if slots.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if tuple(head_counts.shape) != (slots.numel(), self.n_groups):
            raise ValueError(f"head_counts must be [n, G] = {(slots.numel(), self.n_groups)}, got "
                             f"{tuple(head_counts.shape)}")
        dev = self.begin_async_append(max_total, top_bound)
        counts = counts.reshape(-1).to(torch.int64)
        ends = dev[0] + torch.cumsum(counts, 0)
        starts = ends - counts
        self.slot_start[slots] = starts.to(torch.int32)
        self.slot_count[slots] = counts.to(self.count_dtype)
        self.head_counts[slots] = head_counts.to(torch.uint8)
        dev[1] = torch.maximum(dev[1], slots.max() + 1)
        dev[0] = ends[-1]
        return starts

    def recount_groups(self, slots: torch.Tensor) -> None:
        """Recompute ``head_counts`` of ``slots`` from their stored entries (after a kernel filled them)."""
        slots = slots.to(self.device, torch.int64).reshape(-1)
        owner, idx, _ = self.entries_of(slots)
        self.head_counts[slots] = self._group_counts(owner, idx, slots.numel())

    def append_token(self, values: torch.Tensor, indices: torch.Tensor, slot: int | None = None) -> int:
        """Append one token's outliers (amortised O(1)); ``slot`` defaults to the next one. Returns it.

        Entries are stored sorted by index, the invariant every writer keeps (the decode kernel relies on it).
        """
        slot = self.n_slots if slot is None else int(slot)
        values = torch.as_tensor(values).reshape(-1)
        indices = torch.as_tensor(indices).reshape(-1)
        if values.shape != indices.shape:
            raise ValueError(f"values and indices must have the same length, got {values.numel()} and "
                             f"{indices.numel()}")
        indices, order = torch.sort(indices)
        values = values[order]
        self.append_slots(
            torch.tensor([slot]), torch.tensor([values.numel()]), values.to(self.device), indices.to(self.device)
        )
        self.n_slots = max(self.n_slots, slot + 1)
        return slot

    def append_dense(self, slots: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> None:
        """Append the entries of ``dense[n, n_inner]`` where ``mask`` is True, slot ``slots[i]`` for row i."""
        if dense.shape != mask.shape or dense.ndim != 2 or dense.shape[1] != self.n_inner:
            raise ValueError(f"dense and mask must both be [n, {self.n_inner}], got {tuple(dense.shape)}, "
                             f"{tuple(mask.shape)}")
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: grouped by slot, channels ascending
        self.append_slots(slots, mask.sum(1), dense[rows, cols], cols)

    # -- reads ----------------------------------------------------------------------------------------
    def entries_of(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries of the given slots: ``(owner[e], index[e], value[e])`` where ``owner`` is the position
        in ``slots`` each entry belongs to."""
        slots = slots.to(self.device, torch.int64).reshape(-1)
        inside = slots < self.slot_start.shape[0]
        safe = torch.where(inside, slots, torch.zeros_like(slots))
        counts = torch.where(inside, self.slot_count[safe].long(), torch.zeros_like(slots))
        starts = self.slot_start[safe].long()
        owner = torch.repeat_interleave(torch.arange(slots.numel(), device=self.device), counts)
        offs = torch.arange(owner.numel(), device=self.device) - (torch.cumsum(counts, 0) - counts)[owner]
        pos = starts[owner] + offs
        return owner, self.indices[pos].long(), self.values[pos]

    def _dense_slots_by_inner(self, n_slots: int | None) -> torch.Tensor:
        n = self.n_slots if n_slots is None else n_slots
        out = torch.zeros(n, self.n_inner, dtype=self.dtype, device=self.device)
        owner, idx, val = self.entries_of(torch.arange(n, device=self.device))
        out[owner, idx] = val
        return out

    def _standard(self, n_slots: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n_slots if n_slots is None else n_slots
        slots = torch.arange(n, device=self.device)
        owner, idx, val = self.entries_of(slots)
        counts = torch.bincount(owner, minlength=n)
        ptr = torch.zeros(n + 1, dtype=torch.int64, device=self.device)
        ptr[1:] = torch.cumsum(counts, 0)
        return val, idx, ptr

    def select_slots(self, slots: torch.Tensor) -> BlockedSlotMatrix:
        """A new matrix whose slot ``i`` holds the entries of ``slots[i]`` (compacted copy)."""
        new = type(self)(self.n_inner, self.dtype, self.device, self.block_nnz, slots.numel(),
                         group_size=self.group_size)
        owner, idx, val = self.entries_of(slots)
        counts = torch.bincount(owner, minlength=slots.numel())
        new.append_slots(torch.arange(slots.numel(), device=self.device), counts, val, idx)
        return new

    # -- accounting -----------------------------------------------------------------------------------
    def nbytes(self, n_slots: int | None = None) -> int:
        """Bytes held: entries up to block granularity, plus ``(start, count, head_counts[G])`` of ``n_slots``
        slots."""
        n = self.n_slots if n_slots is None else n_slots
        blocks = -(-self.nnz // self.block_nnz)
        per_entry = self.values.element_size() + self.indices.element_size()
        per_slot = self.slot_start.element_size() + self.slot_count.element_size() + self.n_groups
        return blocks * self.block_nnz * per_entry + n * per_slot

    def nbytes_allocated(self) -> int:
        """Bytes reserved, including capacity not yet used."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.slot_start,
                                                           self.slot_count, self.head_counts))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_inner={self.n_inner}, group_size={self.group_size}, slots={self.n_slots}, "
                f"nnz={self.nnz})")
