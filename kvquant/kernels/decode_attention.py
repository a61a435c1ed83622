"""Decode attention directly over the packed KV format (flash-decoding, split-K over pages): the launch code.

One query token per sequence attends over ``[sinks | quantized pages | residual]`` of a
:class:`~kvquant.quant.store.QuantizedKVCache` pair (keys, values) without writing dequantized K/V anywhere. Three
kernels (bodies in :mod:`kvquant.kernels.jit.decode_attention`): one program per (sequence, KV head, range of pages)
over the quantized pages, one per (sequence, KV head) over the exact sink and residual tokens, and a log-sum-exp
reduction of the splits, which also folds in an optional extra exact token (``extra_kv``: the decode step's own
token).

Requirements: quantized datatype (``fp16`` caches take the torch reference), ``D`` a power of two >= 32, both
caches with the same page size and lengths, outlier entries of a slot sorted by channel and exact per-group counts
``head_counts`` with groups dividing ``D`` (every writer of :mod:`kvquant.sparse.blocked` keeps both).
"""

from __future__ import annotations

import math

import torch

from kvquant.kernels._triton import TRITON_IMPORT_ERROR, tl, triton
from kvquant.kernels.jit import decode_attention as _jit
from kvquant.kernels.reference import Rope, check_decode_inputs
from kvquant.quant.store import QuantizedKVCache

