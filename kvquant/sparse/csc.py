"""``BlockedCSCMatrix``: the key outliers, a sparse ``[channels, tokens]`` matrix compressed by column (token slot).

See :mod:`kvquant.sparse.blocked` for both matrices' layout.
"""

from __future__ import annotations

import torch

from kvquant.sparse.common import _grow, index_dtype, largest_group
from kvquant.sparse.growth import grown_capacity


class BlockedCSCMatrix:
    """Key outliers: a sparse ``[n_rows (channels), n_cols (tokens)]`` matrix, a column per token slot.

    Args:
        n_rows: channels (``H * D`` for a layer's keys).
        dtype: dtype of the stored exact values.
        block_nnz: allocation granularity (entries) of the entry buffer.
        initial_cols: slots allocated at first.
        group_size: channels per group (``D``: a group per head); default the largest divisor of ``n_rows``
            that is at most 255 (per-group counts are uint8).

    ``append_token(values, rows)`` appends the next column in amortised O(1); ``append_slots`` /
    ``append_dense`` append many columns at once, in any slot order.
    """

    def __init__(self, n_rows: int, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 block_nnz: int = 1024, initial_cols: int = 64, group_size: int | None = None) -> None:
        if n_rows <= 0:
            raise ValueError(f"n_rows (channels) must be positive, got {n_rows}")
        if block_nnz <= 0:
            raise ValueError(f"block_nnz must be positive, got {block_nnz}")
        group_size = largest_group(n_rows) if group_size is None else int(group_size)
        if group_size <= 0 or n_rows % group_size:
            raise ValueError(f"group_size must be a positive divisor of n_rows = {n_rows}, got {group_size}")
        if group_size > 255:
            raise ValueError(f"group_size must be <= 255 (per-group counts are uint8), got {group_size}; "
                             f"pass group_size=head_dim")
        self.n_inner = n_rows
        self.group_size = group_size
        self.n_groups = n_rows // group_size
        self.block_nnz = block_nnz
        self.local_dtype = index_dtype(group_size)
        self.values = torch.empty(block_nnz, dtype=dtype, device=device)
        self.indices = torch.empty(block_nnz, dtype=self.local_dtype, device=device)  # channel within its group
        n0 = max(initial_cols, 1)
        self.slot_start = torch.zeros(n0, dtype=torch.int32, device=device)
        self.head_counts = torch.zeros(n0, self.n_groups, dtype=torch.uint8, device=device)
        self._nnz = 0
        self._n_slots = 0  # one past the highest slot written
        # appends without a device sync (begin_async_append) keep (nnz, n_slots) on the device in _dev_counts,
        # advanced in place by the writer; the host reads them back (one sync) when it needs them. Meanwhile
        # _nnz_upper bounds nnz on the host.
        self._dev_counts: torch.Tensor | None = None
        self._dev_ahead = False
        self._nnz_upper = 0

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        """Entries stored (a device sync after appends through :meth:`begin_async_append`)."""
        self._resolve()
        return self._nnz

    @property
    def n_slots(self) -> int:
        """One past the highest slot written (a device sync after :meth:`begin_async_append`)."""
        self._resolve()
        return self._n_slots

    @property
    def nnz_upper(self) -> int:
        """An upper bound of :attr:`nnz` known on the host (no sync); equal to it after a sync."""
        return self._nnz_upper

    def _resolve(self) -> None:
        if not self._dev_ahead:
            return
        nnz, top, overflow = self._dev_counts.tolist()
        if overflow:
            raise RuntimeError("the key outlier store ran out of its reserved capacity during a captured decode "
                               "(entries were dropped): reserve more with KVQuantCache(..., outlier_headroom=...)")
        self._dev_ahead = False
        self._nnz = self._nnz_upper = int(nnz)
        self._n_slots = max(self._n_slots, int(top))

    def _set_counts(self, nnz: int, n_slots: int) -> None:
        self._resolve()
        self._nnz = self._nnz_upper = int(nnz)
        self._n_slots = max(self._n_slots, int(n_slots))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def capacity_nnz(self) -> int:
        return self.values.shape[0]

    @property
    def capacity_slots(self) -> int:
        return self.slot_start.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_inner, self.n_slots)

    # -- growth ---------------------------------------------------------------------------------------
    def reserve(self, nnz: int | None = None, slots: int | None = None, exact: bool = False) -> None:
        """Room for ``nnz`` entries and ``slots`` slots in total (amortised: grows by at least a quarter unless
        ``exact``; entries are allocated in whole blocks)."""
        if nnz is not None and nnz > self.capacity_nnz:
            want = nnz if exact else grown_capacity(self.capacity_nnz, nnz)
            want = -(-want // self.block_nnz) * self.block_nnz
            self.values = _grow(self.values[: self.nnz], want)
            self.indices = _grow(self.indices[: self.nnz], want)
        if slots is not None and slots > self.capacity_slots:
            want = slots if exact else grown_capacity(self.capacity_slots, slots)
            self.slot_start = _grow(self.slot_start, want)
            self.head_counts = _grow(self.head_counts, want)

    # -- appends --------------------------------------------------------------------------------------
    def _group_counts(self, owner: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
        group = indices.to(self.device, torch.int64) // self.group_size
        key = owner.to(self.device, torch.int64) * self.n_groups + group
        return torch.bincount(key, minlength=n * self.n_groups).reshape(n, self.n_groups).to(torch.uint8)

    def append_slots(self, slots: torch.Tensor, counts: torch.Tensor, values: torch.Tensor,
                     indices: torch.Tensor) -> None:
        """Batched append: slot ``slots[i]`` gets the next ``counts[i]`` entries of ``values``/``indices``.

        Args:
            slots: ``[n]`` int, distinct, not written before.
            counts: ``[n]`` int, entries per slot, ``sum(counts) == len(values)``.
            values: ``[nnz]`` exact values. indices: ``[nnz]`` channel in ``[0, n_rows)``, ascending within a slot.
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
        nnz = self.nnz
        self.reserve(nnz=nnz + total, slots=top)
        starts = nnz + torch.cumsum(counts, 0) - counts
        self.slot_start[slots] = starts.to(torch.int32)
        owner = torch.repeat_interleave(torch.arange(slots.numel(), device=self.device), counts)
        idx = indices.reshape(-1).to(self.device, torch.int64)
        self.head_counts[slots] = self._group_counts(owner, idx, slots.numel())
        self.values[nnz: nnz + total] = values.reshape(-1).to(self.dtype)
        self.indices[nnz: nnz + total] = (idx % self.group_size).to(self.local_dtype)
        self._set_counts(nnz + total, top)

    def append_token(self, values: torch.Tensor, indices: torch.Tensor, slot: int | None = None) -> int:
        """Append one column (amortised O(1)); ``slot`` defaults to the next one. Returns it. Entries are stored
        sorted by row."""
        slot = self.n_slots if slot is None else int(slot)
        values = torch.as_tensor(values).reshape(-1)
        indices = torch.as_tensor(indices).reshape(-1)
        if values.shape != indices.shape:
            raise ValueError(f"values and indices must have the same length, got {values.numel()} and "
                             f"{indices.numel()}")
        indices, order = torch.sort(indices)
        self.append_slots(torch.tensor([slot]), torch.tensor([values.numel()]), values[order].to(self.device),
                          indices.to(self.device))
        return slot

    def append_dense(self, slots: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> None:
        """Append the entries of ``dense[n, n_rows]`` where ``mask`` is True, slot ``slots[i]`` for row ``i``."""
        if dense.shape != mask.shape or dense.ndim != 2 or dense.shape[1] != self.n_inner:
            raise ValueError(f"dense and mask must both be [n, {self.n_inner}], got {tuple(dense.shape)}, "
                             f"{tuple(mask.shape)}")
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: grouped by slot, channels ascending
        self.append_slots(slots, mask.sum(1), dense[rows, cols], cols)

    def allocate_slots(self, slots: torch.Tensor, counts: torch.Tensor, total: int, top: int | None = None,
                       head_counts: torch.Tensor | None = None) -> torch.Tensor:
        """A batched append whose entries a kernel then writes in place: slot ``slots[i]`` gets the next
        ``counts[i]`` entries (``sum(counts) == total``, a host int). ``head_counts [n, G]`` are the per-group
        counts (not checked: no sync). Returns ``starts [n]`` int64."""
        slots = slots.to(self.device, torch.int64).reshape(-1)
        counts = counts.to(self.device).reshape(-1).to(torch.int64)
        if slots.numel() != counts.numel():
            raise ValueError(f"slots has {slots.numel()} entries but counts has {counts.numel()}")
        if slots.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if head_counts is None or tuple(head_counts.shape) != (slots.numel(), self.n_groups):
            raise ValueError(f"head_counts must be [n, G] = {(slots.numel(), self.n_groups)}")
        top = int(slots.max()) + 1 if top is None else int(top)
        nnz = self.nnz
        self.reserve(nnz=nnz + total, slots=top)
        starts = nnz + torch.cumsum(counts, 0) - counts
        self.slot_start[slots] = starts.to(torch.int32)
        self.head_counts[slots] = head_counts.to(self.device, torch.uint8)
        self._set_counts(nnz + total, top)
        return starts

    def begin_async_append(self, max_total: int, top_bound: int) -> torch.Tensor:
        """Room for an append whose counts stay on the device (a decode step: no sync).

        Reserves room for ``max_total`` more entries (a host upper bound, e.g. every element of the new tokens) and
        slots ``< top_bound``. Returns the device counters ``[3]`` int64 ``(nnz, n_slots, overflow)`` that the
        caller's kernel advances in place. Capacity grows (by a quarter, one sync) only when the host bound would pass
        it.
        """
        self.reserve(slots=top_bound)
        upper = self._nnz_upper + max_total
        if upper > self.capacity_nnz:
            self.reserve(nnz=self.nnz + max_total)  # reading nnz syncs
            upper = self._nnz + max_total
        if self._dev_counts is None:
            self._dev_counts = torch.zeros(3, dtype=torch.int64, device=self.device)  # nnz, n_slots, overflow
        if not self._dev_ahead:
            self._dev_counts[0].fill_(self._nnz)
            self._dev_counts[1].fill_(self._n_slots)
        self._dev_ahead = True
        self._nnz_upper = upper
        return self._dev_counts

    # -- reads ----------------------------------------------------------------------------------------
    def device_counters(self) -> torch.Tensor:
        """The counters ``(nnz, n_slots, overflow)`` a captured decode step advances on the device (no host bound:
        the capacity was reserved ahead; writes past it are dropped and raise ``overflow``)."""
        if self._dev_counts is None:
            self._dev_counts = torch.zeros(3, dtype=torch.int64, device=self.device)
        if not self._dev_ahead:
            self._dev_counts[0].fill_(self._nnz)
            self._dev_counts[1].fill_(self._n_slots)
        self._dev_ahead = True
        self._nnz_upper = self.capacity_nnz
        return self._dev_counts

    def entries_of(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries of the given slots: ``(owner[e], row[e], value[e])``, ``owner`` = position in ``slots``."""
        slots = slots.to(self.device, torch.int64).reshape(-1)
        inside = slots < self.capacity_slots
        safe = torch.where(inside, slots, torch.zeros_like(slots))
        hc = self.head_counts[safe].long() * inside[:, None]  # [n, G]
        counts = hc.sum(1)
        starts = self.slot_start[safe].long()
        n, G = hc.shape
        owner = torch.repeat_interleave(torch.arange(n, device=self.device), counts)
        group = torch.repeat_interleave(torch.arange(G, device=self.device).repeat(n), hc.reshape(-1))
        offs = torch.arange(owner.numel(), device=self.device) - (torch.cumsum(counts, 0) - counts)[owner]
        pos = starts[owner] + offs
        rows = group * self.group_size + self.indices[pos].long()
        return owner, rows, self.values[pos]

    def to_dense(self, n_cols: int | None = None) -> torch.Tensor:
        """``[n_rows, n_cols]`` dense matrix (zeros where nothing is stored)."""
        n = self.n_slots if n_cols is None else n_cols
        out = torch.zeros(n, self.n_inner, dtype=self.dtype, device=self.device)
        owner, rows, val = self.entries_of(torch.arange(n, device=self.device))
        out[owner, rows] = val
        return out.T.contiguous()

    def to_standard_csc(self, n_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values[nnz], row_indices[nnz], col_ptr[n_cols + 1])`` with columns in order."""
        n = self.n_slots if n_cols is None else n_cols
        owner, rows, val = self.entries_of(torch.arange(n, device=self.device))
        ptr = torch.zeros(n + 1, dtype=torch.int64, device=self.device)
        ptr[1:] = torch.cumsum(torch.bincount(owner, minlength=n), 0)
        return val, rows, ptr

    def to_torch_sparse(self, n_cols: int | None = None) -> torch.Tensor:
        val, idx, ptr = self.to_standard_csc(n_cols)
        return torch.sparse_csc_tensor(ptr, idx, val, size=(self.n_inner, ptr.numel() - 1), check_invariants=True)

    def select_slots(self, slots: torch.Tensor, keep: torch.Tensor | None = None) -> BlockedCSCMatrix:
        """A new matrix whose slot ``i`` holds the entries of ``slots[i]`` (compacted copy); with ``keep`` (bool,
        like ``slots``) a slot whose ``keep`` is False comes out empty."""
        new = type(self)(self.n_inner, self.dtype, self.device, self.block_nnz, slots.numel(),
                         group_size=self.group_size)
        owner, rows, val = self.entries_of(slots)
        if keep is not None:
            kept = keep.reshape(-1).to(self.device)[owner]
            owner, rows, val = owner[kept], rows[kept], val[kept]
        counts = torch.bincount(owner, minlength=slots.numel())
        new.append_slots(torch.arange(slots.numel(), device=self.device), counts, val, rows)
        return new

    # -- accounting -----------------------------------------------------------------------------------
    def nbytes(self, n_slots: int | None = None) -> int:
        """Bytes in use: entries up to block granularity, plus ``(start, head_counts[G])`` of ``n_slots`` slots."""
        n = self.n_slots if n_slots is None else n_slots
        blocks = -(-self.nnz // self.block_nnz)
        per_entry = self.values.element_size() + self.indices.element_size()
        return blocks * self.block_nnz * per_entry + n * (self.slot_start.element_size() + self.n_groups)

    def nbytes_allocated(self) -> int:
        """Bytes reserved, including capacity not yet used."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.slot_start,
                                                           self.head_counts))

    def __repr__(self) -> str:
        return (f"BlockedCSCMatrix(n_rows={self.n_inner}, group_size={self.group_size}, cols={self.n_slots}, "
                f"nnz={self.nnz})")
