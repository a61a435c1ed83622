"""Sparse outlier storage."""

from kvquant.sparse.blocked import BlockedCSCMatrix, BlockedCSRMatrix

__all__ = ["BlockedCSCMatrix", "BlockedCSRMatrix"]
