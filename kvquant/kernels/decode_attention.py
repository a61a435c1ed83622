"""Decode attention directly over the packed KV format (flash-decoding, split over pages).

One query token per sequence attends over ``[sinks | quantized pages | open page | residual]`` of a key and a
value :class:`~kvquant.quant.store.QuantizedKVCache` without writing dequantized K/V anywhere (the kernels are in
:mod:`kvquant.kernels.jit.decode_attention`): a keys pass and a values pass per (sequence, KV head, range of
pages), the outlier corrections, an exact kernel for
sinks and residual tokens, and a reduction that also takes the step's own token (``extra_kv``).

The kernels need a quantized datatype, head size 64/128/256, a power-of-two page size, and RoPE tables with equal
halves (Llama's ``rotate_half`` layout) when keys are stored pre-RoPE, and stores without a channel rotation
(``QuantConfig.rotation``); :func:`unsupported_reason` says why not, and
the torch reference (``TorchOps``, :func:`~kvquant.kernels.reference.decode_attention_reference`) covers the rest.
"""

from __future__ import annotations

import math
import os

import torch

from kvquant.kernels._triton import tl, triton
from kvquant.kernels.encode import unsupported_reason as store_problem
from kvquant.kernels.jit.decode_attention import (
    exact_kernel,
    key_corr_kernel,
    keys_kernel,
    reduce_kernel,
    value_outliers_kernel,
    values_kernel,
)
from kvquant.kernels.reference import Rope, check_decode_inputs
from kvquant.quant.store import QuantizedKVCache

LOG2E = 1.4426950408889634
PROGRAMS_PER_SM = 8  # split-K target: about this many page programs per multiprocessor
MAX_TILE = 32  # tokens per tile of the key and value passes (smaller pages: the page size)
CORR_WARPS = 4  # warps per program of the key-outlier correction kernel
CORR_LANES = 512  # tokens x entries per round of the key-outlier correction kernel
CORR_ROUND = 16  # entries of a token per round of the key-outlier correction kernel
OUTLIER_PAGES = 4  # pages per step of the value-outlier kernel
OUTLIER_ENTRIES = 64  # entries per page and step of the value-outlier kernel
MHA_REDUCE = 1  # one query head per KV head: the keys pass sums rows instead of one-column dots (0: dots)
OUTLIER_SPLIT = 4  # pages per program of the value-outlier kernel (0: the key and value passes' split)


def unsupported_reason(q: torch.Tensor, key_cache: QuantizedKVCache, value_cache: QuantizedKVCache,
                       rope: Rope | None = None) -> str | None:
    """Why the Triton path cannot compute this decode attention (``None`` if it can)."""
    for c in (key_cache, value_cache):
        why = store_problem(c)
        if why:
            return why
    if key_cache.config.page_size != value_cache.config.page_size:
        return "key and value caches have different page sizes"
    rotated = [c.kind for c in (key_cache, value_cache) if getattr(c, "rotation", None) is not None]
    if rotated:
        return (f"{' and '.join(rotated)} caches are stored rotated (rotation={key_cache.config.rotation!r}); the "
                "kernel reads un-rotated codes (it applies RoPE to the stored keys): the torch path "
                "(dequantize, rotate back, attend) serves them")
    if rope is not None and rope[0].shape[-1] != q.shape[-1] // 2:
        return "RoPE tables without equal halves (the kernel takes [max_pos, D/2] tables)"
    return None


def _num_sms(device: torch.device) -> int:
    """Multiprocessors to fill (off CUDA, under the interpreter: 1, where every program costs time)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _use_asm(device: torch.device, dtype: torch.dtype) -> bool:
    """Byte-permute lookups on a CUDA device for 16-bit caches; gathers under the interpreter and for float32."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not os.environ.get("TRITON_INTERPRET")


def _levels(cache: QuantizedKVCache, dtype: torch.dtype) -> torch.Tensor:
    """The levels as the kernel's dot operands hold them (rounded to ``dtype``), in float32 (the gather path)."""
    lev = getattr(cache, "_kernel_levels", None)
    if lev is None or lev[0] != dtype:
        lev = cache._kernel_levels = (dtype, cache.codebook.levels.to(cache.device, dtype).float().contiguous())
    return lev[1]


def _zero_level(cache: QuantizedKVCache, lev: torch.Tensor) -> float:
    """The level of the zero code (an outlier's dense code) as the kernel holds it (read once per cache)."""
    z = getattr(cache, "_kernel_zero_level", None)
    if z is None or z[0] is not lev:
        z = cache._kernel_zero_level = (lev, float(lev[cache.zero_code]))
    return z[1]


