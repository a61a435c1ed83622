"""Quantizing writers on the GPU: keys token by token, values a page at a time (Triton bodies in
:mod:`kvquant.kernels.jit.encode`).

Both store exactly the bytes the PyTorch reference of :class:`~kvquant.quant.store.QuantizedKVCache` stores.

* :func:`write_keys`: one launch quantizes every appended key into its units and stages its outliers; then the
  outliers go to their CSC slots: for a small append (a decode step, at most :data:`SMALL_APPEND` elements) one
  more launch that allocates them on the matrix's device counters (no host sync); for a large one (a prefill) the
  count is read once, slots are allocated, and a scatter launch copies them.
* :func:`write_value_pages`: per-token thresholds (one sort per token), then one program per page quantizes all
  its heads and writes the page's outlier block sorted by channel.
"""

from __future__ import annotations

import torch

from kvquant.kernels._triton import TRITON_IMPORT_ERROR, triton
from kvquant.kernels.jit.encode import (
    finish_small_kernel,
    key_tokens_kernel,
    scatter_kernel,
    value_pages_kernel,
    value_thresholds_kernel,
)
from kvquant.quant.encode import value_thresholds
from kvquant.quant.validate import same_device

# decode-step appends (one token per sequence) of at most this many elements (N * H * D) stage every element at its
# own place and finish without a host sync
SMALL_APPEND = 1 << 18
# the thresholds kernel sorts a token's H * D values in one program: up to this many (padded to a power of two)
SORT_MAX_ELEMENTS = 1 << 13
_BN = 16  # keys per program of the key writer
_THRESHOLD_TILE = 1 << 13  # values per program of the thresholds kernel (tokens x H x D)
LARGE_THRESHOLDS = 2048  # tokens from which value thresholds come from torch.topk (a prefill) instead of the kernel
_MAX_GRID = 65535


def unsupported_reason(store, tokens: torch.Tensor | None = None) -> str | None:
    """Why the Triton writers (and the decode kernel) cannot serve ``store`` (``None`` if they can)."""
    if triton is None:
        return f"triton is not available ({TRITON_IMPORT_ERROR})"
    if not store.quantized:
        return f"datatype {store.config.datatype} is not quantized"
    if store.head_dim not in (64, 128, 256):
        return f"head size {store.head_dim} (the kernels take 64, 128 or 256)"
    if store.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {store.dtype} (fp16/bf16/fp32 only)"
    T = store.config.page_size
    if T & (T - 1) or T > 256:
        return f"page size {T} (a power of two <= 256)"
    if triton.next_power_of_2(store.num_heads * store.head_dim) > SORT_MAX_ELEMENTS:
        return f"{store.num_heads} x {store.head_dim} values per token (at most {SORT_MAX_ELEMENTS})"
    if tokens is not None and not same_device(tokens.device, store.device):
        return f"tokens on {tokens.device}, cache on {store.device}"
    return None


def _mids(store) -> torch.Tensor:
    m = getattr(store, "_mids", None)
    if m is None:
        m = store._mids = store.codebook.midpoints.to(store.device, torch.float32).contiguous()
    return m