LOG2E = 1.4426950408889634
# Launch defaults of the page kernel (the best of a sweep of warps x tile x programs per SM at 32K context on an
# H100, `kvquant bench kernels --sweep`): 4 warps, 64-token tiles when the page size allows, 16 programs per SM.
NUM_WARPS = 4
BLOCK_T = None
PROGRAMS_PER_SM = 16


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_attention(
    q: torch.Tensor,
    key_cache: QuantizedKVCache,
    value_cache: QuantizedKVCache,
    softmax_scale: float | None = None,
    rope: Rope | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    pages_per_split: int | None = None,
    num_warps: int = NUM_WARPS,
    block_t: int | None = BLOCK_T,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> torch.Tensor:
    """Attention of one query token per sequence over a quantized KV cache, with the Triton kernels.

    :func:`~kvquant.kernels.reference.decode_attention_reference` computes the same in PyTorch; the two are the
    ``decode_attention`` of :class:`~kvquant.kernels.ops.TritonOps` and :class:`~kvquant.kernels.ops.TorchOps`.

    Args:
        q: ``[B, Hq, D]`` queries (already rotated if the model uses RoPE); ``Hq`` a multiple of the caches'
            KV heads (grouped-query attention).
        key_cache, value_cache: :class:`QuantizedKVCache` of kind ``"key"`` and ``"value"`` of the same
            sequences (sinks, quantized tokens and residual of equal lengths).
        softmax_scale: default ``1/sqrt(D)``.
        rope: optional ``(cos, sin, pos_offset [B])`` float32 tables ``[max_pos, D]``, or ``[max_pos, D/2]`` for
            tables whose two halves are equal (Llama's ``cat(freqs, freqs)``: read once per token for half the
            dims); key token ``k`` of sequence ``b`` is rotated to position ``pos_offset[b] + k`` (``rotate_half``).
        extra_kv: optional ``(k [B, Hkv, D], v [B, Hkv, D])``: one more exact token per sequence (already
            rotated), attended after the cached ones: the result is the softmax over ``[cache, extra]``.
        pages_per_split: pages per program of the split-K pass (default: about ``programs_per_sm`` programs
            per multiprocessor).
        num_warps, block_t, programs_per_sm: launch of the page kernel: warps per program, tokens per tile (32 or
            64; ``None``: 64 when it divides the page size, else 32), programs per multiprocessor.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype`` (zeros for a sequence with no token and no extra token).
    """
    check_decode_inputs(q, key_cache, value_cache, extra_kv)
    if triton is None:
        raise RuntimeError(f"decode_attention needs triton ({TRITON_IMPORT_ERROR})")
    B, Hq, D = q.shape
    Hkv = key_cache.num_heads
    if not key_cache.quantized or not value_cache.quantized:
        raise ValueError("the triton path needs quantized caches (datatype fp16: use the torch reference)")
    G = Hq // Hkv
    T = key_cache.config.page_size
    if value_cache.config.page_size != T:
        raise ValueError("key and value caches must have the same page size")
    if D < 32 or D & (D - 1):
        raise ValueError(f"the triton path needs a power-of-two head size >= 32, got {D}")
    dev = q.device
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qs = (q.float() * (scale * LOG2E)).contiguous()
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(key_cache.dtype, tl.float32)
    prec = "ieee" if dot_dtype == tl.float32 else "tf32"
    GP = max(16, triton.next_power_of_2(G))
    BT = block_t or (64 if T % 64 == 0 else 32)
    if T % BT or BT % 32:
        raise ValueError(f"block_t must divide the page size {T} and be a multiple of 32")

    ktab = key_cache.pages.table
    vtab = value_cache.pages.table
    max_pages = ktab.shape[1]
    if pages_per_split is None:
        target = programs_per_sm * _num_sms(dev)
        pages_per_split = max(1, min(max_pages, -(-max_pages * B * Hkv // target)))
        pages_per_split = max(pages_per_split, min(4, max_pages))
    n_splits = max(1, -(-max_pages // pages_per_split))
    NS1 = n_splits + 1
    opart = torch.empty(B, Hq, NS1, D, dtype=torch.float32, device=dev)
    mpart = torch.empty(B, Hq, NS1, dtype=torch.float32, device=dev)
    lpart = torch.empty(B, Hq, NS1, dtype=torch.float32, device=dev)

    half = False
    if rope is not None:
        cos, sin, pos_offset = rope
        if cos.ndim != 2 or sin.shape != cos.shape or cos.shape[-1] not in (D, D // 2):
            raise ValueError(f"rope tables must be [max_pos, {D}] or [max_pos, {D // 2}], got {tuple(cos.shape)}, "
                             f"{tuple(sin.shape)}")
        cos = cos.to(dev, torch.float32).contiguous()
        sin = sin.to(dev, torch.float32).contiguous()
        half = cos.shape[-1] == D // 2
        pos = pos_offset.to(dev, torch.int32).contiguous()
    else:
        cos = sin = torch.zeros(1, device=dev)
        pos = torch.zeros(B, dtype=torch.int32, device=dev)

    kc, vc = key_cache, value_cache
    kout, vout = kc.outliers, vc.outliers
    kp = kc.pages.pools
    vp = vc.pages.pools
    # a head's outlier run in a slot: where it starts and its length, from the per-(slot, group) counts
    for o in (kout, vout):
        if D % o.group_size:
            raise ValueError(f"outlier channel groups ({o.group_size}) must divide the head size {D}")
    kargs = (kout.slot_start, kout.head_counts, kout.indices, kout.values, kout.slot_start.shape[0],
             ktab.stride(0), kout.n_groups, D // kout.group_size)
    vargs = (vout.slot_start, vout.head_counts, vout.indices, vout.values, vout.slot_start.shape[0],
             vtab.stride(0), vout.n_groups, D // vout.group_size)
    _jit._pages_kernel[(B * Hkv, n_splits)](
        qs, opart, mpart, lpart,
        kp["planes"], kc.codebook.levels, kc.channel_scale.contiguous(), kc.channel_zero.contiguous(), ktab,
        *kargs,
        vp["planes"], vc.codebook.levels, vp["scale"], vp["zero"], vtab,
        *vargs,
        kc.q_len, kc.sink_len, pos, cos, sin,
        Hkv, Hq, pages_per_split, NS1,
        G=G, GP=GP, D=D, T=T, BT=BT, KBITS=kc.bits, VBITS=vc.bits,
        KOUT=bool(kc.keep_outliers and kout.nnz_upper > 0), VOUT=bool(vc.keep_outliers and vout.nnz_upper > 0),
        ROPE=rope is not None, HALF=half, DOT_DTYPE=dot_dtype, PREC=prec,
        KNGP=triton.next_power_of_2(kout.n_groups), VNGP=triton.next_power_of_2(vout.n_groups),
        num_warps=num_warps, num_stages=2,
    )
    ksink, vsink = kc.sink.contiguous(), vc.sink.contiguous()
    kres, vres = kc.residual.contiguous(), vc.residual.contiguous()
    _jit._exact_kernel[(B * Hkv,)](
        qs, opart, mpart, lpart,
        ksink, vsink, kres, vres, kc.sink_len, kc.q_len, kc.res_len, pos, cos, sin,
        Hkv, Hq, NS1, ksink.shape[2], kres.shape[2],
        G=G, GP=GP, D=D, BE=32, ROPE=rope is not None, HALF=half, DOT_DTYPE=dot_dtype, PREC=prec,
        num_warps=4,
    )
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    if extra_kv is not None:
        ek, ev = (x.to(dev).contiguous() for x in extra_kv)
    else:
        ek = ev = qs
    _jit._reduce_kernel[(B * Hq,)](opart, mpart, lpart, out, NS1, qs, ek, ev, Hq, G, D=D,
                              NSP=triton.next_power_of_2(NS1), EXTRA=extra_kv is not None, num_warps=4)
    return out
