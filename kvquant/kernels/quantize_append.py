"""Fused quantize-and-append: tokens ``[N, H, D]`` straight into the packed pages of a cache (Triton launch code;
the kernel bodies are in :mod:`kvquant.kernels.jit.quantize_append`).

What :func:`kvquant.quant.write.write_tokens` does in PyTorch (encode, unpack the touched pages,
scatter the codes, repack, build a dense outlier mask, ``nonzero`` it into the sparse matrix), in one pass
over the tokens plus a small pass over the outliers, writing byte-identical storage:

* ``_quantize_kernel``, grid ``(H, tiles)``. A tile is ``BN`` consecutive *positions* of one sequence,
  aligned to ``BN`` (a multiple of 32 dividing the page size), so it lies in one page and every int32
  bit-plane word it touches (32 consecutive tokens) belongs to it alone: no atomics on the pages, and only
  the first/last tile of a sequence's run (partly filled words, e.g. a decode append) read the old word
  and OR into it (fresh pages are zero). Per (tile, head) it loads ``[BN, D]`` tokens, normalises them in
  float32 exactly as :mod:`kvquant.quant.encode` does (keys: per-channel ``(x - zero) / scale``; values:
  per token-head min/max of the inliers -> scale/zero rounded to the storage dtype, stored, then
  ``(x - zero) / scale``; IEEE division ``div_rn`` like torch), flags outliers by threshold, finds the
  code by counting the sorted level midpoints below the value (``torch.bucketize``'s rule), ORs the
  code bits of each 32 tokens into one word per bit-plane and stores it. Outliers are compacted in the
  kernel: per (token, head) counts, exclusive prefix sums over the tile (tokens) and the head dim, one
  ``atomic_add`` per program on a global counter to reserve a staging range; entries (value in the
  storage dtype, channel ``h * D + d``) go there, grouped by (token, head) with channels ascending.
* ``_scatter_kernel``, grid ``(N / BT,)``: moves each (token, head) group from the staging range to its
  final place in the blocked CSC (keys) / CSR (values) buffers — slot start (prefix sum over tokens of the
  per-token counts) plus the exclusive prefix over heads — so a slot's entries are contiguous and sorted
  by channel, as :meth:`~kvquant.sparse.slots.BlockedSlotMatrix.append_dense` writes them. The per
  (token, head) counts are also the per-(slot, head) ``head_counts`` of the sparse matrix: written as they are
  (one torch copy in :meth:`QuantizeAppend.finish`) when a channel group is a head, else recounted in torch.

Left to PyTorch (a separate reduction before the kernel): the per-token value outlier thresholds, the
``f/2`` and ``1 - f/2`` quantiles over all ``H * D`` entries of a token (``torch.topk`` of the few
extreme order statistics, :func:`~kvquant.quant.stats.masked_quantile_pair`), and for keys the
per-channel ranges of the prompt (computed once per cache by the quantizer).
"""

from __future__ import annotations

import torch

from kvquant.kernels._triton import TRITON_IMPORT_ERROR, triton
from kvquant.kernels.jit import quantize_append as _jit
from kvquant.quant.stats import masked_quantile_pair, quantile_position
from kvquant.quant.validate import same_device

# Launch defaults of the quantize kernel, chosen from the compiler's resource report (sm_90, triton 3.9) rather than
# from timings (docs/design.md, "Prefill quantization"):
# BLOCK_N / NUM_WARPS: positions per program and warps; 32 with 4 warps has no register spills (64 spills 28-102
# registers to local memory).
BLOCK_N = 32
NUM_WARPS = 4
# CODE_TREE: codes by a select tree over the midpoints (bits straight from the compares) instead of counting the
# midpoints below and extracting the bits (same codes; 7 vs 14 instructions per element at 3 bits).
CODE_TREE = True
# THRESHOLDS: how the per-token value outlier thresholds are found: "sort" (_thresholds_kernel, one launch), "topk"
# (torch.topk of the extreme order statistics, ~10 launches) or "auto": sort for small appends (a decode step),
# topk for the others (on an H200 neither wins at every prefill shape; `bench kernels --prefill-sweep` times both).
THRESHOLDS = "auto"
THRESHOLD_METHODS = ("auto", "sort", "topk")
_MAX_GRID_Y = 65535
# appends of at most this many elements (N * H * D), "small" ones (a decode step), take the launch-light path: value
# thresholds by a sort kernel, every element staged in place (no counter), and one fused kernel that allocates and
# scatters the outliers with the count kept on the device (no host sync); the sparse matrix keeps room for that many
# more entries
ASYNC_MAX_ELEMENTS = 1 << 18
# the thresholds kernel sorts a token's H * D entries in one program: up to this many (padded to a power of two)
SORT_MAX_ELEMENTS = 1 << 13


