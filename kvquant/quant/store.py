"""``QuantizedKVCache``: the compressed keys *or* values of a batch of sequences.

A sequence's tokens, in order, are ``[sinks | quantized | residual]``:

* the first ``n_sink`` tokens, kept exactly (``sink  [B, H, n_sink, D]``);
* quantized tokens in a :class:`~kvquant.quant.paged.PageTable` pool of pages of ``T`` tokens:
  codes bit-packed along tokens (``planes [P, H, D, bits, T/32]`` int32), per-token scales for values
  (``scale/zero [P, H, T]``), per-channel ranges for keys (``[B, H, D]`` float32), and the exact
  outliers in a blocked CSC (keys) / CSR (values) matrix indexed by slot ``page * T + offset``;
* up to ``residual_length`` most recent tokens, kept exactly (``residual [B, H, R, D]``).

With datatype ``fp16`` the pool holds the raw tokens (``raw [P, H, T, D]``) and nothing is quantized.
Every append — a whole prefill or one decode token per sequence — goes through the same path, and the tokens
that leave the exact parts are written by the store's ops object (:mod:`kvquant.quant.backend`).
"""

from __future__ import annotations

from typing import Any

import torch

from kvquant.config import QuantConfig
from kvquant.quant.backend import store_ops
from kvquant.quant.codebook import Codebook
from kvquant.quant.paged import PageTable
from kvquant.quant.read import dequantize_pages, page_codes
from kvquant.quant.validate import check_kv, check_mask, compact_order
from kvquant.sparse.blocked import BlockedCSCMatrix, BlockedCSRMatrix, largest_group

# sync-free decode appends check their tokens for NaN/Inf together, once per this many appends
DEFERRED_CHECK_EVERY = 32


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype for outliers and per-token scales: the input's own if 16-bit, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