def write_keys(store, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
               nonfinite: torch.Tensor | None = None, static: bool = False) -> None:
    """Quantize keys ``tokens [N, H, D]`` into ``store``: token ``i`` at quantized position ``pos[i]`` of sequence
    ``seq[i]`` (pages reserved). ``nonfinite``: a ``[1]`` float32 flag the kernel sets to NaN if it meets NaN/Inf
    (no sync; ``None``: the caller checked). ``static``: a captured decode step (capacity reserved ahead, every
    count on the device)."""
    N = tokens.shape[0]
    if N == 0:
        return
    H, D, T = store.num_heads, store.head_dim, store.config.page_size
    dev = store.device
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    n_elem = N * H * D
    # the sync-free path reserves room for every element as an outlier: kept for a decode step (one token per
    # sequence); a multi-token append (prefill chunk) counts exactly (one sync) so no chunk-sized headroom is held
    small = n_elem <= SMALL_APPEND and (static or store.batch >= N)
    outl = store.outliers
    out = bool(store.keep_outliers)
    if out and small:
        cap = n_elem
    elif out:
        f = store.config.outlier_fraction
        cap = n_elem if n_elem <= 1 << 22 else min(n_elem, max(1 << 22, int(1.5 * f * n_elem) + 4 * N))
    else:
        cap = 1
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    cnt = torch.empty(N, H, dtype=torch.int32, device=dev)
    sst = torch.empty(N, H, dtype=torch.int32, device=dev)
    slot = torch.empty(N, dtype=torch.int64, device=dev)

    def launch(cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        stv = torch.empty(max(cap, 1), dtype=outl.dtype, device=dev)
        sti = torch.empty(max(cap, 1), dtype=torch.int32, device=dev)
        counter.zero_()
        tab = store.pages.table
        key_tokens_kernel[(triton.cdiv(N, _BN), H)](
            tokens, tokens.stride(0), tokens.stride(1), seq, pos, N,
            tab, tab.stride(0), store.channel_scale, store.channel_zero, _mids(store), store.zero_code,
            store.pages.pools["codes"], cnt, sst, slot, stv, sti, counter, cap,
            nonfinite if nonfinite is not None else counter,
            H, D=D, T=T, BITS=store.bits, BN=_BN, OUT=out, DENSE_STAGE=small,
            CHECK_FINITE=nonfinite is not None, num_warps=4,
        )
        return stv, sti

    stv, sti = launch(cap)
    if not out:
        return
    if small:  # one launch, no host sync
        dev_counts = outl.device_counters() if static else outl.begin_async_append(n_elem, store.pages.n_pages * T)
        hp = max(2, triton.next_power_of_2(H))
        finish_small_kernel[(1,)](
            cnt, sst, slot, stv, sti, dev_counts, outl.slot_start, outl.head_counts, outl.values, outl.indices, N, H,
            outl.capacity_nnz,
            BT=max(2, min(triton.next_power_of_2(N), max(2, 4096 // hp))), HP=hp, num_warps=4,
        )
        return
    total, top = torch.stack([counter[0].to(torch.int64), slot.max() + 1]).tolist()
    if total > cap:  # the compacted staging overflowed: again with room for all (every write is idempotent)
        stv, sti = launch(total)
    starts = outl.allocate_slots(slot, cnt.sum(1), total, top, head_counts=cnt)
    if total:
        scatter_kernel[(triton.cdiv(N, 32),)](cnt, sst, starts, stv, sti, outl.values, outl.indices, N, H,
                                             HP=triton.next_power_of_2(H), BT=32, num_warps=4)


def write_value_pages(store, page: torch.Tensor, page_tokens: torch.Tensor) -> None:
    """Quantize full pages of values ``page_tokens [n, H, T, D]`` into pages ``page [n]`` of ``store``."""
    n = page_tokens.shape[0]
    if n == 0:
        return
    H, D, T = store.num_heads, store.head_dim, store.config.page_size
    dev = store.device
    if page_tokens.stride(-1) != 1:
        page_tokens = page_tokens.contiguous()
    sp, sh, st = page_tokens.stride(0), page_tokens.stride(1), page_tokens.stride(2)
    k = store.per_side
    out = bool(store.keep_outliers)
    if out and n * T > LARGE_THRESHOLDS:  # many tokens: torch's top-k (the same order statistics)
        lo, hi = value_thresholds(page_tokens.transpose(1, 2).reshape(n * T, H * D), k)
    elif out:
        lo = torch.empty(n * T, dtype=torch.float32, device=dev)
        hi = torch.empty(n * T, dtype=torch.float32, device=dev)
        hdp = triton.next_power_of_2(H * D)
        btt = max(1, _THRESHOLD_TILE // hdp)  # tokens per program
        value_thresholds_kernel[(triton.cdiv(n * T, btt),)](page_tokens, sp, sh, st, lo, hi, k, n * T, lo, H, T=T,
                                                             D=D, HDP=hdp, BTT=btt, SEAL=False, num_warps=4)
    else:
        lo = hi = torch.zeros(1, dtype=torch.float32, device=dev)
    blocks = store.outliers
    pools = store.pages.pools
    page = page.to(dev, torch.int32).contiguous()
    for i0 in range(0, n, _MAX_GRID):
        i1 = min(n, i0 + _MAX_GRID)
        value_pages_kernel[(i1 - i0,)](
            page_tokens[i0:i1], sp, sh, st, lo[i0 * T:] if out else lo, hi[i0 * T:] if out else hi, page[i0:i1],
            _mids(store), store.zero_code,
            pools["codes"], pools["scale"], pools["zero"], pools["vref"],
            blocks.values, blocks.tokens, blocks.counts, blocks.head_start, blocks.block_cap, page, page, 0,
            H, D=D, T=T, BITS=store.bits, OUT=out, SEAL=False, num_warps=4,
        )


def seal_open_pages(store) -> None:
    """A captured decode step's seal: every sequence whose open page this step fills (``(q_len + 1) % T == 0``,
    ``q_len`` before the step's increment) has it quantized into its reserved page; the others exit at once. No host
    sync, the same launches every step."""
    B, H, D, T = store.batch, store.num_heads, store.head_dim, store.config.page_size
    dev = store.device
    x = store.open  # [B, H, T, D]
    sp, sh, st = x.stride(0), x.stride(1), x.stride(2)
    out = bool(store.keep_outliers)
    bufs = getattr(store, "_seal_buffers", None)
    if bufs is None:
        bufs = store._seal_buffers = (torch.empty(B * T, dtype=torch.float32, device=dev),
                                      torch.empty(B * T, dtype=torch.float32, device=dev))
    lo, hi = bufs
    if out:
        hdp = triton.next_power_of_2(H * D)
        btt = max(1, min(T, _THRESHOLD_TILE // hdp))
        value_thresholds_kernel[(triton.cdiv(B * T, btt),)](x, sp, sh, st, lo, hi, store.per_side, B * T, store.q_len,
                                                             H, T=T, D=D, HDP=hdp, BTT=btt, SEAL=True, num_warps=4)
    blocks = store.outliers
    pools = store.pages.pools
    tab = store.pages.table
    value_pages_kernel[(B,)](
        x, sp, sh, st, lo, hi, tab, _mids(store), store.zero_code,
        pools["codes"], pools["scale"], pools["zero"], pools["vref"],
        blocks.values, blocks.tokens, blocks.counts, blocks.head_start, blocks.block_cap, store.q_len, tab,
        tab.stride(0), H, D=D, T=T, BITS=store.bits, OUT=out, SEAL=True, num_warps=4,
    )
