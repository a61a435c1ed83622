"""Decode attention directly over the packed KV format (flash-decoding, split-K over pages).

One query token per sequence attends over ``[sinks | quantized pages | residual]`` of a
:class:`~kvquant.quant.store.QuantizedKVCache` pair (keys, values) without writing dequantized K/V anywhere:

* kernel 1 (``_pages_kernel``), grid ``(B * Hkv, n_splits)``: one program per (sequence, KV head, range of
  pages) serves all ``G = Hq / Hkv`` query heads of that KV head, so the packed KV is read once. Per page
  (``T`` tokens, in sub-tiles of ``BT``) it unpacks the bit-planes in registers, looks the levels up,
  applies the per-channel (keys) / per-token (values) affine map, replaces the outlier positions by their
  exact sparse values (the head's entries of a slot are a contiguous run; versions 3/3b read where it starts
  and its length from the per-(slot, channel group) counts ``head_counts`` of the outlier storage, version 2
  finds it by binary search on the sorted channel indices), optionally rotates the keys (RoPE, ``rotate_half``
  convention, positions from ``pos_offset``), and updates an online softmax;
* kernel 2 (``_exact_kernel``), grid ``(B * Hkv,)``: the exact sink and residual tokens, as one more split;
* kernel 3 (``_reduce_kernel``), grid ``(B * Hq,)``: log-sum-exp combination of the splits.

The head dimension is handled as two halves ``[0, D/2)`` and ``[D/2, D)`` so that RoPE needs no register
permutation. Dots run in the cache dtype (fp16/bf16; tensor cores) with float32 accumulation, or in
IEEE float32 for float32 caches.

Requirements of the Triton path: quantized datatype (``fp16`` caches fall back to the torch reference),
``D`` a power of two >= 32, both caches with the same page size and lengths, outlier entries of a slot
sorted by channel (what :meth:`~kvquant.sparse.blocked._BlockedSlotMatrix.append_dense` writes), and for
versions 3/3b exact per-group counts ``head_counts`` with groups dividing ``D`` (every writer keeps them).
"""

from __future__ import annotations

import math

import torch

from kvquant.kernels._triton import (  # noqa: F401
    TRITON_IMPORT_ERROR,
    resolve_backend,
    tl,
    triton,
    triton_available,
)
from kvquant.kernels.reference import Rope, decode_attention_reference
from kvquant.quant.store import QuantizedKVCache

LOG2E = 1.4426950408889634
TUNING = {"num_warps": 4, "block_t": None, "programs_per_sm": 16, "version": "3b"}  # page kernel launch defaults



