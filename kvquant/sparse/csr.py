"""``BlockedCSRMatrix``: the value outliers, per page block the sparse ``[channels, tokens]`` matrix of each head
compressed by row (channel).

See :mod:`kvquant.sparse.blocked` for both matrices' layout.
"""

from __future__ import annotations

import torch

from kvquant.sparse.common import _grow
from kvquant.sparse.growth import grown_capacity


class BlockedCSRMatrix:
    """Value outliers: per page block of ``block_len`` tokens, the sparse ``[channels, tokens]`` matrix of each
    head in CSR form (a row per channel).

    Args:
        heads, channels: ``H`` and ``D``.
        block_len: tokens per block (the page size ``T``, at most 256).
        per_token: the most entries a token may have over all heads; a block holds ``block_len * per_token``.
        dtype: dtype of the stored exact values.
        initial_blocks: blocks allocated at first (block ids are page ids: the matrix grows with the page pool).
    """

    def __init__(self, heads: int, channels: int, block_len: int, per_token: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 initial_blocks: int = 1) -> None:
        if heads <= 0 or channels <= 0:
            raise ValueError(f"heads and channels must be positive, got {heads}, {channels}")
        if not 0 < block_len <= 256:
            raise ValueError(f"block_len must be in [1, 256] (token offsets are uint8), got {block_len}")
        if not 0 <= per_token <= heads * channels:
            raise ValueError(f"per_token must be in [0, heads * channels = {heads * channels}], got {per_token}")
        self.heads, self.channels, self.block_len, self.per_token = heads, channels, block_len, per_token
        self.block_cap = block_len * per_token
        self.count_dtype = torch.uint8 if block_len <= 255 else torch.int16
        n0 = max(initial_blocks, 1)
        self.values = torch.zeros(n0, self.block_cap, dtype=dtype, device=device)
        self.tokens = torch.zeros(n0, self.block_cap, dtype=torch.uint8, device=device)
        self.counts = torch.zeros(n0, heads, channels, dtype=self.count_dtype, device=device)
        self.head_start = torch.zeros(n0, heads, dtype=torch.int32, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def capacity_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def nnz(self) -> int:
        """Entries stored over all blocks (a device sync)."""
        return int(self.counts.long().sum())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.heads * self.channels, self.block_len * self.capacity_blocks)

    def reserve(self, blocks: int, exact: bool = False) -> None:
        """Room for block ids ``< blocks`` (growing by a quarter unless ``exact``)."""
        if blocks <= self.capacity_blocks:
            return
        want = blocks if exact else grown_capacity(self.capacity_blocks, blocks)
        for name in ("values", "tokens", "counts", "head_start"):
            setattr(self, name, _grow(getattr(self, name), want))

    def write_blocks(self, blocks: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> None:
        """Store block ``blocks[i]`` from ``dense[i]`` ``[H, T, D]`` at the entries where ``mask[i]`` is True.

        Entries are ordered by head, channel, token. Each token (over all heads) may have at most ``per_token``
        entries. Blocks must be reserved.
        """
        n = blocks.numel()
        H, T, D = self.heads, self.block_len, self.channels
        if dense.shape != (n, H, T, D) or mask.shape != dense.shape:
            raise ValueError(f"dense and mask must be [n, H, T, D] = {(n, H, T, D)}, got {tuple(dense.shape)}, "
                             f"{tuple(mask.shape)}")
        if n == 0:
            return
        per_tok = mask.sum((1, 3))  # [n, T]
        if int(per_tok.max()) > self.per_token:
            raise ValueError(f"a token has {int(per_tok.max())} outliers, more than per_token = {self.per_token}")
        blocks = blocks.to(self.device, torch.int64)
        mt = mask.transpose(2, 3)  # [n, H, D, T]: row-major order = head, channel, token
        self.counts[blocks] = mt.sum(-1).to(self.count_dtype)
        per_head = mt.sum((2, 3))  # [n, H]
        self.head_start[blocks] = (torch.cumsum(per_head, 1) - per_head).to(torch.int32)
        b_i, h_i, c_i, t_i = mt.nonzero(as_tuple=True)
        k = torch.arange(b_i.numel(), device=self.device)
        first = torch.cumsum(per_head.sum(1), 0) - per_head.sum(1)  # [n] first entry of each block in the list
        pos = k - first[b_i]
        vals = dense.transpose(2, 3)[b_i, h_i, c_i, t_i]
        self.values[blocks] = 0
        self.tokens[blocks] = 0
        self.values[blocks[b_i], pos] = vals.to(self.dtype)
        self.tokens[blocks[b_i], pos] = t_i.to(torch.uint8)

    def entries(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
        """Entries of the given blocks: ``(owner, head, channel, token, value)`` each ``[nnz]`` (owner = position in
        ``blocks``), ordered by owner, head, channel, token."""
        blocks = blocks.to(self.device, torch.int64).reshape(-1)
        cnt = self.counts[blocks].long()  # [n, H, D]
        flat = cnt.reshape(-1)
        row = torch.repeat_interleave(torch.arange(flat.numel(), device=self.device), flat)
        hd = self.heads * self.channels
        owner, head, chan = row // hd, (row // self.channels) % self.heads, row % self.channels
        per_block = cnt.sum((1, 2))
        first = torch.cumsum(per_block, 0) - per_block
        pos = torch.arange(row.numel(), device=self.device) - first[owner]
        return owner, head, chan, self.tokens[blocks[owner], pos].long(), self.values[blocks[owner], pos]

    def to_dense(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[n, H, T, D]`` with the stored values (zeros elsewhere)."""
        blocks = blocks.to(self.device, torch.int64).reshape(-1)
        out = torch.zeros(blocks.numel(), self.heads, self.block_len, self.channels, dtype=self.dtype,
                          device=self.device)
        owner, head, chan, tok, val = self.entries(blocks)
        out[owner, head, tok, chan] = val
        return out

    def to_standard_csr(self, block: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values[nnz], token_indices[nnz], row_ptr[D + 1])`` of head ``head`` of block ``block``: the
        ``[channels, tokens]`` matrix in textbook CSR form."""
        cnt = self.counts[block, head].long()
        start = int(self.head_start[block, head])
        total = int(cnt.sum())
        ptr = torch.zeros(self.channels + 1, dtype=torch.int64, device=self.device)
        ptr[1:] = torch.cumsum(cnt, 0)
        return (self.values[block, start: start + total], self.tokens[block, start: start + total].long(), ptr)

    def to_torch_sparse(self, block: int, head: int) -> torch.Tensor:
        val, idx, ptr = self.to_standard_csr(block, head)
        return torch.sparse_csr_tensor(ptr, idx, val, size=(self.channels, self.block_len), check_invariants=True)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy blocks ``src[i]`` to ``dst[i]`` (batch reordering)."""
        for name in ("values", "tokens", "counts", "head_start"):
            t = getattr(self, name)
            t[dst] = t[src]

    def nnz_of(self, blocks: torch.Tensor) -> int:
        """Entries stored in the given blocks (a sync)."""
        return int(self.counts[blocks.to(self.device, torch.int64)].long().sum())

    def nbytes(self, n_blocks: int) -> int:
        """Bytes held by ``n_blocks`` blocks: each block's fixed entry region, counts and head starts."""
        per_block = (self.block_cap * (self.values.element_size() + 1)
                     + self.heads * self.channels * self.counts.element_size() + self.heads * 4)
        return n_blocks * per_block

    def nbytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.tokens, self.counts, self.head_start))

    def __repr__(self) -> str:
        return (f"BlockedCSRMatrix(heads={self.heads}, channels={self.channels}, block_len={self.block_len}, "
                f"per_token={self.per_token}, blocks={self.capacity_blocks})")