def _constants(cache) -> dict[str, torch.Tensor]:
    """Tensors the launches of one cache reuse (built once per cache; ``unit_*``: the tables of a decode step,
    one token per sequence, used when the caller passes :func:`unit_counts`)."""
    consts = getattr(cache, "_quantize_append_constants", None)
    if consts is None or consts["batch"] != cache.batch:
        dev, B = cache.device, cache.batch
        consts = {
            "batch": B,
            "mids": cache.codebook.midpoints.to(dev, torch.float32).contiguous(),
            "dummy_f": torch.zeros(1, dtype=torch.float32, device=dev),
            "dummy_h": torch.zeros(1, dtype=torch.float16, device=dev),
            "dummy_i": torch.zeros(1, dtype=torch.int32, device=dev),
            "dummy_l": torch.zeros(1, dtype=torch.int64, device=dev),
            "unit_counts": torch.ones(B, dtype=torch.int64, device=dev),
            "unit_first": torch.arange(B, dtype=torch.int64, device=dev),
            "unit_ctile": torch.arange(B + 1, dtype=torch.int32, device=dev),
        }
        cache._quantize_append_constants = consts
    return consts


def _small_buffers(cache, consts: dict, n: int) -> dict[str, torch.Tensor]:
    """Work buffers of a small append of ``n`` tokens, kept per cache for the next append of the same size (a
    decode step's; launches are stream-ordered). One set at a time: other sizes replace it."""
    bufs = consts.get("small")
    if bufs is None or bufs["n"] != n:
        dev, H, D = cache.device, cache.num_heads, cache.head_dim
        bufs = {
            "n": n,
            "lo": torch.empty(n, dtype=torch.float32, device=dev),
            "hi": torch.empty(n, dtype=torch.float32, device=dev),
            "cnt": torch.empty(n, H, dtype=torch.int32, device=dev),
            "sst": torch.empty(n, H, dtype=torch.int32, device=dev),
            "slot": torch.empty(n, dtype=torch.int64, device=dev),
            "stv": torch.empty(max(n * H * D, 1), dtype=cache.outliers.dtype, device=dev),
            "sti": torch.empty(max(n * H * D, 1), dtype=torch.int32, device=dev),
        }
        consts["small"] = bufs
    return bufs


def unit_counts(cache) -> torch.Tensor:
    """``[B]`` ones: ``counts`` for a decode step, which lets :func:`quantize_append` reuse its launch tables."""
    return _constants(cache)["unit_counts"]


def unsupported_reason(cache, tokens: torch.Tensor | None = None) -> str | None:
    """Why the Triton path cannot write to ``cache`` (``None`` if it can)."""
    if triton is None:
        return f"triton is not available ({TRITON_IMPORT_ERROR})"
    if not cache.quantized:
        return f"datatype {cache.config.datatype} is not quantized"
    D = cache.head_dim
    if D < 16 or D & (D - 1):
        return f"head size {D} is not a power of two >= 16"
    if cache.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {cache.dtype} (fp16/bf16/fp32 only)"
    if cache.config.page_size % 32:
        return f"page size {cache.config.page_size} is not a multiple of 32"
    return None


def _block_n(T: int, block_n: int | None) -> int:
    bn = block_n or BLOCK_N
    if bn % 32 or bn & (bn - 1) or T % bn:
        bn = 64 if T % 64 == 0 else 32
    return bn


