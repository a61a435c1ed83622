"""Blocked compressed sparse storage for outliers, one compressed slice per token.

Keys keep their outliers in a :class:`BlockedCSCMatrix` (``[channels, tokens]``, a column per token),
values in a :class:`BlockedCSRMatrix` (``[tokens, channels]``, a row per token). Both share one storage
scheme: entries (value, channel index) live in a pre-allocated buffer that grows in whole blocks of
``block_nnz`` entries (capacity doubling, so appends are amortised O(1) and old entries are never copied
quadratically), and every token slot has a ``(start, count)`` pair — the "four-array" variant of
CSC/CSR, which lets tokens of many sequences be appended in any interleaving (decode appends one token
per sequence per step) while a slot's entries stay contiguous for the kernels.

Channels are split in ``G = n_inner // group_size`` groups of ``group_size`` consecutive channels (one group
per attention head: ``group_size = head_dim``), and every slot also stores ``head_counts[slot, g]``
(``uint8``), its number of entries in group ``g``. Entries of a slot are sorted by channel, so group ``g``'s
entries are the contiguous run starting at ``slot_start[slot] + sum(head_counts[slot, :g])``: the decode
kernel reads a head's run directly instead of searching for it. Cost: ``G`` bytes per slot (``1 / group_size``
byte per element, 0.0625 bits at ``group_size = 128``). ``group_size`` defaults to the largest divisor of
``n_inner`` that is at most 255 (counts are uint8).

Slots are written once (append-only). :meth:`to_standard_csc` / :meth:`to_standard_csr` give the
textbook three-array form with slots in order.
"""

from __future__ import annotations

import torch

from kvquant.sparse.slots import BlockedSlotMatrix, largest_group

__all__ = ["BlockedCSCMatrix", "BlockedCSRMatrix", "BlockedSlotMatrix", "largest_group"]


class BlockedCSCMatrix(BlockedSlotMatrix):
    """Key outliers: a sparse ``[n_rows (channels), n_cols (tokens)]`` matrix, a column per token.

    ``append_token(values, rows)`` appends the next column in amortised O(1); ``append_slots`` appends
    a whole prefill at once.
    """

    def __init__(self, n_rows: int, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 block_nnz: int = 1024, initial_cols: int = 64, group_size: int | None = None) -> None:
        super().__init__(n_rows, dtype, device, block_nnz, initial_cols, group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_inner, self.n_slots)

    def to_dense(self, n_cols: int | None = None) -> torch.Tensor:
        """``[n_rows, n_cols]`` dense matrix (zeros where nothing is stored)."""
        return self._dense_slots_by_inner(n_cols).T.contiguous()

    def to_standard_csc(self, n_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values[nnz], row_indices[nnz], col_ptr[n_cols + 1])`` with columns in order."""
        return self._standard(n_cols)

    def to_torch_sparse(self, n_cols: int | None = None) -> torch.Tensor:
        val, idx, ptr = self._standard(n_cols)
        return torch.sparse_csc_tensor(ptr, idx, val, size=(self.n_inner, ptr.numel() - 1), check_invariants=True)


class BlockedCSRMatrix(BlockedSlotMatrix):
    """Value outliers: a sparse ``[n_rows (tokens), n_cols (channels)]`` matrix, a row per token."""

    def __init__(self, n_cols: int, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 block_nnz: int = 1024, initial_rows: int = 64, group_size: int | None = None) -> None:
        super().__init__(n_cols, dtype, device, block_nnz, initial_rows, group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_slots, self.n_inner)

    def to_dense(self, n_rows: int | None = None) -> torch.Tensor:
        """``[n_rows, n_cols]`` dense matrix (zeros where nothing is stored)."""
        return self._dense_slots_by_inner(n_rows)

    def to_standard_csr(self, n_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values[nnz], col_indices[nnz], row_ptr[n_rows + 1])`` with rows in order."""
        return self._standard(n_rows)

    def to_torch_sparse(self, n_rows: int | None = None) -> torch.Tensor:
        val, idx, ptr = self._standard(n_rows)
        return torch.sparse_csr_tensor(ptr, idx, val, size=(ptr.numel() - 1, self.n_inner), check_invariants=True)
