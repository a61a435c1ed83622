"""``QuantizedKVCache``: the compressed keys *or* values of a batch of sequences.

A sequence's tokens, in order, are ``[sinks | quantized | residual]``:

* the first ``n_sink`` tokens, kept exactly (``sink [B, H, n_sink, D]``);
* quantized tokens in pages of ``T`` tokens drawn from one :class:`~kvquant.quant.paged.PageTable` pool shared by
  the batch: codes in units of 32 (:mod:`kvquant.quant.packing`), token-major (``codes [P, H, bits, T*D/32]``
  int32: a token's ``D`` codes are ``D/32`` consecutive units); per-token scale and zero codes for values
  (``scale/zero [P, H, T]`` uint8 against ``vref [P, H, 3]``, :func:`~kvquant.quant.encode.page_scales`),
  per-channel ranges for keys (``[B, H, D]`` float32); the exact outliers in a
  :class:`~kvquant.sparse.blocked.BlockedCSCMatrix` (keys, a column per token slot ``page * T + offset``) or a
  :class:`~kvquant.sparse.blocked.BlockedCSRMatrix` (values, a block per page);
* up to ``residual_length`` most recent tokens, kept exactly (``residual [B, H, R, D]``); a sequence whose key
  ranges come from its own tokens holds all of them here until it has ``hold_tokens`` past its sinks (the window is
  then wider than ``R``, for keys and values alike), see :meth:`QuantizedKVCache.settle` and ``hold_tokens``.

Keys are quantized token by token as they arrive. Values are quantized a page at a time: a sequence's last,
incomplete page of values (its *open page*, fewer than ``T`` tokens) is kept exactly in ``open [B, H, T, D]`` and
quantized when it fills, so the outliers of a page can be stored sorted by channel for the decode kernel. Every
byte of it is counted in :meth:`memory_report`.

With datatype ``fp16`` the pool holds the raw tokens (``raw [P, H, T, D]``) and nothing is quantized. Every
append, a whole prefill or one decode token per sequence, goes through the same path.
"""

from __future__ import annotations

from typing import Any

import torch

from kvquant.config import QuantConfig
from kvquant.quant.accounting import memory_report, nbytes_allocated
from kvquant.quant.backend import store_ops
from kvquant.quant.codebook import Codebook
from kvquant.quant.encode import decode_page_scales, range_to_scale_zero, values_per_side
from kvquant.quant.journal import StoreCheckpoint, checkpoint, restore
from kvquant.quant.open_pages import append_open_steady, write_open
from kvquant.quant.packing import lut_words
from kvquant.quant.paged import PageTable
from kvquant.quant.read import dequantize_pages, outlier_entries, page_codes
from kvquant.quant.rotation import rotate, rotation_matrix, unrotate
from kvquant.quant.static import append_static, begin_static, end_static
from kvquant.quant.stats import channel_ranges
from kvquant.quant.validate import check_kv, check_mask, compact_order
from kvquant.sparse.blocked import BlockedCSCMatrix, BlockedCSRMatrix

# sync-free decode appends check their tokens for NaN/Inf together, once per this many appends
DEFERRED_CHECK_EVERY = 32


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype for outliers: the input's own if 16-bit, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