if triton is not None:

    @triton.jit
    def _unpack_levels(PL, LEV, base, d0, W: tl.constexpr, w0, BITS: tl.constexpr, BT: tl.constexpr,
                       DH: tl.constexpr):
        """Levels ``[BT, DH]`` float32 of tokens ``32*w0 .. 32*w0+BT`` and dims ``d0 .. d0+DH`` of one page/head.

        ``PL + base`` points at ``planes[page, head]`` (``[D, BITS, W]`` int32).
        """
        dims = d0 + tl.arange(0, DH)
        wl = tl.arange(0, BT // 32)
        lanes = tl.arange(0, 32)
        code = tl.zeros([BT // 32, 32, DH], dtype=tl.int32)
        for j in tl.static_range(BITS):
            words = tl.load(PL + base + dims[None, :] * (BITS * W) + j * W + w0 + wl[:, None])  # [BT/32, DH]
            code |= ((words[:, None, :] >> lanes[None, :, None]) & 1) << j
        code = tl.reshape(code, [BT, DH])
        return tl.load(LEV + code)

    @triton.jit
    def _lower_bound_step(OI, lo, hi, key):
        on = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(OI + mid, mask=on, other=0).to(tl.int32)
        right = on & (v < key)
        return tl.where(right, mid + 1, lo), tl.where(on & (v >= key), mid, hi)

    @triton.jit
    def _head_entries_kv(KSS, KSC, KOI, kslot, kok, VSS, VSC, VOI, vslot, vok, lo_ch, hi_ch,
                         KOUT: tl.constexpr, VOUT: tl.constexpr):
        """For keys and values: first entry and number of entries with channel in ``[lo_ch, hi_ch)`` of each
        slot (channels sorted within a slot), by four interleaved binary searches of ``ceil(log2(count+1))``
        steps (the tile's largest count)."""
        ks = tl.load(KSS + kslot, mask=kok & KOUT, other=0)
        kc = tl.load(KSC + kslot, mask=kok & KOUT, other=0).to(tl.int32)
        vs = tl.load(VSS + vslot, mask=vok & VOUT, other=0)
        vc = tl.load(VSC + vslot, mask=vok & VOUT, other=0).to(tl.int32)
        n = tl.maximum(tl.max(kc, axis=0), tl.max(vc, axis=0))
        steps = tl.log2(n.to(tl.float32) + 1.0).to(tl.int32) + 1
        ka_lo, ka_hi, kb_lo, kb_hi = ks, ks + kc, ks, ks + kc
        va_lo, va_hi, vb_lo, vb_hi = vs, vs + vc, vs, vs + vc
        for _ in range(0, steps):
            if KOUT:
                ka_lo, ka_hi = _lower_bound_step(KOI, ka_lo, ka_hi, lo_ch)
                kb_lo, kb_hi = _lower_bound_step(KOI, kb_lo, kb_hi, hi_ch)
            if VOUT:
                va_lo, va_hi = _lower_bound_step(VOI, va_lo, va_hi, lo_ch)
                vb_lo, vb_hi = _lower_bound_step(VOI, vb_lo, vb_hi, hi_ch)
        return ka_lo, kb_lo - ka_lo, va_lo, vb_lo - va_lo

    @triton.jit
    def _head_run(SS, HC, slot, ok, hk, n_groups, gph, NGP: tl.constexpr, BT: tl.constexpr):
        """First entry and number of entries of head ``hk`` in each slot ``[BT]``, from the per-group counts
        ``HC [slots, n_groups]`` (uint8; head ``hk`` = groups ``hk*gph .. hk*gph+gph-1``, ``NGP`` >= n_groups a
        power of two): ``slot_start + sum(counts[:hk*gph])`` and ``sum(counts[hk*gph : (hk+1)*gph])``. One row
        load per slot, no search."""
        gg = tl.arange(0, NGP)
        row = tl.load(HC + slot.to(tl.int64)[:, None] * n_groups + gg[None, :],
                      mask=ok[:, None] & (gg < n_groups)[None, :], other=0).to(tl.int32)  # [BT, NGP]
        g0 = hk * gph
        before = tl.sum(tl.where(gg[None, :] < g0, row, 0), axis=1)
        mine = tl.sum(tl.where((gg[None, :] >= g0) & (gg[None, :] < g0 + gph), row, 0), axis=1)
        start = tl.load(SS + slot, mask=ok, other=0)
        return start + before, mine

    @triton.jit
    def _replace_outliers(xa, xb, OI, OV, first, n, ch0, DH: tl.constexpr):
        """Put the exact sparse values (channel ``ch0 + d``) into the two halves ``[BT, DH]``."""
        dims = tl.arange(0, DH)
        n_max = tl.max(n, axis=0)
        for e in range(0, n_max):
            has = e < n
            d = tl.load(OI + first + e, mask=has, other=0).to(tl.int32) - ch0
            val = tl.load(OV + first + e, mask=has, other=0.0).to(tl.float32)
            xa = tl.where(has[:, None] & (d[:, None] == dims[None, :]), val[:, None], xa)
            xb = tl.where(has[:, None] & (d[:, None] == dims[None, :] + DH), val[:, None], xb)
        return xa, xb

    @triton.jit
    def _rope(xa, xb, COS, SIN, pos, ok, TD: tl.constexpr, HALF: tl.constexpr, DH: tl.constexpr):
        """``x * cos + rotate_half(x) * sin`` at positions ``pos [BT]`` on halves ``[BT, DH]``.

        Tables have rows of ``TD`` floats: the full ``D`` (``HALF`` False) or only the first half (``HALF``:
        Llama-style tables whose two halves are equal, read once per token for half the dims)."""
        dims = tl.arange(0, DH)
        off = pos.to(tl.int64)[:, None] * TD + dims[None, :]
        m = ok[:, None]
        ca = tl.load(COS + off, mask=m, other=1.0)
        sa = tl.load(SIN + off, mask=m, other=0.0)
        if HALF:
            return xa * ca - xb * sa, xb * ca + xa * sa
        cb = tl.load(COS + off + DH, mask=m, other=1.0)
        sb = tl.load(SIN + off + DH, mask=m, other=0.0)
        return xa * ca - xb * sa, xb * cb + xa * sb

    @triton.jit
    def _attend(qa, qb, ka, kb, va, vb, ok, m, lsum, acc_a, acc_b, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """Online-softmax update (log2 domain; ``q`` pre-scaled by ``scale * log2(e)``)."""
        s = tl.dot(qa, tl.trans(ka.to(DOT_DTYPE)), input_precision=PREC)
        s += tl.dot(qb, tl.trans(kb.to(DOT_DTYPE)), input_precision=PREC)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        pd = p.to(DOT_DTYPE)
        acc_a = acc_a * alpha[:, None] + tl.dot(pd, va.to(DOT_DTYPE), input_precision=PREC)
        acc_b = acc_b * alpha[:, None] + tl.dot(pd, vb.to(DOT_DTYPE), input_precision=PREC)
        return m_new, lsum, acc_a, acc_b

    @triton.jit
    def _load_q(Q, b, hk, Hq, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DH: tl.constexpr,
                DOT_DTYPE: tl.constexpr):
        g = tl.arange(0, GP)
        dims = tl.arange(0, DH)
        row = (b * Hq + hk * G + g).to(tl.int64) * D
        gm = (g < G)[:, None]
        qa = tl.load(Q + row[:, None] + dims[None, :], mask=gm, other=0.0).to(DOT_DTYPE)
        qb = tl.load(Q + row[:, None] + DH + dims[None, :], mask=gm, other=0.0).to(DOT_DTYPE)
        return qa, qb

    @triton.jit
    def _store_partial(OP, MP, LP, b, hk, split, NS1, Hq, m, lsum, acc_a, acc_b, G: tl.constexpr,
                       GP: tl.constexpr, D: tl.constexpr, DH: tl.constexpr):
        g = tl.arange(0, GP)
        dims = tl.arange(0, DH)
        row = (b * Hq + hk * G + g).to(tl.int64) * NS1 + split
        gm = g < G
        tl.store(MP + row, m, mask=gm)
        tl.store(LP + row, lsum, mask=gm)
        tl.store(OP + row[:, None] * D + dims[None, :], acc_a, mask=gm[:, None])
        tl.store(OP + row[:, None] * D + DH + dims[None, :], acc_b, mask=gm[:, None])

    @triton.jit
    def _pages_kernel_v2(
        Q, OP, MP, LP,
        KPL, KLEV, KCS, KCZ, KTAB, KSS, KSC, KOI, KOV, k_nslots, k_tab_stride,
        VPL, VLEV, VSC, VZR, VTAB, VSS, VSCNT, VOI, VOV, v_nslots, v_tab_stride,
        QLEN, SLEN, POS, COS, SIN,
        Hkv, Hq, pages_per_split, NS1,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BT: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, KOUT: tl.constexpr, VOUT: tl.constexpr, ROPE: tl.constexpr,
        HALF: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    ):
        """v2 page kernel: gathered level lookup, outliers replaced in the K and V tiles."""
        DH: tl.constexpr = D // 2
        TD: tl.constexpr = DH if HALF else D
        W: tl.constexpr = T // 32
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // Hkv
        hk = pid % Hkv
        qlen = tl.load(QLEN + b).to(tl.int32)
        n_pages = (qlen + T - 1) // T
        p0 = split * pages_per_split
        p1 = tl.minimum(p0 + pages_per_split, n_pages)
        qa, qb = _load_q(Q, b, hk, Hq, G, GP, D, DH, DOT_DTYPE)
        dims = tl.arange(0, DH)
        # per-channel key map of this (sequence, head), float32 [DH] per half
        cbase = (b * Hkv + hk) * D
        csa = tl.load(KCS + cbase + dims)
        csb = tl.load(KCS + cbase + DH + dims)
        cza = tl.load(KCZ + cbase + dims)
        czb = tl.load(KCZ + cbase + DH + dims)
        pos0 = tl.load(POS + b).to(tl.int32) + tl.load(SLEN + b).to(tl.int32)
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc_a = tl.zeros([GP, DH], tl.float32)
        acc_b = tl.zeros([GP, DH], tl.float32)
        tt = tl.arange(0, BT)
        kpage_sz = Hkv * D * KBITS * W
        vpage_sz = Hkv * D * VBITS * W
        for pi in range(p0, p1):
            kpage = tl.load(KTAB + b * k_tab_stride + pi).to(tl.int64)
            vpage = tl.load(VTAB + b * v_tab_stride + pi).to(tl.int64)
            kbase = kpage * kpage_sz + hk * (D * KBITS * W)
            vbase = vpage * vpage_sz + hk * (D * VBITS * W)
            for sub in tl.static_range(T // BT):
                t = sub * BT + tt  # offset in page
                i = pi * T + t  # quantized token index
                ok = i < qlen
                if KOUT or VOUT:  # issue the outlier searches first: their loads overlap the unpacking
                    kslot = kpage * T + t
                    vslot = vpage * T + t
                    kfirst, kn, vfirst, vn = _head_entries_kv(KSS, KSC, KOI, kslot, ok & (kslot < k_nslots),
                                                              VSS, VSCNT, VOI, vslot, ok & (vslot < v_nslots),
                                                              hk * D, hk * D + D, KOUT, VOUT)
                # keys
                ka = _unpack_levels(KPL, KLEV, kbase, 0, W, sub * (BT // 32), KBITS, BT, DH)
                kb = _unpack_levels(KPL, KLEV, kbase, DH, W, sub * (BT // 32), KBITS, BT, DH)
                ka = ka * csa[None, :] + cza[None, :]
                kb = kb * csb[None, :] + czb[None, :]
                if KOUT:
                    ka, kb = _replace_outliers(ka, kb, KOI, KOV, kfirst, kn, hk * D, DH)
                if ROPE:
                    ka, kb = _rope(ka, kb, COS, SIN, pos0 + i, ok, TD, HALF, DH)
                # values
                va = _unpack_levels(VPL, VLEV, vbase, 0, W, sub * (BT // 32), VBITS, BT, DH)
                vb = _unpack_levels(VPL, VLEV, vbase, DH, W, sub * (BT // 32), VBITS, BT, DH)
                soff = (vpage * Hkv + hk) * T + t
                vs = tl.load(VSC + soff).to(tl.float32)
                vz = tl.load(VZR + soff).to(tl.float32)
                va = va * vs[:, None] + vz[:, None]
                vb = vb * vs[:, None] + vz[:, None]
                if VOUT:
                    va, vb = _replace_outliers(va, vb, VOI, VOV, vfirst, vn, hk * D, DH)
                m, lsum, acc_a, acc_b = _attend(qa, qb, ka, kb, va, vb, ok, m, lsum, acc_a, acc_b, DOT_DTYPE, PREC)
        _store_partial(OP, MP, LP, b, hk, split, NS1, Hq, m, lsum, acc_a, acc_b, G, GP, D, DH)

    @triton.jit
    def _select_levels(PL, LEV, base, d0, W: tl.constexpr, w0, BITS: tl.constexpr, BT: tl.constexpr,
                       DH: tl.constexpr):
        """Levels ``[BT, DH]`` float32 of tokens ``32*w0 .. 32*w0+BT`` and dims ``d0 .. d0+DH`` of one page/head,
        picked by a select tree over the code bits (levels are kernel scalars: no gathered lookup).

        ``PL + base`` points at ``planes[page, head]`` (``[D, BITS, W]`` int32).
        """
        dims = d0 + tl.arange(0, DH)
        wl = tl.arange(0, BT // 32)
        bit = (1 << tl.arange(0, 32))[None, :, None]
        ptr = PL + base + dims[None, :] * (BITS * W) + w0 + wl[:, None]
        b0 = (tl.load(ptr)[:, None, :] & bit) != 0
        b1 = (tl.load(ptr + W)[:, None, :] & bit) != 0
        x = tl.where(b1, tl.where(b0, tl.load(LEV + 3), tl.load(LEV + 2)),
                     tl.where(b0, tl.load(LEV + 1), tl.load(LEV)))
        if BITS >= 3:
            b2 = (tl.load(ptr + 2 * W)[:, None, :] & bit) != 0
            hi = tl.where(b1, tl.where(b0, tl.load(LEV + 7), tl.load(LEV + 6)),
                          tl.where(b0, tl.load(LEV + 5), tl.load(LEV + 4)))
            if BITS == 4:
                b3 = (tl.load(ptr + 3 * W)[:, None, :] & bit) != 0
                lo2 = tl.where(b1, tl.where(b0, tl.load(LEV + 11), tl.load(LEV + 10)),
                               tl.where(b0, tl.load(LEV + 9), tl.load(LEV + 8)))
                hi2 = tl.where(b1, tl.where(b0, tl.load(LEV + 15), tl.load(LEV + 14)),
                               tl.where(b0, tl.load(LEV + 13), tl.load(LEV + 12)))
                x = tl.where(b3, tl.where(b2, hi2, lo2), tl.where(b2, hi, x))
            else:
                x = tl.where(b2, hi, x)
        return tl.reshape(x, [BT, DH])

    @triton.jit
    def _key_outlier_scores(KPL, kbase, KLEV, KCS, KCZ, cbase, KOI, KOV, first, n, ch0, t_pg, QS, qrow, gm,
                            COS, SIN, pos, ok, D: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr,
                            ROPE: tl.constexpr, HALF: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr):
        """Score correction ``[GP, BT]`` of the key outliers: ``q . (k_exact - k_dense)``, rotated if ``ROPE``.

        Per entry (token ``t``, channel ``c``, exact value ``x``) the dense value ``cs[c] * level + cz[c]`` is
        rebuilt from the planes (``[BT]`` gathers, cached lines) and ``delta = x - dense`` is applied to the
        score through the rotation: ``q[c] * cos[t, c] +- q[c'] * sin[t, c']`` with ``c'`` the partner channel.
        Work is per entry (``[GP, BT]`` vectors), not per tile element.
        """
        DH: tl.constexpr = D // 2
        TD: tl.constexpr = DH if HALF else D
        n_max = tl.max(n, axis=0)
        corr = tl.zeros([GP, BT], tl.float32)
        sh = t_pg % 32
        wofs = kbase + t_pg // 32
        for e in range(0, n_max):
            has = e < n
            ch = tl.load(KOI + first + e, mask=has, other=0).to(tl.int32) - ch0
            ch = tl.where(has, ch, 0)
            val = tl.load(KOV + first + e, mask=has, other=0.0).to(tl.float32)
            code = tl.zeros_like(ch)
            for j in tl.static_range(BITS):
                wj = tl.load(KPL + wofs + ch * (BITS * W) + j * W, mask=has, other=0)
                code |= ((wj >> sh) & 1) << j
            dense = tl.load(KLEV + code) * tl.load(KCS + cbase + ch) + tl.load(KCZ + cbase + ch)
            delta = tl.where(has, val - dense, 0.0)
            qe = tl.load(QS + qrow[:, None] + ch[None, :], mask=gm[:, None], other=0.0)
            if ROPE:
                low = ch < DH
                partner = tl.where(low, ch + DH, ch - DH)
                m2 = has & ok
                prow = pos.to(tl.int64) * TD
                if HALF:
                    fi = tl.where(low, ch, partner)
                    c = tl.load(COS + prow + fi, mask=m2, other=1.0)
                    sn = tl.load(SIN + prow + fi, mask=m2, other=0.0)
                else:
                    c = tl.load(COS + prow + ch, mask=m2, other=1.0)
                    sn = tl.load(SIN + prow + partner, mask=m2, other=0.0)
                sn = tl.where(low, sn, -sn)
                q2 = tl.load(QS + qrow[:, None] + partner[None, :], mask=gm[:, None], other=0.0)
                qe = qe * c[None, :] + q2 * sn[None, :]
            corr += qe * delta[None, :]
        return corr

    @triton.jit
    def _replace_outliers_v3(xa, xb, OI, OV, first, n, ch0, DH: tl.constexpr):
        """Put the exact sparse values into the halves ``[BT, DH]``: one compare and one select per element
        and entry (a missing entry gets channel -1)."""
        dims = tl.arange(0, DH)
        n_max = tl.max(n, axis=0)
        for e in range(0, n_max):
            has = e < n
            d = tl.load(OI + first + e, mask=has, other=0).to(tl.int32) - ch0
            d = tl.where(has, d, -1)
            val = tl.load(OV + first + e, mask=has, other=0.0).to(tl.float32)
            xa = tl.where(d[:, None] == dims[None, :], val[:, None], xa)
            xb = tl.where(d[:, None] == dims[None, :] + DH, val[:, None], xb)
        return xa, xb

    @triton.jit
    def _attend_scores(s, va, vb, ok, m, lsum, acc_a, acc_b, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """Online-softmax update from scores ``s [GP, BT]`` (log2 domain)."""
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        pd = p.to(DOT_DTYPE)
        acc_a = acc_a * alpha[:, None] + tl.dot(pd, va.to(DOT_DTYPE), input_precision=PREC)
        acc_b = acc_b * alpha[:, None] + tl.dot(pd, vb.to(DOT_DTYPE), input_precision=PREC)
        return m_new, lsum, acc_a, acc_b

    @triton.jit
    def _pages_kernel_v3(
        Q, OP, MP, LP,
        KPL, KLEV, KCS, KCZ, KTAB, KSS, KHC, KOI, KOV, k_nslots, k_tab_stride, k_ngroups, k_gph,
        VPL, VLEV, VSC, VZR, VTAB, VSS, VHC, VOI, VOV, v_nslots, v_tab_stride, v_ngroups, v_gph,
        QLEN, SLEN, POS, COS, SIN,
        Hkv, Hq, pages_per_split, NS1,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BT: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, KOUT: tl.constexpr, VOUT: tl.constexpr, ROPE: tl.constexpr,
        HALF: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, KCORR: tl.constexpr,
        KNGP: tl.constexpr, VNGP: tl.constexpr,
    ):
        """v3 page kernel: select-tree levels, keys' affine map folded into the query when there is no RoPE
        (``s = (q*cs) . level + q . cz``), key outliers as sparse score corrections, value outliers replaced in
        the tile with one compare per element and entry, half RoPE tables.

        ``KCORR`` False (v3b): key outliers replaced in the key tile like the values' (keys then stay in key space:
        the affine map is applied per element, not folded into the query), no per-entry gathers."""
        DH: tl.constexpr = D // 2
        FOLD: tl.constexpr = not ROPE and (KCORR or not KOUT)
        TD: tl.constexpr = DH if HALF else D
        W: tl.constexpr = T // 32
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // Hkv
        hk = pid % Hkv
        qlen = tl.load(QLEN + b).to(tl.int32)
        n_pages = (qlen + T - 1) // T
        p0 = split * pages_per_split
        p1 = tl.minimum(p0 + pages_per_split, n_pages)
        g = tl.arange(0, GP)
        gm = g < G
        qrow = (b * Hq + hk * G + g).to(tl.int64) * D
        dims = tl.arange(0, DH)
        cbase = (b * Hkv + hk) * D
        csa = tl.load(KCS + cbase + dims)
        csb = tl.load(KCS + cbase + DH + dims)
        cza = tl.load(KCZ + cbase + dims)
        czb = tl.load(KCZ + cbase + DH + dims)
        qfa = tl.load(Q + qrow[:, None] + dims[None, :], mask=gm[:, None], other=0.0)
        qfb = tl.load(Q + qrow[:, None] + DH + dims[None, :], mask=gm[:, None], other=0.0)
        if not FOLD:
            qa = qfa.to(DOT_DTYPE)
            qb = qfb.to(DOT_DTYPE)
            qcz = tl.zeros([GP], tl.float32)
        else:  # keys' per-channel affine map folded into the query
            qa = (qfa * csa[None, :]).to(DOT_DTYPE)
            qb = (qfb * csb[None, :]).to(DOT_DTYPE)
            qcz = tl.sum(qfa * cza[None, :], axis=1) + tl.sum(qfb * czb[None, :], axis=1)
        pos0 = tl.load(POS + b).to(tl.int32) + tl.load(SLEN + b).to(tl.int32)
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc_a = tl.zeros([GP, DH], tl.float32)
        acc_b = tl.zeros([GP, DH], tl.float32)
        tt = tl.arange(0, BT)
        kpage_sz = Hkv * D * KBITS * W
        vpage_sz = Hkv * D * VBITS * W
        for pi in range(p0, p1):
            kpage = tl.load(KTAB + b * k_tab_stride + pi).to(tl.int64)
            vpage = tl.load(VTAB + b * v_tab_stride + pi).to(tl.int64)
            kbase = kpage * kpage_sz + hk * (D * KBITS * W)
            vbase = vpage * vpage_sz + hk * (D * VBITS * W)
            for sub in tl.static_range(T // BT):
                t = sub * BT + tt  # offset in page
                i = pi * T + t  # quantized token index
                ok = i < qlen
                # the head's outlier runs (per-group counts: no search); loads issued before the unpacking
                if KOUT:
                    kslot = kpage * T + t
                    kfirst, kn = _head_run(KSS, KHC, kslot, ok & (kslot < k_nslots), hk, k_ngroups, k_gph, KNGP, BT)
                if VOUT:
                    vslot = vpage * T + t
                    vfirst, vn = _head_run(VSS, VHC, vslot, ok & (vslot < v_nslots), hk, v_ngroups, v_gph, VNGP, BT)
                # keys -> scores
                la = _select_levels(KPL, KLEV, kbase, 0, W, sub * (BT // 32), KBITS, BT, DH)
                lb = _select_levels(KPL, KLEV, kbase, DH, W, sub * (BT // 32), KBITS, BT, DH)
                if not FOLD:
                    ka = la * csa[None, :] + cza[None, :]
                    kb = lb * csb[None, :] + czb[None, :]
                    if KOUT and not KCORR:
                        ka, kb = _replace_outliers_v3(ka, kb, KOI, KOV, kfirst, kn, hk * D, DH)
                    if ROPE:
                        ka, kb = _rope(ka, kb, COS, SIN, pos0 + i, ok, TD, HALF, DH)
                    s = tl.dot(qa, tl.trans(ka.to(DOT_DTYPE)), input_precision=PREC)
                    s += tl.dot(qb, tl.trans(kb.to(DOT_DTYPE)), input_precision=PREC)
                else:
                    s = tl.dot(qa, tl.trans(la.to(DOT_DTYPE)), input_precision=PREC)
                    s += tl.dot(qb, tl.trans(lb.to(DOT_DTYPE)), input_precision=PREC)
                    s += qcz[:, None]
                if KOUT and KCORR:
                    s += _key_outlier_scores(KPL, kbase, KLEV, KCS, KCZ, cbase, KOI, KOV, kfirst, kn, hk * D, t,
                                             Q, qrow, gm, COS, SIN, pos0 + i, ok, D, W, KBITS, ROPE, HALF, GP, BT)
                # values
                va = _select_levels(VPL, VLEV, vbase, 0, W, sub * (BT // 32), VBITS, BT, DH)
                vb = _select_levels(VPL, VLEV, vbase, DH, W, sub * (BT // 32), VBITS, BT, DH)
                soff = (vpage * Hkv + hk) * T + t
                vs = tl.load(VSC + soff).to(tl.float32)
                vz = tl.load(VZR + soff).to(tl.float32)
                va = va * vs[:, None] + vz[:, None]
                vb = vb * vs[:, None] + vz[:, None]
                if VOUT:
                    va, vb = _replace_outliers_v3(va, vb, VOI, VOV, vfirst, vn, hk * D, DH)
                m, lsum, acc_a, acc_b = _attend_scores(s, va, vb, ok, m, lsum, acc_a, acc_b, DOT_DTYPE, PREC)
        _store_partial(OP, MP, LP, b, hk, split, NS1, Hq, m, lsum, acc_a, acc_b, G, GP, D, DH)

    @triton.jit
    def _exact_kernel(
        Q, OP, MP, LP,
        KSINK, VSINK, KRES, VRES, SLEN, QLEN, RLEN, POS, COS, SIN,
        Hkv, Hq, NS1, n_sink, n_res,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BE: tl.constexpr, ROPE: tl.constexpr,
        HALF: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    ):
        DH: tl.constexpr = D // 2
        TD: tl.constexpr = DH if HALF else D
        pid = tl.program_id(0)
        b = pid // Hkv
        hk = pid % Hkv
        qa, qb = _load_q(Q, b, hk, Hq, G, GP, D, DH, DOT_DTYPE)
        dims = tl.arange(0, DH)
        tt = tl.arange(0, BE)
        slen = tl.load(SLEN + b).to(tl.int32)
        qlen = tl.load(QLEN + b).to(tl.int32)
        rlen = tl.load(RLEN + b).to(tl.int32)
        pos0 = tl.load(POS + b).to(tl.int32)
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc_a = tl.zeros([GP, DH], tl.float32)
        acc_b = tl.zeros([GP, DH], tl.float32)
        # sinks: token j at position pos0 + j
        sbase = (b * Hkv + hk).to(tl.int64) * n_sink * D
        for j0 in range(0, slen, BE):
            j = j0 + tt
            ok = j < slen
            off = sbase + j[:, None] * D + dims[None, :]
            ka = tl.load(KSINK + off, mask=ok[:, None], other=0.0).to(tl.float32)
            kb = tl.load(KSINK + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            va = tl.load(VSINK + off, mask=ok[:, None], other=0.0).to(tl.float32)
            vb = tl.load(VSINK + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            if ROPE:
                ka, kb = _rope(ka, kb, COS, SIN, pos0 + j, ok, TD, HALF, DH)
            m, lsum, acc_a, acc_b = _attend(qa, qb, ka, kb, va, vb, ok, m, lsum, acc_a, acc_b, DOT_DTYPE, PREC)
        # residual: token r at position pos0 + slen + qlen + r
        rbase = (b * Hkv + hk).to(tl.int64) * n_res * D
        for r0 in range(0, rlen, BE):
            r = r0 + tt
            ok = r < rlen
            off = rbase + r[:, None] * D + dims[None, :]
            ka = tl.load(KRES + off, mask=ok[:, None], other=0.0).to(tl.float32)
            kb = tl.load(KRES + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            va = tl.load(VRES + off, mask=ok[:, None], other=0.0).to(tl.float32)
            vb = tl.load(VRES + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            if ROPE:
                ka, kb = _rope(ka, kb, COS, SIN, pos0 + slen + qlen + r, ok, TD, HALF, DH)
            m, lsum, acc_a, acc_b = _attend(qa, qb, ka, kb, va, vb, ok, m, lsum, acc_a, acc_b, DOT_DTYPE, PREC)
        _store_partial(OP, MP, LP, b, hk, NS1 - 1, NS1, Hq, m, lsum, acc_a, acc_b, G, GP, D, DH)

    @triton.jit
    def _reduce_kernel(OP, MP, LP, OUT, NS1, QS, KN, VN, Hq, G, D: tl.constexpr, NSP: tl.constexpr,
                       EXTRA: tl.constexpr):
        """Log-sum-exp combination of the splits (and of the extra exact token ``KN/VN [B, Hkv, D]``)."""
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, NSP)
        dims = tl.arange(0, D)
        sm = s < NS1
        m = tl.load(MP + row * NS1 + s, mask=sm, other=float("-inf"))
        lsum = tl.load(LP + row * NS1 + s, mask=sm, other=0.0)
        o = tl.load(OP + (row * NS1 + s)[:, None] * D + dims[None, :], mask=sm[:, None], other=0.0)
        mx = tl.max(m, axis=0)
        if EXTRA:  # the new token (exact, already rotated): one more split with m = its score, lsum = 1
            b = row // Hq
            hk = (row % Hq) // G
            kvrow = (b * (Hq // G) + hk) * D
            s_new = tl.sum(tl.load(QS + row * D + dims) * tl.load(KN + kvrow + dims).to(tl.float32), axis=0)
            mx = tl.maximum(mx, s_new)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(m - mx)
        den = tl.sum(w * lsum, axis=0)
        num = tl.sum(w[:, None] * o, axis=0)
        if EXTRA:
            w_new = tl.exp2(s_new - mx)
            den += w_new
            num += w_new * tl.load(VN + kvrow + dims).to(tl.float32)
        den = tl.where(den == 0.0, 1.0, den)
        tl.store(OUT + row * D + dims, (num / den).to(OUT.dtype.element_ty))


def _pick_backend(backend: str, q: torch.Tensor, key_cache: QuantizedKVCache) -> str:
    problems = [] if key_cache.quantized else [f"datatype {key_cache.config.datatype} is not quantized"]
    return resolve_backend(backend, problems, q.is_cuda)


def _check_pair(q: torch.Tensor, key_cache: QuantizedKVCache, value_cache: QuantizedKVCache) -> None:
    if key_cache.kind != "key" or value_cache.kind != "value":
        raise ValueError("pass the key cache then the value cache")
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    B, Hq, D = q.shape
    H = key_cache.num_heads
    if (key_cache.batch, key_cache.head_dim) != (B, D) or (value_cache.batch, value_cache.head_dim) != (B, D):
        raise ValueError(f"q {tuple(q.shape)} does not match the caches (B={key_cache.batch}, "
                         f"D={key_cache.head_dim})")
    if value_cache.num_heads != H or Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({H}, values {value_cache.num_heads})")


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_attention(
    q: torch.Tensor,
    key_cache: QuantizedKVCache,
    value_cache: QuantizedKVCache,
    softmax_scale: float | None = None,
    rope: Rope | None = None,
    backend: str = "auto",
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    pages_per_split: int | None = None,
    num_warps: int | None = None,
    block_t: int | None = None,
    programs_per_sm: int | None = None,
    version: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over a quantized KV cache.

    Args:
        q: ``[B, Hq, D]`` queries (already rotated if the model uses RoPE); ``Hq`` a multiple of the caches'
            KV heads (grouped-query attention).
        key_cache, value_cache: :class:`QuantizedKVCache` of kind ``"key"`` and ``"value"`` of the same
            sequences (sinks, quantized tokens and residual of equal lengths).
        softmax_scale: default ``1/sqrt(D)``.
        rope: optional ``(cos, sin, pos_offset [B])`` float32 tables ``[max_pos, D]``, or ``[max_pos, D/2]`` for
            tables whose two halves are equal (Llama's ``cat(freqs, freqs)``: read once per token for half the
            dims); key token ``k`` of sequence ``b`` is rotated to position ``pos_offset[b] + k`` (``rotate_half``).
        backend: ``"triton"``, ``"torch"`` (:func:`decode_attention_reference`) or ``"auto"`` (triton on CUDA
            when it imports and the cache is quantized).
        extra_kv: optional ``(k [B, Hkv, D], v [B, Hkv, D])``: one more exact token per sequence (already
            rotated), attended after the cached ones: the result is the softmax over ``[cache, extra]``.
        pages_per_split: pages per program of the split-K pass (default: about ``programs_per_sm`` programs
            per multiprocessor).
        num_warps, block_t, programs_per_sm, version: launch tuning of the page kernel (warps per program;
            tokens per tile, 32 or 64; page-kernel version 2, 3 or ``"3b"``); ``None`` takes :data:`TUNING`.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype`` (zeros for a sequence with no token and no extra token on the triton path).
    """
    _check_pair(q, key_cache, value_cache)
    B, Hq, D = q.shape
    Hkv = key_cache.num_heads
    if extra_kv is not None:
        ek, ev = extra_kv
        if ek.shape != (B, Hkv, D) or ev.shape != (B, Hkv, D):
            raise ValueError(f"extra_kv must be two [B, Hkv, D] = {(B, Hkv, D)} tensors, got "
                             f"{tuple(ek.shape)}, {tuple(ev.shape)}")
    if _pick_backend(backend, q, key_cache) == "torch":
        return decode_attention_reference(q, key_cache, value_cache, softmax_scale, rope, extra_kv=extra_kv)
    if not key_cache.quantized or not value_cache.quantized:
        raise ValueError("the triton path needs quantized caches (datatype fp16: use backend='torch')")
    num_warps = num_warps or TUNING["num_warps"]
    block_t = block_t or TUNING["block_t"]
    programs_per_sm = programs_per_sm or TUNING["programs_per_sm"]
    version = version or TUNING["version"]
    if version not in (2, 3, "3b"):
        raise ValueError(f"version must be 2, 3 or '3b', got {version!r}")
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
    if version == 2:  # baseline: head runs found by binary search over the sorted channels
        pages_kernel, extra_const = _pages_kernel_v2, {}
        kargs = (kout.slot_start, kout.slot_count, kout.indices, kout.values, kout.slot_start.shape[0], ktab.stride(0))
        vargs = (vout.slot_start, vout.slot_count, vout.indices, vout.values, vout.slot_start.shape[0], vtab.stride(0))
    else:  # head runs from the per-(slot, group) counts
        for o in (kout, vout):
            if D % o.group_size:
                raise ValueError(f"outlier channel groups ({o.group_size}) must divide the head size {D}")
        pages_kernel = _pages_kernel_v3
        extra_const = {"KCORR": version == 3, "KNGP": triton.next_power_of_2(kout.n_groups),
                       "VNGP": triton.next_power_of_2(vout.n_groups)}
        kargs = (kout.slot_start, kout.head_counts, kout.indices, kout.values, kout.slot_start.shape[0],
                 ktab.stride(0), kout.n_groups, D // kout.group_size)
        vargs = (vout.slot_start, vout.head_counts, vout.indices, vout.values, vout.slot_start.shape[0],
                 vtab.stride(0), vout.n_groups, D // vout.group_size)
    pages_kernel[(B * Hkv, n_splits)](
        qs, opart, mpart, lpart,
        kp["planes"], kc.codebook.levels, kc.channel_scale.contiguous(), kc.channel_zero.contiguous(), ktab,
        *kargs,
        vp["planes"], vc.codebook.levels, vp["scale"], vp["zero"], vtab,
        *vargs,
        kc.q_len, kc.sink_len, pos, cos, sin,
        Hkv, Hq, pages_per_split, NS1,
        G=G, GP=GP, D=D, T=T, BT=BT, KBITS=kc.bits, VBITS=vc.bits,
        KOUT=bool(kc.keep_outliers and kout.nnz_upper > 0), VOUT=bool(vc.keep_outliers and vout.nnz_upper > 0),
        ROPE=rope is not None, HALF=half, DOT_DTYPE=dot_dtype, PREC=prec, **extra_const,
        num_warps=num_warps, num_stages=2,
    )
    ksink, vsink = kc.sink.contiguous(), vc.sink.contiguous()
    kres, vres = kc.residual.contiguous(), vc.residual.contiguous()
    _exact_kernel[(B * Hkv,)](
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
    _reduce_kernel[(B * Hq,)](opart, mpart, lpart, out, NS1, qs, ek, ev, Hq, G, D=D,
                              NSP=triton.next_power_of_2(NS1), EXTRA=extra_kv is not None, num_warps=4)
    return out