def _key_dense_at_zero(cache: QuantizedKVCache, lev: torch.Tensor) -> torch.Tensor:
    """``[B, H, D]`` float32: the dense key an outlier's zero code stands for, ``scale * level + zero`` per channel
    (kept with the cache while its channel map is the same)."""
    got = getattr(cache, "_kernel_dense_zero", None)
    if got is None or got[0] is not cache.channel_scale or got[1] is not lev:
        dz = (cache.channel_scale * _zero_level(cache, lev) + cache.channel_zero).contiguous()
        got = cache._kernel_dense_zero = (cache.channel_scale, lev, dz)
    return got[2]


def decode_attention(
    q: torch.Tensor,
    key_cache: QuantizedKVCache,
    value_cache: QuantizedKVCache,
    softmax_scale: float | None = None,
    rope: Rope | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    pages_per_split: int | None = None,
    num_warps: int = 2,
    block_t: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one query token per sequence over a quantized KV cache.

    Args:
        q: ``[B, Hq, D]`` queries (already rotated if the model uses RoPE); ``Hq`` a multiple of the caches' KV
            heads (grouped-query attention).
        key_cache, value_cache: :class:`QuantizedKVCache` of kind ``"key"`` and ``"value"`` of the same sequences.
        softmax_scale: default ``1/sqrt(D)``.
        rope: optional ``(cos, sin, pos_offset [B])`` float32 tables ``[max_pos, D/2]`` (Llama's tables have equal
            halves; ``[max_pos, D]`` tables go to the torch path): key token ``k`` of sequence ``b`` is rotated to
            position ``pos_offset[b] + k``.
        extra_kv: optional ``(k [B, Hkv, D], v [B, Hkv, D])``: one more exact token per sequence (already rotated),
            attended after the cached ones.
        pages_per_split: pages per program of the split pass (default: about :data:`PROGRAMS_PER_SM` programs per
            multiprocessor).
        num_warps, num_stages: warps and software-pipelining depth of the key and value programs. block_t: tokens
            per tile (default ``min(page_size, 32)``).

    Returns:
        ``[B, Hq, D]`` in ``q.dtype`` (zeros for a sequence with no token and no extra token on the triton path).
    """
    check_decode_inputs(q, key_cache, value_cache, extra_kv)
    B, Hq, D = q.shape
    Hkv = key_cache.num_heads
    if rope is not None:
        cos, sin, _ = rope
        if cos.ndim != 2 or sin.shape != cos.shape or cos.shape[-1] not in (D, D // 2):
            raise ValueError(f"rope tables must be [max_pos, {D}] or [max_pos, {D // 2}], got {tuple(cos.shape)}, "
                             f"{tuple(sin.shape)}")
    why = unsupported_reason(q, key_cache, value_cache, rope)
    if why:
        raise ValueError(f"the Triton decode attention cannot run here: {why} (use the torch ops)")
    kc, vc = key_cache, value_cache
    dev = q.device
    T = kc.config.page_size
    BT = block_t or min(T, MAX_TILE)
    G = Hq // Hkv
    GQ = GP = triton.next_power_of_2(G)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qs = (q.float() * (scale * LOG2E)).contiguous()
    use_asm = _use_asm(dev, kc.dtype)
    dt = kc.dtype if kc.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if dt == torch.bfloat16 and os.environ.get("TRITON_INTERPRET"):
        dt = torch.float32  # Triton's interpreter multiplies bfloat16 dot operands wrongly (triton 3.9)
    DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dt, tl.float32)
    prec = "ieee" if dt == torch.float32 else "tf32"
    red = bool(GP == 1 and MHA_REDUCE)

    ktab, vtab = kc.pages.table, vc.pages.table
    max_pages = ktab.shape[1]
    if pages_per_split is None:
        target = PROGRAMS_PER_SM * _num_sms(dev)
        pages_per_split = max(1, -(-max_pages * B * Hkv // target))
    n_splits = max(1, -(-max_pages // pages_per_split))
    NS1 = n_splits + 1
    opart = torch.empty(B, Hq, NS1, D, dtype=torch.float32, device=dev)
    mpart = torch.empty(B, Hq, NS1, dtype=torch.float32, device=dev)
    lpart = torch.empty(B, Hq, NS1, dtype=torch.float32, device=dev)

    if rope is not None:
        cos, sin, pos_offset = rope
        cos = cos.to(dev, torch.float32).contiguous()
        sin = sin.to(dev, torch.float32).contiguous()
        if cos.shape[0] < BT:
            raise ValueError(f"rope tables cover {cos.shape[0]} positions, fewer than a tile ({BT})")
        # rotation by the in-tile offset tau, without the tables' scale: R(p0 + tau) = R(p0) R(tau)
        mscale = cos[:1]
        rc, rs = (cos[:BT] / mscale).contiguous(), (sin[:BT] / mscale).contiguous()
        pos = pos_offset.to(dev, torch.int32).contiguous()
    else:
        cos = sin = rc = rs = torch.zeros(1, device=dev)
        pos = torch.zeros(B, dtype=torch.int32, device=dev)

    kout, vout = kc.outliers, vc.outliers
    KOUT = bool(kc.keep_outliers and kout.nnz_upper > 0)
    VOUT = bool(vc.keep_outliers)
    klev, vlev = _levels(kc, dt), _levels(vc, dt)
    Lmax = max_pages * T
    scores = torch.empty(B, Hq, Lmax, dtype=torch.float32, device=dev)
    keys_kernel[(B * Hkv, n_splits)](
        qs, scores, Lmax, kc.pages.pools["codes"], kc.lut, klev, kc.channel_scale, kc.channel_zero, ktab,
        ktab.stride(0), kc.q_len, kc.sink_len, pos, cos, sin, rc, rs, Hkv, Hq, pages_per_split,
        G=G, GP=GP, D=D, T=T, BT=BT, KBITS=kc.bits, ROPE=rope is not None, USE_ASM=use_asm, DT=DT, PREC=prec,
        RED=red, num_warps=num_warps, num_stages=num_stages,
    )
    if KOUT:
        HP = max(2, triton.next_power_of_2(Hkv))
        key_corr_kernel[(B, triton.cdiv(Lmax, CORR_LANES // CORR_ROUND))](
            qs, scores, ktab, ktab.stride(0), kout.slot_start, kout.head_counts, kout.values, kout.indices,
            _key_dense_at_zero(kc, klev), kc.q_len, kc.sink_len, pos, cos, sin,
            Hkv, Hq, Lmax, G=G, GQ=GQ, HP=HP, LOGH=HP.bit_length() - 1, D=D, T=T, BLK=CORR_LANES // CORR_ROUND,
            JJ=CORR_ROUND, ROPE=rope is not None, num_warps=CORR_WARPS,
        )
    values_kernel[(B * Hkv, n_splits)](
        opart, mpart, lpart, scores, Lmax, vc.pages.pools["codes"], vc.lut, vlev, vc.pages.pools["scale"],
        vc.pages.pools["zero"], vc.pages.pools["vref"], vtab, vtab.stride(0), vc.open, kc.q_len, Hkv, Hq,
        pages_per_split, NS1,
        G=G, GP=GP, D=D, T=T, BT=BT, VBITS=vc.bits, USE_ASM=use_asm, DT=DT, PREC=prec,
        num_warps=num_warps, num_stages=num_stages,
    )
    ksink, vsink = kc.sink.contiguous(), vc.sink.contiguous()
    kres, vres = kc.residual.contiguous(), vc.residual.contiguous()
    exact_kernel[(B * Hkv,)](
        qs, opart, mpart, lpart,
        ksink, vsink, kres, vres, kc.sink_len, kc.q_len, kc.res_len, pos, cos, sin,
        Hkv, Hq, NS1, ksink.shape[2], kres.shape[2],
        G=G, GP=GP, D=D, BE=32, ROPE=rope is not None, DT=DT, PREC=prec, num_warps=4,
    )
    out = torch.empty(B, Hq, D, dtype=torch.float32 if VOUT else q.dtype, device=dev)
    if extra_kv is not None:
        ek, ev = (x.to(dev).contiguous() for x in extra_kv)
    else:
        ek = ev = qs
    mfin = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    lfin = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    reduce_kernel[(B * Hq,)](opart, mpart, lpart, out, mfin, lfin, NS1, qs, ek, ev, Hq, G, D=D,
                             NSP=triton.next_power_of_2(NS1), EXTRA=extra_kv is not None, num_warps=4)
    if not VOUT:
        return out
    vo_split = OUTLIER_SPLIT or pages_per_split
    value_outliers_kernel[(B * Hkv, -(-max_pages // vo_split))](
        out, mfin, lfin, scores, Lmax, vc.pages.pools["scale"], vc.pages.pools["zero"], vc.pages.pools["vref"],
        vtab, vtab.stride(0),
        vout.values, vout.tokens, vout.counts, vout.head_start, vout.block_cap, _zero_level(vc, vlev),
        kc.q_len, Hkv, Hq, vo_split, G=G, GQ=GQ, D=D, T=T, PP=OUTLIER_PAGES, BE=OUTLIER_ENTRIES,
        num_warps=4,
    )
    return out.to(q.dtype)
