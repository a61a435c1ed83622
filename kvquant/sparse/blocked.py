"""Blocked sparse storage of the exact outliers: keys in a blocked CSC matrix, values in a blocked CSR matrix.

Both hold one attention layer's outliers of ``H`` heads x ``D`` channels over the tokens of a batch, seen as the
matrix ``[channels, tokens]`` (``K^T`` and ``V^T``), and both grow by whole blocks, so appends are amortised O(1)
and entries are never copied quadratically.

* :class:`BlockedCSCMatrix` (keys): compressed by **column = token**. Every token *slot* (``page * T + offset``)
  has a ``(start, count)`` pair into an entry buffer that grows in blocks of ``block_nnz`` entries (the
  "four-array" CSC, so tokens of many sequences can be appended in any interleaving, one decode token per
  sequence per step), and ``head_counts[slot, g]`` (uint8), the slot's entries in channel group ``g`` (a group per
  head). A slot's entries are sorted by channel, so head ``h``'s run starts at
  ``start + sum(head_counts[slot, :h])``: the decode kernel adds each key outlier's correction to its token's
  score without a search.
* :class:`BlockedCSRMatrix` (values): compressed by **row = channel**, one block per page of ``T`` tokens. Block
  ``p`` holds, per head ``h``, the page's outliers sorted by channel then token, ``counts[p, h, c]`` entries for
  channel ``c`` and ``head_start[p, h]`` where head ``h``'s run begins; an entry is the exact value and the token's
  offset in the page (uint8). A whole page is written at once (values are quantized a page at a time), so the
  decode kernel gives each channel's outliers to one lane, which adds ``p[token] * value`` to its own output
  channel. A block has a fixed capacity of ``T * per_token`` entries: the values' outlier rule keeps at most
  ``per_token`` entries per token.

Indices inside a group (channel within its head, token within its page) are stored as uint8 when they fit.
:meth:`BlockedCSCMatrix.to_standard_csc` / :meth:`BlockedCSRMatrix.to_standard_csr` give the textbook three-array
forms.
"""

from __future__ import annotations

from kvquant.sparse.common import index_dtype, largest_group
from kvquant.sparse.csc import BlockedCSCMatrix
from kvquant.sparse.csr import BlockedCSRMatrix

__all__ = ["BlockedCSCMatrix", "BlockedCSRMatrix", "index_dtype", "largest_group"]