class QuantizedKVCache:
    """Quantized keys or values of ``B`` sequences of ``H`` heads and head size ``D``.

    Build it with :class:`~kvquant.quant.quantizer.BatchedKVQuantizer`; grow it with :meth:`append`; read it
    with :meth:`dequantize`.

    Args:
        kind: ``"key"`` or ``"value"``.
        config: the quantization settings.
        batch, num_heads, head_dim: ``B``, ``H``, ``D``.
        dtype, device: of the tokens.
        codebook: levels of the quantized datatype (``None`` for ``fp16``).
        channel_scale, channel_zero: keys' per-channel affine map ``[B, H, D]`` (or broadcastable).
        ops: the kernels that write appended tokens (:mod:`kvquant.kernels.ops`): the ones a
            :class:`~kvquant.cache.hf_cache.KVQuantCache` resolved, or (``None``) ones resolved here from
            ``config.backend`` and ``device``. Triton ops that cannot write this store's shape or dtype fall back to
            the torch writes for ``backend="auto"`` and are an error for ``backend="triton"``; an ``fp16`` store is
            always written by torch (a copy).
        hold_tokens: ``M > 0``: a sequence holds its tokens past the sinks exactly in the residual window until it
            has ``M`` of them (or :meth:`settle`); then keys set their per-channel ranges from all of them (no
            ``channel_scale``/``channel_zero`` is given) and the window is quantized down to ``residual_length``
            tokens. The key and value stores of one layer take the same ``M``: the decode kernel reads both with one
            layout. ``0``: quantize from the first token (the ranges are given).
        rotation: the orthogonal ``R [D, D]`` (float32) tokens are stored rotated by (``x R``, every part: sinks,
            quantized pages, open page, residual window; :meth:`dequantize` returns ``x R^T``); default: the matrix of
            ``config.rotation`` (:func:`~kvquant.quant.rotation.rotation_matrix`), ``None`` when unrotated. Ranges
            and codebooks given here must be those of the rotated tokens. Readers of the raw storage (:meth:`codes`,
            the decode kernels) see the rotated basis.
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
        ops: Any | None = None,
        hold_tokens: int = 0,
        rotation: torch.Tensor | None = None,
    ) -> None:
        if kind not in ("key", "value"):
            raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
        self.kind = kind
        self.config = config
        self.batch, self.num_heads, self.head_dim = batch, num_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.quantized = config.is_quantized
        self.bits = config.bits_for(kind) if self.quantized else 16
        if rotation is None and config.rotated:
            rotation = rotation_matrix(config.rotation, head_dim, config.rotation_seed, self.device)
        if rotation is not None:
            if not self.quantized:
                raise ValueError(f"datatype {config.datatype} is not quantized: nothing to rotate")
            if tuple(rotation.shape) != (head_dim, head_dim):
                raise ValueError(f"rotation must be [D, D] = [{head_dim}, {head_dim}], got {tuple(rotation.shape)}")
            rotation = rotation.to(self.device, torch.float32)
        self.rotation: torch.Tensor | None = rotation
        T = config.page_size
        if self.quantized:
            if codebook is None:
                raise ValueError(f"datatype {config.datatype} needs a codebook")
            if codebook.bits != self.bits:
                raise ValueError(f"{kind} codebook has {codebook.bits} bits but datatype {config.datatype} stores "
                                 f"{kind}s at {self.bits}")
            if (T * head_dim) % 32:
                raise ValueError(f"page_size * head_dim must be a multiple of 32, got {T} * {head_dim}")
            self.codebook = codebook.to(self.device)
            self.zero_code = self.codebook.zero_code
            # the levels as a decode kernel's 16-bit byte tables (prmt lookups)
            self.lut = lut_words(self.codebook.levels, storage_dtype(dtype))
        else:
            self.codebook = None
        self.pages = PageTable(batch, T, self.device)
        if self.quantized:
            self.pages.add_pool("codes", (num_heads, self.bits, T * head_dim // 32), torch.int32)
            if kind == "value":
                # per (token, head) a scale code and a zero code, per (page, head) their reference (smax, zmin,
                # zstep): kvquant.quant.encode.page_scales
                self.pages.add_pool("scale", (num_heads, T), torch.uint8)
                self.pages.add_pool("zero", (num_heads, T), torch.uint8)
                self.pages.add_pool("vref", (num_heads, 3), torch.float32)
        else:
            self.pages.add_pool("raw", (num_heads, T, head_dim), dtype)
        self.channel_scale = self.channel_zero = None
        if hold_tokens < 0:
            raise ValueError(f"hold_tokens must be >= 0, got {hold_tokens}")
        self.hold_tokens = hold_tokens if self.quantized else 0
        if kind == "key" and self.quantized:
            if channel_scale is None or channel_zero is None:
                if not self.hold_tokens:
                    raise ValueError("quantized keys need per-channel scale and zero [B, H, D]")
                # placeholders: each sequence's ranges are set from its own tokens (_set_ranges)
                channel_scale, channel_zero = torch.ones(()), torch.zeros(())
            # [B, H, D] contiguous: the kernels read them every step
            self.channel_scale = channel_scale.to(self.device, torch.float32).expand(batch, num_heads, head_dim
                                                                                     ).contiguous()
            self.channel_zero = channel_zero.to(self.device, torch.float32).expand(batch, num_heads, head_dim
                                                                                   ).contiguous()
        self.keep_outliers = self.quantized and config.outlier_fraction > 0
        sdt = storage_dtype(dtype)
        # values: at most `per_side` outliers on each side of every token (see kvquant.quant.encode)
        self.per_side = values_per_side(config.outlier_fraction, num_heads * head_dim) if self.quantized else 0
        self.outliers: BlockedCSCMatrix | BlockedCSRMatrix | None = None
        self.open: torch.Tensor | None = None
        if kind == "key":
            self.outliers = BlockedCSCMatrix(num_heads * head_dim, sdt, self.device, config.block_nnz,
                                             group_size=head_dim)
        elif self.quantized:
            self.outliers = BlockedCSRMatrix(num_heads, head_dim, T, 2 * self.per_side, sdt, self.device)
            self.open = torch.zeros(batch, num_heads, T, head_dim, dtype=dtype, device=self.device)
        self.keep_outliers = self.keep_outliers and (kind == "key" or self.per_side > 0)
        self.sink = torch.zeros(batch, num_heads, config.n_sink, head_dim, dtype=dtype, device=self.device)
        self.residual = torch.zeros(batch, num_heads, config.residual_length, head_dim, dtype=dtype,
                                    device=self.device)
        self.sink_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.q_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.res_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        # [B] whether a sequence is past its exact hold (keys: its channel ranges are set)
        self.ranged = torch.full((batch,), self.hold_tokens == 0, dtype=torch.bool, device=self.device)
        # what the host knows, for appends without a device sync (see _append_steady)
        self._host_stale = True  # the fields below must be re-read from the device
        self._steady = False  # every sequence has all its sinks and a full residual window
        self._headroom = 0  # tokens every sequence can still quantize into its reserved pages (keys)
        self._q_host: list[int] = []  # q_len per sequence (values: which appends complete a page)
        # [1] float32 flag, NaN once a sync-free append met NaN/Inf, read every DEFERRED_CHECK_EVERY appends
        self._nonfinite: torch.Tensor | None = None
        self._unchecked_appends = 0
        self._failed: str | None = None
        # static decode (begin_static): one token per sequence and step, every index on the device, no host work:
        # the same launches each step, which a CUDA graph can capture
        self.static = False
        self.ops = store_ops(self, ops)

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def deferred(self) -> bool:
        """Whether tokens are quantized a page at a time (quantized values), with an exact open page."""
        return self.open is not None

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` tokens stored per sequence."""
        return self.sink_len + self.q_len + self.res_len

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.batch else 0

    def reserve(self, extra_tokens: int) -> None:
        """Pre-allocate pages (and outlier slots) for ``extra_tokens`` more tokens per sequence, sized exactly (no
        doubling slack). Reserved pages count as allocated in :meth:`memory_report`."""
        self.pages.reserve(self.q_len + self.res_len + extra_tokens, exact=True)
        self.grow_outliers()
        self._host_stale = True

    def begin_static(self, extra_tokens: int, outlier_headroom: float = 4.0) -> None:
        """Prepare ``extra_tokens`` decode steps with no host work (see :func:`kvquant.quant.static.begin_static`)."""
        begin_static(self, extra_tokens, outlier_headroom)

    def end_static(self) -> None:
        """Back to normal appends (see :func:`kvquant.quant.static.end_static`)."""
        end_static(self)

    def settle(self) -> None:
        """End the exact hold of every sequence still in it (see ``hold_tokens``): keys set their ranges from the
        tokens seen so far (past the sinks; the sinks when there are none), and the residual window is quantized
        down to ``residual_length`` tokens. The key and value stores of a layer must settle together (one layout).
        Nothing to do when every sequence is past its hold."""
        if self.hold_tokens and not bool(self.ranged.all()):
            self._host_stale = True
            x = self.residual.new_zeros(self.batch, self.num_heads, 0, self.head_dim)
            self._append_tokens(x, torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device), force=True)

    def grow_outliers(self) -> None:
        """The outlier stores follow the page pool: a slot per page position (keys), a block per page (values)."""
        if isinstance(self.outliers, BlockedCSCMatrix):
            self.outliers.reserve(slots=self.pages.capacity * self.config.page_size, exact=True)
        elif isinstance(self.outliers, BlockedCSRMatrix):
            self.outliers.reserve(self.pages.capacity, exact=True)

    # -- writing --------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, every_row: bool = False) -> None:
        """Append tokens to every sequence.

        Args:
            x: ``[B, H, n, D]`` new tokens (a prefill or ``n = 1`` decode tokens).
            attention_mask: ``[B, n]`` 1 for real tokens, 0 for padding (left, right or anywhere); ``None`` means
                all real. A row may be all padding here (that sequence gets nothing) unless ``every_row``, which
                refuses it (what a prefill needs), checked in the same device read as the rest.

        Decode steps (``attention_mask=None``, every sequence past its sinks and residual window) make no device
        sync on the Triton backend: what the host needs is known there, and NaN/Inf in ``x`` is detected up to
        :data:`DEFERRED_CHECK_EVERY` appends later (an error then; the cache is unusable after it).
        """
        if self._failed is not None:
            raise ValueError(self._failed)
        if self.rotation is not None and isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[-1] == self.head_dim:
            x = rotate(x, self.rotation)  # (a malformed x is refused below, with its own shape)
        if self.static:
            if attention_mask is not None or x.ndim != 4 or x.shape[0] != self.batch or x.shape[2] != 1:
                raise ValueError("a static cache takes one real token per sequence per append (end_static first)")
            append_static(self, x)
            return
        if attention_mask is None and isinstance(x, torch.Tensor) and x.ndim == 4 and self._fast_path_ready(x.shape[2]):
            self._append_steady(x)
            return
        self._host_stale = True
        name = f"{self.kind}s"
        check_kv(x, name, self.num_heads, self.head_dim, self.device, finite=False)
        if x.shape[0] != self.batch:
            raise ValueError(f"{self.kind}s have batch {x.shape[0]} but the cache holds {self.batch}")
        n = x.shape[2]
        mask = check_mask(attention_mask, self.batch, n, x.device, allow_empty_rows=True)
        self._append_tokens(x.to(self.dtype), mask, finite_check=(x, name), every_row=every_row)

    def _append_tokens(self, x: torch.Tensor, mask: torch.Tensor, force: bool = False,
                       finite_check: tuple[torch.Tensor, str] | None = None, every_row: bool = False) -> None:
        """:meth:`append` of checked tokens ``x [B, H, n, D]`` (the store's dtype) with ``mask [B, n]``; ``force``
        ends every exact hold (:meth:`settle`); ``finite_check=(tokens, name)``: refuse NaN/Inf in ``tokens``
        before anything is written; ``every_row``: refuse a row of ``mask`` without a real token. Every decision
        that needs the device's numbers is read in one sync."""
        n = x.shape[2]
        n_new = mask.sum(1)
        n_sink = self.config.n_sink
        take = torch.minimum(n_sink - self.sink_len, n_new)
        R = self.config.residual_length
        Rb = self.residual.shape[2]  # the window's width: R, or more while a sequence holds
        pend_len = self.res_len + n_new - take
        evict = (pend_len - R).clamp_min(0)
        newly = None
        if self.hold_tokens:
            newly = ~self.ranged & ((pend_len >= self.hold_tokens) | force)
            ranged = self.ranged | newly
            evict = torch.where(ranged, evict, torch.zeros_like(evict))
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        probe = [mask.all().long(), evict.sum(), zero if newly is None else newly.any().long(),
                 (pend_len - evict).max() if self.batch else zero,
                 torch.isfinite(finite_check[0]).all().long() if finite_check and x.numel() else zero + 1,
                 mask.any(1).all().long() if every_row and n else zero + 1,
                 zero if newly is None or not self.batch else torch.where(newly, pend_len, 0).max()]
        B = self.batch
        got = torch.cat([torch.stack(probe), take.long(), evict.long(), self.q_len.long()]).tolist()  # the one sync
        all_real, n_ev, any_newly, keep_max, finite, rows_ok, newly_max = got[:7]
        take_host, evict_host, q_host = got[7: 7 + B], got[7 + B: 7 + 2 * B], got[7 + 2 * B:]
        if not rows_ok:
            check_mask(mask, B, n, mask.device)  # raises, naming the empty rows; nothing written yet
        if not finite:
            check_kv(finite_check[0], finite_check[1])  # raises, naming the first bad index; nothing written yet
        if not all_real:  # move each row's real tokens to the front, in order
            order = compact_order(mask)
            x = x.gather(2, order[:, None, :, None].expand_as(x))
        arange_b = torch.arange(self.batch, device=self.device)

        # 1. sinks: the first n_sink real tokens of a sequence.
        if n_sink:
            j = torch.arange(n_sink, device=self.device)[None, :]
            src = j - self.sink_len[:, None]
            fill = (src >= 0) & (src < take[:, None])
            src = src.clamp(0, max(n - 1, 0))
            if n:
                got = x.gather(2, src[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
                self.sink = torch.where(fill[:, None, :, None], got, self.sink)
            self.sink_len = self.sink_len + take  # (rebound, never written in place: see kvquant.quant.journal)

        # 2. the rest passes through the residual window; what overflows it is quantized, oldest first. A sequence
        # in its exact hold keeps everything in the window until it has hold_tokens tokens past its sinks; then
        # (keys) its ranges are set from all of them and the window overflows as usual.
        pending = torch.cat([self.residual, x], dim=2) if Rb else x  # [B, H, Rb + n, D]

        def pending_index(seq: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            """Index in ``pending`` of position ``i`` of sequence ``seq``'s stream [residual, rest]."""
            res = self.res_len[seq]
            return torch.where(i < res, i, Rb + take[seq] + i - res)

        if newly is not None:
            if self.kind == "key" and any_newly:
                self._set_ranges(newly, pending, pend_len, pending_index, newly_max)
            self.ranged = ranged

        if n_ev:
            seq = torch.repeat_interleave(arange_b, evict, output_size=n_ev)
            j = torch.arange(n_ev, device=self.device) - (torch.cumsum(evict, 0) - evict)[seq]
            if Rb == 0:  # each sequence's new tokens after its sinks, in order: views of x, no gather
                t0, cnt = take_host, evict_host
                parts = [x[b, :, t0[b]: t0[b] + cnt[b]].transpose(0, 1) for b in range(self.batch) if cnt[b]]
                tokens = parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, H, D]
            else:
                tokens = pending[seq, :, pending_index(seq, j), :]  # [N, H, D]
            self._write(seq, self.q_len[seq] + j, tokens, evict, host=(q_host, evict_host))
            self.q_len = self.q_len + evict
        W = R
        if self.hold_tokens:  # the window holds what every sequence keeps (R once none holds)
            W = max(R, keep_max)
        if W and Rb + n:
            i = evict[:, None] + torch.arange(W, device=self.device)[None, :]
            keep = i < pend_len[:, None]
            src = pending_index(arange_b[:, None], i).clamp(0, Rb + n - 1)
            got = pending.gather(2, src[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
            self.residual = torch.where(keep[:, None, :, None], got, torch.zeros_like(got))
            self.res_len = pend_len - evict
        elif Rb:  # the window empties (R = 0 and the last hold ended)
            self.residual = self.residual.new_zeros(self.batch, self.num_heads, 0, self.head_dim)  # (no old storage)
            self.res_len = pend_len - evict

    def _set_ranges(self, rows: torch.Tensor, pending: torch.Tensor, pend_len: torch.Tensor, pending_index,
                    L: int) -> None:
        """Per-channel key ranges of sequences ``rows [B]`` (bool) from their stream (held window and new tokens,
        ``pend_len`` of them; ``L``: the longest of those of ``rows``), or from their sinks when the stream is empty:
        the ``f/2`` and ``1-f/2`` quantiles (:func:`~kvquant.quant.stats.channel_ranges`), the same as a prefill of
        all those tokens at once."""
        H, D = self.num_heads, self.head_dim
        i = torch.arange(L, device=self.device)[None, :]
        arange_b = torch.arange(self.batch, device=self.device)[:, None]
        src = pending_index(arange_b, i).clamp(0, max(pending.shape[2] - 1, 0))
        stream = pending.gather(2, src[:, None, :, None].expand(-1, H, -1, D)) if L else pending[:, :, :0]
        counted = rows[:, None] & (i < pend_len[:, None])
        j = torch.arange(self.sink.shape[2], device=self.device)[None, :]
        from_sinks = (rows & (pend_len == 0))[:, None] & (j < self.sink_len[:, None])
        lo, hi = channel_ranges(torch.cat([self.sink, stream], 2), torch.cat([from_sinks, counted], 1),
                                self.config.outlier_fraction)
        scale, zero = range_to_scale_zero(lo.nan_to_num(0.0), hi.nan_to_num(0.0))  # (no token at all: 0)
        pick = rows[:, None, None]
        self.channel_scale = torch.where(pick, scale, self.channel_scale).contiguous()
        self.channel_zero = torch.where(pick, zero, self.channel_zero).contiguous()

    def _fast_path_ready(self, n: int) -> bool:
        """Whether an all-real append of ``n`` tokens per sequence can take :meth:`_append_steady` (reads the
        device once after a slow-path append, reserve or select; then tracks it on the host)."""
        if n == 0 or (self.deferred and n != 1):
            return False
        if self._host_stale:
            T = self.config.page_size
            full = (self.sink_len == self.config.n_sink) & (self.res_len == self.config.residual_length)
            full = full & self.ranged
            room = self.pages.pages_per_seq * T - self.q_len
            checks = [full.all().long()[None], room.min()[None], self.q_len]
            if self._nonfinite is not None:
                checks.append(self._nonfinite.isnan().reshape(1).long())
            got = torch.cat(checks).tolist()  # the one sync
            if self._nonfinite is not None:
                self._raise_if_nonfinite(bool(got[-1]))
                got = got[:-1]
            self._steady, self._headroom = bool(got[0]), int(got[1])
            self._q_host = [int(v) for v in got[2:]]
            self._host_stale = False
        return self._steady and self.residual.shape[2] == self.config.residual_length

    def check_readable(self) -> None:
        """Raise if the store holds NaN/Inf that a sync-free append has not reported yet (one device read, only
        when such appends happened since the last check): nothing computed from a poisoned store reaches a caller.
        A static decode run is checked by ``end_static`` instead."""
        if self._failed is not None:
            raise ValueError(self._failed)
        if self._unchecked_appends and self._nonfinite is not None and not self.static:
            self._raise_if_nonfinite(bool(self._nonfinite.isnan()))

    def checkpoint(self, tokens_per_seq: int) -> StoreCheckpoint:
        """State to :meth:`restore` if the coming append must be undone (see :mod:`kvquant.quant.journal`)."""
        return checkpoint(self, tokens_per_seq)

    def restore(self, ck: StoreCheckpoint) -> None:
        """Undo the appends made since ``ck`` was taken."""
        restore(self, ck)

    def _raise_if_nonfinite(self, bad: bool) -> None:
        self._unchecked_appends = 0
        if bad:
            self._failed = (f"{self.kind}s appended in the last {DEFERRED_CHECK_EVERY} decode steps contain NaN or "
                            "Inf; the cache holds them and cannot be used further")
            raise ValueError(self._failed)

    def _append_steady(self, x: torch.Tensor) -> None:
        """:meth:`append` of ``n`` real tokens to every sequence whose sinks and residual window are full: each
        sequence quantizes its ``n`` oldest pending tokens. No device sync on the Triton backend."""
        check_kv(x, f"{self.kind}s", self.num_heads, self.head_dim, self.device, finite=False)
        if x.shape[0] != self.batch:
            raise ValueError(f"{self.kind}s have batch {x.shape[0]} but the cache holds {self.batch}")
        B, H, n, D = x.shape
        x = x.to(self.dtype)
        R = self.config.residual_length
        if self._nonfinite is None:
            self._nonfinite = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._nonfinite += (x - x).sum()  # x - x is 0, or NaN where x is NaN/Inf: the flag turns NaN for good
        self._unchecked_appends += 1
        if self._unchecked_appends >= DEFERRED_CHECK_EVERY:
            self._raise_if_nonfinite(bool(self._nonfinite.isnan()))
        out = x  # the n oldest pending tokens of each sequence are quantized
        if R:
            pending = torch.cat([self.residual, x], dim=2)
            out, self.residual = pending[:, :, :n], pending[:, :, n:].contiguous()
        if self.deferred:
            append_open_steady(self, out[:, :, 0])
        else:
            if self._headroom < n:  # a new page for some sequence: allocate, re-read the room (one sync)
                self.pages.reserve([q + n for q in self._q_host])
                self.grow_outliers()
                self._host_stale = True
                self._fast_path_ready(n)
            self._headroom -= n
            tokens = out.transpose(1, 2).reshape(B * n, H, D)  # [N, H, D] grouped by sequence, oldest first
            seq = torch.arange(B, device=self.device).repeat_interleave(n)
            pos = self.q_len[seq] + torch.arange(n, device=self.device).repeat(B)
            self._write(seq, pos, tokens, None)
        self.q_len = self.q_len + n
        self._q_host = [q + n for q in self._q_host]

    def _write(self, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor, run_counts: torch.Tensor | None,
               host: tuple[list[int], list[int]] | None = None) -> None:
        """Store ``tokens [N, H, D]`` as quantized token ``pos[i]`` of sequence ``seq[i]`` (runs: ``run_counts[b]``
        tokens of sequence ``b`` at positions ``q_len[b] ...``, sequences in order). ``host``: ``q_len`` and
        ``run_counts`` as lists, known on the host: pages are allocated from them (no device read); ``None``: a
        steady key append into pages already allocated."""
        if self.deferred:
            write_open(self, seq, pos, tokens, run_counts, host)
            return
        steady = host is None
        if not steady:
            self.pages.reserve([q + n for q, n in zip(*host)])
            self.grow_outliers()
        self.ops.write_keys(self, seq, pos, tokens, nonfinite=self._nonfinite if steady else None)

    # -- reading --------------------------------------------------------------------------------------
    @property
    def sealed_len(self) -> torch.Tensor:
        """``[B]`` quantized tokens whose pages are complete (values; keys: all of ``q_len``)."""
        return (self.q_len // self.config.page_size) * self.config.page_size if self.deferred else self.q_len

    def codes(self) -> torch.Tensor:
        """Codes of the quantized pages: ``[B, H, Q, D]`` uint8 (values: the sealed pages only)."""
        return page_codes(self)

    def dequantize(self, heads: tuple[int, int] | None = None, entries: tuple[torch.Tensor, ...] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens, compact and right-padded.

        Args:
            heads: ``(h0, h1)``: only heads ``h0 <= h < h1`` (the same numbers as that slice of the whole, with
                temporaries that much smaller); ``None``: all.
            entries: :meth:`outlier_entries`, found once by a caller that reads several head groups.

        Returns:
            ``x [B, H, L, D]`` in the input dtype (zeros past each sequence's end) and ``mask [B, L]`` bool, with
            ``L`` the longest sequence.
        """
        self.check_readable()
        h0, h1 = self._head_range(heads)
        quant = dequantize_pages(self, heads, entries)
        qmax = quant.shape[2]
        full = torch.cat([self.sink[:, h0:h1], quant, self.residual[:, h0:h1]], dim=2)
        lengths = self.lengths
        L = int(lengths.max()) if self.batch else 0
        j = torch.arange(L, device=self.device)[None, :]
        s, q = self.sink_len[:, None], self.q_len[:, None]
        n_sink = self.config.n_sink
        src = torch.where(j < s, j, torch.where(j < s + q, n_sink + j - s, n_sink + qmax + j - s - q))
        mask = j < lengths[:, None]
        src = torch.where(mask, src, torch.zeros_like(src))
        x = full.gather(2, src[:, None, :, None].expand(-1, h1 - h0, -1, self.head_dim))
        x = unrotate(x, self.rotation)  # (the same R for every head: a head group rotates back on its own)
        return x * mask[:, None, :, None].to(x.dtype), mask

    def outlier_entries(self) -> tuple[torch.Tensor, ...] | None:
        """The exact outliers of the quantized part, ``(sequence, head, position, channel, value)`` per entry
        (:func:`~kvquant.quant.read.outlier_entries`); ``None`` when the store keeps none."""
        self.check_readable()
        if not (self.quantized and self.keep_outliers):
            return None
        return outlier_entries(self)

    def check_aligned(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``attention_mask [B, S]`` as a bool mask on the store's device, after checking that row ``b`` has exactly
        ``lengths[b]`` real tokens (what :meth:`dequantize_aligned` needs)."""
        mask = check_mask(attention_mask, self.batch, attention_mask.shape[-1], self.device, allow_empty_rows=True)
        if not torch.equal(mask.sum(1), self.lengths):
            raise ValueError(f"attention_mask has {mask.sum(1).tolist()} real tokens per row but the cache "
                             f"holds {self.lengths.tolist()}")
        return mask

    def _head_range(self, heads: tuple[int, int] | None) -> tuple[int, int]:
        if heads is None:
            return 0, self.num_heads
        h0, h1 = (int(h) for h in heads)
        if not 0 <= h0 < h1 <= self.num_heads:
            raise ValueError(f"heads must be a range (h0, h1) with 0 <= h0 < h1 <= {self.num_heads}, got {heads}")
        return h0, h1

    def dequantize_aligned(self, attention_mask: torch.Tensor, heads: tuple[int, int] | None = None,
                           checked: bool = False, entries: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Tokens placed at the real positions of a padded layout.

        Args:
            attention_mask: ``[B, S]``; row ``b`` must have exactly ``lengths[b]`` ones.
            heads: ``(h0, h1)``: only those heads (see :meth:`dequantize`).
            checked: the mask was already checked against the store (a caller reading it a head group at a time
                checks once). entries: see :meth:`dequantize`.

        Returns:
            ``[B, H, S, D]``: token ``k`` of sequence ``b`` at the ``k``-th real position, zeros at padding.
        """
        h0, h1 = self._head_range(heads)
        mask = attention_mask if checked else self.check_aligned(attention_mask)
        x, _ = self.dequantize(heads, entries)
        rank = (mask.long().cumsum(1) - 1).clamp_min(0)
        if x.shape[2] == 0:
            return x.new_zeros(self.batch, h1 - h0, mask.shape[1], self.head_dim)
        out = x.gather(2, rank[:, None, :, None].expand(-1, h1 - h0, -1, self.head_dim))
        return out * mask[:, None, :, None].to(out.dtype)

    # -- batch reordering (beam search) ---------------------------------------------------------------
    def select(self, index: torch.Tensor) -> QuantizedKVCache:
        """A new cache holding sequences ``index`` (repeats allowed, e.g. beam search)."""
        self.check_readable()
        index = index.to(self.device, torch.int64)
        new = object.__new__(QuantizedKVCache)
        new.__dict__.update(self.__dict__)
        new.batch = index.numel()
        new._host_stale = True
        new._nonfinite = None if self._nonfinite is None else self._nonfinite.clone()
        new.pages, old_ids = self.pages.select(index)
        if isinstance(self.outliers, BlockedCSCMatrix):
            T = self.config.page_size
            old_slots = (old_ids[:, None] * T + torch.arange(T, device=self.device)).reshape(-1)
            # only the slots of tokens each sequence holds: an undone append may have left entries past them
            counts = new.pages.pages_per_seq
            seq = torch.repeat_interleave(torch.arange(counts.numel(), device=self.device), counts)
            rank = torch.arange(seq.numel(), device=self.device) - (counts.cumsum(0) - counts)[seq]
            held = (self.q_len[index][seq] - rank * T).clamp(0, T)
            keep = torch.arange(T, device=self.device)[None, :] < held[:, None]
            new.outliers = self.outliers.select_slots(old_slots, keep)
        elif isinstance(self.outliers, BlockedCSRMatrix):
            new.outliers = BlockedCSRMatrix(self.num_heads, self.head_dim, self.config.page_size,
                                            self.outliers.per_token, self.outliers.dtype, self.device,
                                            new.pages.capacity)
            new.outliers.copy_blocks(old_ids, torch.arange(old_ids.numel(), device=self.device))
            new.outliers.values[: old_ids.numel()] = self.outliers.values[old_ids]
            new.outliers.tokens[: old_ids.numel()] = self.outliers.tokens[old_ids]
            new.outliers.counts[: old_ids.numel()] = self.outliers.counts[old_ids]
            new.outliers.head_start[: old_ids.numel()] = self.outliers.head_start[old_ids]
        for name in ("sink", "residual", "sink_len", "q_len", "res_len", "ranged"):
            setattr(new, name, getattr(self, name)[index])
        if self.open is not None:
            new.open = self.open[index]
        if self.channel_scale is not None:
            new.channel_scale = self.channel_scale[index]
            new.channel_zero = self.channel_zero[index]
        return new

    def value_scales(self, page: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)``, float32 ``[N, H]`` each, of value token ``off[i]`` of page ``page[i]`` (a quantized
        value store's sealed pages): what its codes decode with, ``level * scale + zero``."""
        if self.kind != "value" or not self.quantized:
            raise ValueError("only a quantized value store has per-token scales")
        pools = self.pages.pools
        codes = (pools[name][page, :, off][..., None] for name in ("scale", "zero"))
        scale, zero = decode_page_scales(*codes, pools["vref"][page])
        return scale[..., 0], zero[..., 0]

    # -- accounting (kvquant.quant.accounting) ---------------------------------------------------------------
    def memory_report(self) -> dict[str, float]:
        """Bytes held by component, with ``bits_per_element`` over the real tokens stored (see
        :func:`kvquant.quant.accounting.memory_report`)."""
        self.check_readable()
        return memory_report(self)

    def nbytes(self) -> int:
        """Bytes held (see :meth:`memory_report`)."""
        return int(memory_report(self)["total"])

    def nbytes_allocated(self) -> int:
        """Bytes reserved, including pre-allocated capacity not yet used."""
        return nbytes_allocated(self)

    @property
    def bits_per_element(self) -> float:
        return float(memory_report(self)["bits_per_element"])

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(kind={self.kind}, datatype={self.config.datatype}, B={self.batch}, "
                f"H={self.num_heads}, D={self.head_dim}, lengths={self.lengths.tolist()})")