def quantize_append(
    cache,
    counts: torch.Tensor,
    tokens: torch.Tensor,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    staging_capacity: int | None = None,
    nonfinite: torch.Tensor | None = None,
    thresholds: str | None = None,
) -> None:
    """Quantize ``tokens`` and store them as the next quantized tokens of each sequence of ``cache``.

    Args:
        cache: a quantized :class:`~kvquant.quant.store.QuantizedKVCache` whose pages are already reserved for
            the new tokens (:meth:`~kvquant.quant.paged.PageTable.reserve`); its ``q_len`` is *not* advanced here.
        counts: ``[B]`` int, tokens appended to each sequence; sequence ``b`` gets positions
            ``q_len[b] .. q_len[b] + counts[b] - 1``.
        tokens: ``[N, H, D]`` in the cache dtype, ``N = counts.sum()``, grouped by sequence in order (the
            ``counts[0]`` tokens of sequence 0 first, oldest first); last dim contiguous.
        block_n: positions per program (32, 64, ... dividing the page size); ``None`` takes :data:`BLOCK_N`.
        num_warps: warps per program of the quantize kernel.
        staging_capacity: outlier staging entries (default: an estimate; re-run when exceeded). Testing knob.
        nonfinite: ``[1]`` float32 on the device, or None: the kernel sets it to NaN if ``tokens`` hold NaN/Inf
            (without a sync; the caller reads it when it wants). None: the caller has checked the tokens.
        thresholds: how value outlier thresholds are found (:data:`THRESHOLD_METHODS`); ``None`` takes
            :data:`THRESHOLDS`. Every method gives the same thresholds, bit for bit.
    """
    plan = QuantizeAppend(cache, counts, tokens, block_n=block_n, num_warps=num_warps,
                          staging_capacity=staging_capacity, nonfinite=nonfinite, thresholds=thresholds)
    plan.run_kernel()
    plan.finish()