class QuantizedKVCache:
    """Quantized keys or values of ``B`` sequences of ``H`` heads and head size ``D``.

    Build it with :class:`~kvquant.quant.quantizer.BatchedKVQuantizer`; grow it with :meth:`append`;
    read it with :meth:`dequantize`.

    ``ops`` (:mod:`kvquant.kernels.ops`) writes the quantized tokens: the one a
    :class:`~kvquant.cache.hf_cache.KVQuantCache` resolved, or (``None``) one resolved here from
    ``config.backend`` and ``device``. A Triton ops object whose kernel cannot write this store's shape or dtype
    falls back to the torch writes for ``backend="auto"`` and is an error for ``backend="triton"``; an ``fp16``
    store is always written by torch (a copy).
    """

    def __init__(
        self,
        kind: str,
        config: QuantConfig,
        batch: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        codebook: Codebook | None = None,
        channel_scale: torch.Tensor | None = None,
        channel_zero: torch.Tensor | None = None,
        ops: Any = None,
    ) -> None:
        if kind not in ("key", "value"):
            raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
        self.kind = kind
        self.config = config
        self.batch, self.num_heads, self.head_dim = batch, num_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.quantized = config.is_quantized
        self.bits = config.bits
        T = config.page_size
        if self.quantized:
            if codebook is None:
                raise ValueError(f"datatype {config.datatype} needs a codebook")
            if codebook.bits != self.bits:
                raise ValueError(f"codebook has {codebook.bits} bits but datatype {config.datatype} has {self.bits}")
            self.codebook = codebook.to(self.device)
        else:
            self.codebook = None
        self.pages = PageTable(batch, T, self.device)
        if self.quantized:
            self.pages.add_pool("planes", (num_heads, head_dim, self.bits, T // 32), torch.int32)
            if kind == "value":
                self.pages.add_pool("scale", (num_heads, T), storage_dtype(dtype))
                self.pages.add_pool("zero", (num_heads, T), storage_dtype(dtype))
        else:
            self.pages.add_pool("raw", (num_heads, T, head_dim), dtype)
        if kind == "key" and self.quantized:
            if channel_scale is None or channel_zero is None:
                raise ValueError("quantized keys need per-channel scale and zero [B, H, D]")
            # [B, H, D] contiguous: the kernels read them every step (an expanded view would be copied each time)
            self.channel_scale = channel_scale.to(self.device, torch.float32).expand(batch, num_heads, head_dim
                                                                                     ).contiguous()
            self.channel_zero = channel_zero.to(self.device, torch.float32).expand(batch, num_heads, head_dim
                                                                                   ).contiguous()
        else:
            self.channel_scale = self.channel_zero = None
        sparse_cls = BlockedCSCMatrix if kind == "key" else BlockedCSRMatrix
        self.keep_outliers = self.quantized and config.outlier_fraction > 0
        # per-(slot, head) outlier counts for the decode kernel: one group per head (split in equal parts when
        # head_dim > 255, the uint8 limit of a group's count)
        group = largest_group(head_dim)
        self.outliers = sparse_cls(num_heads * head_dim, storage_dtype(dtype), self.device, config.block_nnz,
                                   group_size=group)
        self.sink = torch.zeros(batch, num_heads, config.n_sink, head_dim, dtype=dtype, device=self.device)
        self.residual = torch.zeros(batch, num_heads, config.residual_length, head_dim, dtype=dtype,
                                    device=self.device)
        self.sink_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.q_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.res_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        # what the host knows, for appends without a device sync (see _append_steady)
        self._host_stale = True  # _steady / _headroom must be re-read from the device
        self._steady = False  # every sequence has all its sinks and a full residual window
        self._headroom = 0  # tokens every sequence can still quantize into its reserved pages
        # [1] float32 flag, NaN once a sync-free append met NaN/Inf (set by torch or by the quantize kernel), read
        # every DEFERRED_CHECK_EVERY appends
        self._nonfinite: torch.Tensor | None = None
        self._unchecked_appends = 0
        self._failed: str | None = None
        self.fresh_from = 0  # pages with an id >= this hold nothing yet (set before each write)
        self.ops = store_ops(self, ops)

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` tokens stored per sequence."""
        return self.sink_len + self.q_len + self.res_len

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.batch else 0

    def reserve(self, extra_tokens: int) -> None:
        """Pre-allocate pages (and outlier slots) for ``extra_tokens`` more tokens per sequence, sized
        exactly (no doubling slack). Reserved pages count as held in :meth:`memory_report`."""
        self.pages.reserve(self.q_len + self.res_len + extra_tokens, exact=True)
        self.outliers.reserve(slots=self.pages.capacity * self.config.page_size, exact=True)
        self._host_stale = True

    # -- writing --------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Append tokens to every sequence.

        Args:
            x: ``[B, H, n, D]`` new tokens (a prefill or ``n = 1`` decode tokens).
            attention_mask: ``[B, n]`` 1 for real tokens, 0 for padding (left, right or anywhere);
                ``None`` means all real. A row may be all padding here (that sequence gets nothing).

        Decode steps (``attention_mask=None``, every sequence past its sinks and residual window) make no
        device sync on the Triton backend: what the host needs is known there, and NaN/Inf in ``x`` is
        detected up to :data:`DEFERRED_CHECK_EVERY` appends later (an error then; the cache is unusable after it).
        """
        if self._failed is not None:
            raise ValueError(self._failed)
        if attention_mask is None and isinstance(x, torch.Tensor) and x.ndim == 4 and self._fast_path_ready(x.shape[2]):
            self._append_steady(x)
            return
        self._host_stale = True
        check_kv(x, f"{self.kind}s", self.num_heads, self.head_dim, self.device)
        if x.shape[0] != self.batch:
            raise ValueError(f"{self.kind}s have batch {x.shape[0]} but the cache holds {self.batch}")
        n = x.shape[2]
        mask = check_mask(attention_mask, self.batch, n, x.device, allow_empty_rows=True)
        x = x.to(self.dtype)
        if not bool(mask.all()):  # move each row's real tokens to the front, in order
            order = compact_order(mask)
            x = x.gather(2, order[:, None, :, None].expand_as(x))
        n_new = mask.sum(1)
        arange_b = torch.arange(self.batch, device=self.device)

        # 1. sinks: the first n_sink real tokens of a sequence.
        n_sink = self.config.n_sink
        take = torch.minimum(n_sink - self.sink_len, n_new)
        if n_sink:
            j = torch.arange(n_sink, device=self.device)[None, :]
            src = j - self.sink_len[:, None]
            fill = (src >= 0) & (src < take[:, None])
            src = src.clamp(0, max(n - 1, 0))
            if n:
                got = x.gather(2, src[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
                self.sink = torch.where(fill[:, None, :, None], got, self.sink)
            self.sink_len += take

        # 2. the rest passes through the residual window; what overflows it is quantized, oldest first.
        R = self.config.residual_length
        rest = n_new - take
        pend_len = self.res_len + rest
        evict = (pend_len - R).clamp_min(0)
        pending = torch.cat([self.residual, x], dim=2)  # [B, H, R + n, D]

        def pending_index(seq: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            """Index in ``pending`` of position ``i`` of sequence ``seq``'s stream [residual, rest]."""
            res = self.res_len[seq]
            return torch.where(i < res, i, R + take[seq] + i - res)

        n_ev = int(evict.sum())
        if n_ev:
            seq = torch.repeat_interleave(arange_b, evict)
            j = torch.arange(n_ev, device=self.device) - (torch.cumsum(evict, 0) - evict)[seq]
            tokens = pending[seq, :, pending_index(seq, j), :]  # [N, H, D]
            self._write(seq, tokens, evict)
            self.q_len += evict
        if R:
            i = evict[:, None] + torch.arange(R, device=self.device)[None, :]
            keep = i < pend_len[:, None]
            src = pending_index(arange_b[:, None], i).clamp(0, R + n - 1)
            got = pending.gather(2, src[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
            self.residual = torch.where(keep[:, None, :, None], got, torch.zeros_like(got))
            self.res_len = pend_len - evict

    def _fast_path_ready(self, n: int) -> bool:
        """Whether an all-real append of ``n`` tokens per sequence can take :meth:`_append_steady` (reads the
        device once after a slow-path append, reserve or select; then tracks it on the host)."""
        if n == 0:
            return False
        if self._host_stale:
            T = self.config.page_size
            full = (self.sink_len == self.config.n_sink) & (self.res_len == self.config.residual_length)
            room = self.pages.pages_per_seq * T - self.q_len
            checks = [full.all().long(), room.min()]
            if self._nonfinite is not None:
                checks.append(self._nonfinite.isnan().reshape(()).long())
            got = torch.stack(checks).tolist()  # the one sync
            if len(got) == 3:
                self._raise_if_nonfinite(bool(got[2]))
            self._steady, self._headroom = bool(got[0]), int(got[1])
            self._host_stale = False
        return self._steady

    def _raise_if_nonfinite(self, bad: bool) -> None:
        self._unchecked_appends = 0
        if bad:
            self._failed = (f"{self.kind}s appended in the last {DEFERRED_CHECK_EVERY} decode steps contain NaN or "
                            "Inf; the cache holds them and cannot be used further")
            raise ValueError(self._failed)

    def _append_steady(self, x: torch.Tensor) -> None:
        """:meth:`append` of ``n`` real tokens to every sequence whose sinks and residual window are full:
        each sequence quantizes its ``n`` oldest pending tokens. No device sync on the Triton backend."""
        check_kv(x, f"{self.kind}s", self.num_heads, self.head_dim, self.device, finite=False)
        if x.shape[0] != self.batch:
            raise ValueError(f"{self.kind}s have batch {x.shape[0]} but the cache holds {self.batch}")
        B, H, n, D = x.shape
        x = x.to(self.dtype)
        R = self.config.residual_length
        fused = self.ops.fused_quantize  # the quantize kernel raises the NaN flag itself as it reads the tokens
        if self._nonfinite is None:
            self._nonfinite = torch.zeros(1, dtype=torch.float32, device=self.device)
        if not (fused and R == 0):
            self._nonfinite += (x - x).sum()  # x - x is 0, or NaN where x is NaN/Inf: the flag turns NaN for good
        self._unchecked_appends += 1
        if self._unchecked_appends >= DEFERRED_CHECK_EVERY:
            self._raise_if_nonfinite(bool(self._nonfinite.isnan()))
        if self._headroom < n:  # a new page for some sequence: allocate (one sync), re-read the room
            self.pages.reserve(self.q_len + n)
            self._host_stale = True
            self._fast_path_ready(n)
        self._headroom -= n
        out = x  # the n oldest pending tokens of each sequence are quantized
        if R:
            pending = torch.cat([self.residual, x], dim=2)
            out, self.residual = pending[:, :, :n], pending[:, :, n:].contiguous()
        tokens = out.transpose(1, 2).reshape(B * n, H, D)  # [N, H, D] grouped by sequence, oldest first
        self._reserve_outlier_slots()
        self.fresh_from = self.pages.n_pages
        # a decode step (n = 1) reuses the launch tables of the cache
        self.ops.quantize_append(self, self.ops.run_counts(self, n), tokens,
                                 nonfinite=self._nonfinite if fused and R == 0 else None)
        self.q_len += n

    def _write(self, seq: torch.Tensor, tokens: torch.Tensor, run_counts: torch.Tensor) -> None:
        """Store ``tokens [N, H, D]`` as the next quantized tokens of their sequences: ``run_counts[b]`` tokens of
        sequence ``b`` at positions ``q_len[b], q_len[b] + 1, ...``, sequences in order (``seq [N]``: each token's
        sequence). Reserves the pages, then hands the tokens to :attr:`ops`."""
        self.fresh_from = self.pages.n_pages
        self.pages.reserve(self.q_len.scatter_add(0, seq, torch.ones_like(seq)))
        self._reserve_outlier_slots()
        self.ops.quantize_append(self, run_counts, tokens)

    def _reserve_outlier_slots(self) -> None:
        """A slot per page position: the sparse matrix's slot capacity follows the page pool's."""
        if self.keep_outliers:
            self.outliers.reserve(slots=self.pages.capacity * self.config.page_size, exact=True)

    # -- reading --------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Dense codes of the quantized part: ``[B, H, Q, D]`` uint8 (Q = longest quantized run)."""
        return page_codes(self)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens, compact and right-padded.

        Returns:
            ``x [B, H, L, D]`` in the input dtype (zeros past each sequence's end) and
            ``mask [B, L]`` bool, with ``L`` the longest sequence.
        """
        quant = dequantize_pages(self)
        qmax = quant.shape[2]
        full = torch.cat([self.sink, quant, self.residual], dim=2)
        lengths = self.lengths
        L = int(lengths.max()) if self.batch else 0
        j = torch.arange(L, device=self.device)[None, :]
        s, q = self.sink_len[:, None], self.q_len[:, None]
        n_sink = self.config.n_sink
        src = torch.where(j < s, j, torch.where(j < s + q, n_sink + j - s, n_sink + qmax + j - s - q))
        mask = j < lengths[:, None]
        src = torch.where(mask, src, torch.zeros_like(src))
        x = full.gather(2, src[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
        return x * mask[:, None, :, None].to(x.dtype), mask

    def dequantize_aligned(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens placed at the real positions of a padded layout.

        Args:
            attention_mask: ``[B, S]``; row ``b`` must have exactly ``lengths[b]`` ones.

        Returns:
            ``[B, H, S, D]``: token ``k`` of sequence ``b`` at the ``k``-th real position, zeros at padding.
        """
        mask = check_mask(attention_mask, self.batch, attention_mask.shape[-1], self.device, allow_empty_rows=True)
        if not torch.equal(mask.sum(1), self.lengths):
            raise ValueError(f"attention_mask has {mask.sum(1).tolist()} real tokens per row but the cache "
                             f"holds {self.lengths.tolist()}")
        x, _ = self.dequantize()
        rank = (mask.long().cumsum(1) - 1).clamp_min(0)
        if x.shape[2] == 0:
            return x.new_zeros(self.batch, self.num_heads, mask.shape[1], self.head_dim)
        out = x.gather(2, rank[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
        return out * mask[:, None, :, None].to(out.dtype)

    # -- batch reordering (beam search) ---------------------------------------------------------------
    def select(self, index: torch.Tensor) -> QuantizedKVCache:
        """A new cache holding sequences ``index`` (repeats allowed, e.g. beam search)."""
        index = index.to(self.device, torch.int64)
        new = object.__new__(QuantizedKVCache)
        new.__dict__.update(self.__dict__)
        new.batch = index.numel()
        new._host_stale = True
        new._nonfinite = None if self._nonfinite is None else self._nonfinite.clone()
        new.pages, old_ids = self.pages.select(index)
        T = self.config.page_size
        old_slots = (old_ids[:, None] * T + torch.arange(T, device=self.device)).reshape(-1)
        new.outliers = self.outliers.select_slots(old_slots)
        for name in ("sink", "residual", "sink_len", "q_len", "res_len"):
            setattr(new, name, getattr(self, name)[index])
        if self.channel_scale is not None:
            new.channel_scale = self.channel_scale[index]
            new.channel_zero = self.channel_zero[index]
        return new

    # -- accounting -----------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, float]:
        """Bytes held by component, with ``bits_per_element`` over the real tokens stored.

        Counts everything kept: packed codes of every page in use (including the unused tail of each
        sequence's last page), scales, outlier values, indices and per-slot offsets (to block
        granularity), sink and residual tokens, the page table and the per-channel ranges.
        """
        P = self.pages.n_pages
        pools = self.pages.pools

        def pool_bytes(name: str) -> int:
            t = pools[name]
            return P * t[0].numel() * t.element_size() if t.shape[0] else 0

        rep: dict[str, float] = {}
        if self.quantized:
            rep["codes"] = pool_bytes("planes")
            scales = pool_bytes("scale") + pool_bytes("zero") if self.kind == "value" else 0
            if self.channel_scale is not None:
                scales += 2 * self.channel_scale.numel() * 4
            rep["scales"] = scales
            rep["outliers"] = self.outliers.nbytes() if self.keep_outliers else 0
        else:
            rep["dense"] = pool_bytes("raw")
        rep["sink"] = self.sink.numel() * self.sink.element_size()
        rep["residual"] = self.residual.numel() * self.residual.element_size()
        rep["page_table"] = self.pages.nbytes()
        total = sum(rep.values())
        elements = int(self.lengths.sum()) * self.num_heads * self.head_dim
        rep["total"] = total
        rep["elements"] = elements
        rep["fp16_bytes"] = 2 * elements
        rep["bits_per_element"] = 8 * total / elements if elements else float("nan")
        rep["outlier_fraction"] = self.outliers.nnz / max(int(self.q_len.sum()) * self.num_heads * self.head_dim, 1)
        return rep

    def nbytes(self) -> int:
        """Bytes held (see :meth:`memory_report`)."""
        return int(self.memory_report()["total"])

    def nbytes_allocated(self) -> int:
        """Bytes reserved, including pre-allocated capacity not yet used."""
        pools = sum(t.numel() * t.element_size() for t in self.pages.pools.values())
        extra = self.sink.numel() * self.sink.element_size() + self.residual.numel() * self.residual.element_size()
        if self.channel_scale is not None:
            extra += 2 * self.channel_scale.numel() * 4
        return pools + self.outliers.nbytes_allocated() + extra + self.pages.table.numel() * 4

    @property
    def bits_per_element(self) -> float:
        return float(self.memory_report()["bits_per_element"])

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(kind={self.kind}, datatype={self.config.datatype}, B={self.batch}, "
                f"H={self.num_heads}, D={self.head_dim}, lengths={self.lengths.tolist()})")
