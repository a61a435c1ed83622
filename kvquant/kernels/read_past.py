"""The past of a multi-token step (a prefill chunk, teacher forcing) read straight from the packed store.

:func:`read_past` writes every stored token of a :class:`~kvquant.quant.store.QuantizedKVCache` at the real
positions of a padded layout, in the output's dtype, with RoPE re-applied to pre-RoPE keys: one kernel launch and,
for values with outliers, a second one that writes them over the dequantized tokens. Neither reads anything back
to the host. The torch reference (:meth:`~kvquant.kernels.ops.TorchOps.read_past`) dequantizes a group of heads at
a time through float32 temporaries, with a host sync per step of the way.
"""

from __future__ import annotations

import torch

from kvquant.kernels._triton import triton
from kvquant.kernels.encode import unsupported_reason as store_problem
from kvquant.kernels.jit.read_past import read_past_kernel, value_outliers_kernel
from kvquant.quant.store import QuantizedKVCache

BLOCK_COLUMNS = 32  # output columns (tokens) per program
OUTLIER_LANES = 64  # value-outlier entries a program writes at a time
HEAD_COUNTS_AT_ONCE = 8  # per-head key-outlier counts a lane loads at a time (slot_entries' HC)


def head_count_chunk(heads: int) -> int:
    """The ``HC`` argument of :func:`~kvquant.kernels.jit.read_past.slot_entries` for ``heads`` heads."""
    return max(2, min(HEAD_COUNTS_AT_ONCE, triton.next_power_of_2(heads)))


def unsupported_reason(store: QuantizedKVCache) -> str | None:
    """Why :func:`read_past` cannot read ``store`` (``None`` if it can)."""
    why = store_problem(store)
    if why:
        return why
    if store.rotation is not None:
        return f"the store is rotated (rotation={store.config.rotation!r}): the torch path rotates it back"
    return None


def _levels(store: QuantizedKVCache) -> torch.Tensor:
    lev = getattr(store, "_read_levels", None)
    if lev is None:
        lev = store._read_levels = store.codebook.levels.to(store.device, torch.float32).contiguous()
    return lev


def column_of_token(mask: torch.Tensor) -> torch.Tensor:
    """``[B, S + 1]`` int64: the column of the ``k``-th real token of each row of ``mask [B, S]`` (bool) at ``k``
    (entries past a row's real tokens are unspecified)."""
    B, S = mask.shape
    rank = mask.long().cumsum(1) - 1
    idx = torch.where(mask, rank, torch.full_like(rank, S))
    cols = torch.arange(S, device=mask.device).expand(B, S)
    return torch.zeros(B, S + 1, dtype=torch.long, device=mask.device).scatter_(1, idx, cols)


def read_past(store: QuantizedKVCache, mask: torch.Tensor, out: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Write the stored tokens at the real positions of a padded layout.

    Args:
        store: a quantized store (keys or values) that :func:`unsupported_reason` accepts.
        mask: ``[B, S]`` bool, row ``b`` with exactly ``store.lengths[b]`` real positions (checked by the caller).
        out: ``[B, H, S, D]`` destination (a view is fine; its last dimension contiguous): token ``k`` of sequence
            ``b`` goes to the ``k``-th real position of row ``b``, zeros at padding.
        rope: ``(cos, sin)`` ``[B, S, D]`` float32 per column: the tokens are rotated (``x cos + rotate_half(x)
            sin``), e.g. pre-RoPE keys back to the model's keys.
    """
    B, S = mask.shape
    H, D, T = store.num_heads, store.head_dim, store.config.page_size
    if tuple(out.shape) != (B, H, S, D) or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, H, S, D] = {(B, H, S, D)} with a contiguous last axis, got "
                         f"{tuple(out.shape)} (strides {out.stride()})")
    if S == 0 or B == 0:
        return
    rank = mask.long().cumsum(1) - 1
    src = torch.where(mask, rank, torch.full_like(rank, -1)).to(torch.int32).contiguous()
    key = store.kind == "key"
    kout = bool(key and store.keep_outliers and store.outliers.nnz_upper > 0)
    deferred = bool(store.deferred)
    sink, res = store.sink.contiguous(), store.residual.contiguous()
    tab = store.pages.table
    pools = store.pages.pools
    dummy = src
    if key:
        cs, cz, vsc, vzr, vref, opn = store.channel_scale, store.channel_zero, dummy, dummy, dummy, dummy
    else:
        cs = cz = dummy
        vsc, vzr, vref = pools["scale"], pools["zero"], pools["vref"]
        opn = store.open if deferred else dummy
    o = store.outliers
    kss, khc, kov, koi = (o.slot_start, o.head_counts, o.values, o.indices) if kout else (dummy,) * 4
    cos, sin = (r.to(store.device, torch.float32).contiguous() for r in rope) if rope is not None else (dummy, dummy)
    read_past_kernel[(H * B * triton.cdiv(S, BLOCK_COLUMNS),)](
        out, out.stride(0), out.stride(1), out.stride(2), src, S,
        sink, sink.shape[2], res, res.shape[2], store.sink_len, store.q_len, store.res_len,
        pools["codes"], _levels(store), tab, tab.stride(0), cs, cz, vsc, vzr, vref, opn,
        kss, khc, kov, koi, cos, sin, H,
        D=D, T=T, BT=BLOCK_COLUMNS, BITS=store.bits, KEY=key, KOUT=kout, DEFERRED=deferred,
        ROPE=rope is not None, HC=head_count_chunk(H), num_warps=4,
    )
    if not key and store.keep_outliers:  # a program per (sequence, page slot, head); pages past the sealed ones
        csr = store.outliers  # return at once (no host read of the lengths)
        col = column_of_token(mask).to(torch.int32)
        n_pages = tab.shape[1]
        value_outliers_kernel[(B * n_pages * H,)](
            out, out.stride(0), out.stride(1), out.stride(2), col, S + 1, store.sink_len, store.sealed_len, tab,
            tab.stride(0), n_pages, csr.counts, csr.head_start, csr.tokens, csr.values, csr.block_cap, H,
            D=D, T=T, E=OUTLIER_LANES, num_warps=2,
        )