class QuantizeAppend:
    """One append, split in its steps so that they can be timed apart (see :func:`quantize_append`).

    ``__init__`` checks the inputs and prepares the launch (tile table; for values the outlier thresholds,
    a torch ``topk`` reduction); :meth:`run_kernel` launches the fused quantize kernel (idempotent: it may
    run again); :meth:`finish` reads the outlier count (one device sync), allocates the sparse slots and
    scatters the staged outliers into place.
    """

    def __init__(self, cache, counts: torch.Tensor, tokens: torch.Tensor, *, block_n: int | None = None,
                 num_warps: int | None = None, staging_capacity: int | None = None,
                 code_tree: bool | None = None, nonfinite: torch.Tensor | None = None,
                 thresholds: str | None = None) -> None:
        reason = unsupported_reason(cache, tokens)
        if reason is not None:
            raise ValueError(f"the triton quantize-append path cannot write this cache: {reason}")
        B, H, D = cache.batch, cache.num_heads, cache.head_dim
        dev = cache.device
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tuple(tokens.shape[1:]) != (H, D):
            raise ValueError(f"tokens must be [N, {H}, {D}], got {getattr(tokens, 'shape', type(tokens))}")
        if not same_device(tokens.device, dev):
            raise ValueError(f"tokens are on {tokens.device} but the cache lives on {dev}")
        if tokens.dtype != cache.dtype:
            raise TypeError(f"tokens must have the cache dtype {cache.dtype}, got {tokens.dtype}")
        if not isinstance(counts, torch.Tensor) or counts.ndim != 1 or counts.numel() != B:
            raise ValueError(f"counts must be a [B] = [{B}] tensor, got {getattr(counts, 'shape', counts)}")
        self.cache = cache
        self.N = N = tokens.shape[0]
        if N == 0:
            return
        if tokens.stride(-1) != 1:
            tokens = tokens.contiguous()
        self.tokens = tokens
        T = cache.config.page_size
        self.BN = BN = _block_n(T, block_n)
        self.num_warps = num_warps or NUM_WARPS
        self.code_tree = bool(CODE_TREE if code_tree is None else code_tree)
        consts = _constants(cache)
        self.start = cache.q_len.to(torch.int64)
        if N == B and counts is consts["unit_counts"]:
            # one token per sequence (a decode step): every run is one tile, the tables are constant
            self.counts, self.first, self.ctile = counts, consts["unit_first"], consts["unit_ctile"]
        else:
            counts = counts.to(dev, torch.int64)
            self.counts = counts
            self.first = torch.cumsum(counts, 0) - counts
            n_t = torch.where(counts > 0, (self.start + counts + BN - 1) // BN - self.start // BN,
                              torch.zeros_like(counts))
            self.ctile = torch.zeros(B + 1, dtype=torch.int32, device=dev)
            self.ctile[1:] = torch.cumsum(n_t, 0).to(torch.int32)
        # grid bound without a device sync (idle programs exit at once): a sequence's run spans at most two
        # partly filled tiles beyond its share of full ones
        self.max_tiles = -(-N // BN) + 2 * B
        self.mids = consts["mids"]
        self.is_key = cache.kind == "key"
        self.out = bool(cache.keep_outliers)
        self.nonfinite = nonfinite
        self.n_elem = n_elem = N * H * D
        # a small append (a decode step) takes the launch-light path; see ASYNC_MAX_ELEMENTS
        self.small = (n_elem <= ASYNC_MAX_ELEMENTS and staging_capacity is None
                      and cache.outliers.n_groups == H)  # the fused finish writes per-head counts
        small_bufs = _small_buffers(cache, consts, N) if self.small and self.out else None
        dummy_f = consts["dummy_f"]
        pools = cache.pages.pools
        if self.is_key:
            cs, cz = cache.channel_scale, cache.channel_zero
            if cs.stride(2) != 1 or cz.stride() != cs.stride():
                cs, cz = cs.contiguous(), cz.contiguous()
            self.cs, self.cz, self.cs_strides = cs, cz, (cs.stride(0), cs.stride(1))
            self.vs = self.vz = consts["dummy_h"]
            self.lo = self.hi = dummy_f
        else:
            self.cs = self.cz = dummy_f
            self.cs_strides = (0, 0)
            self.vs, self.vz = pools["scale"], pools["zero"]
            self.lo = self.hi = dummy_f
            if self.out:  # per-token thresholds over all H*D entries, before the kernel
                f = cache.config.outlier_fraction
                method = thresholds or THRESHOLDS
                if method not in THRESHOLD_METHODS:
                    raise ValueError(f"thresholds must be one of {THRESHOLD_METHODS}, got {method!r}")
                sort = (method == "sort" or (method == "auto" and self.small)) and \
                    triton.next_power_of_2(H * D) <= SORT_MAX_ELEMENTS
                if sort:
                    if small_bufs is not None:
                        self.lo, self.hi = small_bufs["lo"], small_bufs["hi"]
                    else:
                        self.lo, self.hi = (torch.empty(N, dtype=torch.float32, device=dev) for _ in range(2))
                    self._thresholds(f / 2, 1 - f / 2)
                else:  # a torch reduction (topk of the extreme order statistics)
                    self.lo, self.hi = masked_quantile_pair(tokens.reshape(N, H * D), None, f / 2, 1 - f / 2)
        if small_bufs is not None:  # every element has its staging place: no counter, no overflow
            self.cap = n_elem
            self.cnt, self.sst, self.slot = small_bufs["cnt"], small_bufs["sst"], small_bufs["slot"]
            self.stv, self.sti = small_bufs["stv"], small_bufs["sti"]
            self.counter = consts["dummy_i"]
        elif self.out:
            f = cache.config.outlier_fraction
            est = n_elem if n_elem <= 1 << 22 else min(n_elem, max(1 << 22, int(1.5 * f * n_elem) + 4 * N))
            self.cap = staging_capacity or est
            self.cnt = torch.empty(N, H, dtype=torch.int32, device=dev)
            self.sst = torch.empty(N, H, dtype=torch.int32, device=dev)
            self.slot = torch.empty(N, dtype=torch.int64, device=dev)
            self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
            self._alloc_staging(self.cap)
        else:
            self.cap = 0
            self.cnt = self.sst = self.counter = consts["dummy_i"]
            self.slot = consts["dummy_l"]
            self._alloc_staging(0)

    def _thresholds(self, q_lo: float, q_hi: float) -> None:
        """Per-token value thresholds into ``self.lo`` / ``self.hi`` by :func:`_thresholds_kernel`."""
        c = self.cache
        n = c.num_heads * c.head_dim
        lo, hi = quantile_position(n, q_lo), quantile_position(n, q_hi)
        _jit._thresholds_kernel[(self.N,)](
            self.tokens, self.tokens.stride(0), self.tokens.stride(1), self.lo, self.hi, *lo, *hi, c.num_heads,
            D=c.head_dim, HDP=triton.next_power_of_2(n), num_warps=4, enable_fp_fusion=False,
        )

    def _alloc_staging(self, cap: int) -> None:
        dev = self.cache.device
        self.stv = torch.empty(max(cap, 1), dtype=self.cache.outliers.dtype, device=dev)
        self.sti = torch.empty(max(cap, 1), dtype=torch.int32, device=dev)

    def run_kernel(self) -> None:
        """Launch the fused quantize kernel (codes into the pages, value scales, staged outliers)."""
        if self.N == 0:
            return
        c = self.cache
        if self.out and not self.small:
            self.counter.zero_()
        tab = c.pages.table
        for t0 in range(0, self.max_tiles, _MAX_GRID_Y):
            _jit._quantize_kernel[(c.num_heads, min(_MAX_GRID_Y, self.max_tiles - t0))](
                self.tokens, self.tokens.stride(0), self.tokens.stride(1),
                self.first, self.start, self.counts, self.ctile, t0,
                tab, tab.stride(0),
                self.cs, self.cz, self.cs_strides[0], self.cs_strides[1],
                self.lo, self.hi, self.mids,
                c.pages.pools["planes"], self.vs, self.vz,
                self.cnt, self.sst, self.slot, self.stv, self.sti, self.counter, self.cap,
                self.lo if self.nonfinite is None else self.nonfinite,  # (any float32 pointer when unused)
                c.batch, c.num_heads,
                D=c.head_dim, T=c.config.page_size, BITS=c.bits, BN=self.BN, BP=triton.next_power_of_2(c.batch + 1),
                KEY=self.is_key, OUT=self.out, ZERO_CODE=c.codebook.zero_code, CODE_TREE=self.code_tree,
                DENSE_STAGE=self.small, CHECK_FINITE=self.nonfinite is not None, num_warps=self.num_warps,
            )

    def finish(self) -> None:
        """Move the staged outliers into the cache's sparse matrix (after :meth:`run_kernel`).

        Small appends (a decode step: at most :data:`ASYNC_MAX_ELEMENTS` elements) make one launch and no device
        sync: the staging holds every element, so it cannot overflow, and :func:`_finish_small_kernel` allocates,
        scatters and advances the matrix's device counters
        (:meth:`~kvquant.sparse.slots.BlockedSlotMatrix.begin_async_append`). Larger ones read the count
        once (to size the staging exactly and allocate the entries)."""
        if self.N == 0 or not self.out:
            return
        outl = self.cache.outliers
        # per-(slot, head) counts: the kernel's per-(token, head) counts are exactly that when a channel group
        # is a head (QuantizedKVCache's layout); other groupings are recounted in torch after the scatter
        per_head = outl.n_groups == self.cache.num_heads
        H = self.cache.num_heads
        if self.small:  # one launch, no sync (small implies per-head groups)
            dev_counts = outl.begin_async_append(self.n_elem, self.cache.pages.n_pages * self.cache.config.page_size)
            _jit._finish_small_kernel[(1,)](
                self.cnt, self.sst, self.slot, self.stv, self.sti, dev_counts, outl.slot_start, outl.slot_count,
                outl.head_counts, outl.values, outl.indices, self.N, H,
                BT=max(2, min(triton.next_power_of_2(self.N), max(2, 4096 // triton.next_power_of_2(H)))),
                HP=max(2, triton.next_power_of_2(H)), num_warps=4,
            )
            return
        tot = self.cnt.sum(1)
        total, top = torch.stack([self.counter[0].to(torch.int64), self.slot.max() + 1]).tolist()
        if total > self.cap:  # staging overflowed: run again with room for all (every write is idempotent)
            self.cap = total
            self._alloc_staging(total)
            self.run_kernel()
        tstart = outl.allocate_slots(self.slot, tot, total, top, head_counts=self.cnt if per_head else None)
        if total:
            self._scatter(tstart)
        if not per_head:
            outl.recount_groups(self.slot)

    def _scatter(self, tstart: torch.Tensor) -> None:
        """Copy the staged outliers of every (token, head) to its place in the sparse matrix."""
        outl = self.cache.outliers
        BT = 32
        H = self.cache.num_heads
        _jit._scatter_kernel[(triton.cdiv(self.N, BT),)](
            self.cnt, self.sst, tstart, self.stv, self.sti, outl.values, outl.indices, self.N, H,
            HP=triton.next_power_of_2(H), BT=BT, num_warps=4,
        )
