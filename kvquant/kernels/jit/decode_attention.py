"""The Triton bodies of the decode attention kernels (launched by :mod:`kvquant.kernels.decode_attention`).

* ``_pages_kernel``, grid ``(B * Hkv, n_splits)``: one program per (sequence, KV head, range of pages) serves all
  ``G = Hq / Hkv`` query heads of that KV head, so the packed KV is read once. Per page (``T`` tokens, in sub-tiles
  of ``BT``) it picks the levels of the bit-planes' codes by a select tree, applies the per-channel (keys) /
  per-token (values) affine map, replaces the outlier positions by their exact sparse values (the head's entries of
  a slot are a contiguous run; where it starts and its length come from the per-(slot, channel group) counts
  ``head_counts`` of the outlier storage), optionally rotates the keys (RoPE, ``rotate_half`` convention, positions
  from ``pos_offset``), and updates an online softmax;
* ``_exact_kernel``, grid ``(B * Hkv,)``: the exact sink and residual tokens, as one more split;
* ``_reduce_kernel``, grid ``(B * Hq,)``: log-sum-exp combination of the splits (and of the extra exact token).

The head dimension is handled as two halves ``[0, D/2)`` and ``[D/2, D)`` so that RoPE needs no register
permutation. Dots run in the cache dtype (fp16/bf16; tensor cores) with float32 accumulation, or in IEEE float32
for float32 caches.
"""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton

if triton is not None:

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
    def _pages_kernel(
        Q, OP, MP, LP,
        KPL, KLEV, KCS, KCZ, KTAB, KSS, KHC, KOI, KOV, k_nslots, k_tab_stride, k_ngroups, k_gph,
        VPL, VLEV, VSC, VZR, VTAB, VSS, VHC, VOI, VOV, v_nslots, v_tab_stride, v_ngroups, v_gph,
        QLEN, SLEN, POS, COS, SIN,
        Hkv, Hq, pages_per_split, NS1,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BT: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, KOUT: tl.constexpr, VOUT: tl.constexpr, ROPE: tl.constexpr,
        HALF: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, KNGP: tl.constexpr, VNGP: tl.constexpr,
    ):
        """Attention of one (sequence, KV head, range of pages) over the quantized pages: select-tree levels, the
        head's outlier runs from the per-(slot, group) counts, outliers replaced in the key and value tiles with one
        compare per element and entry, keys' affine map folded into the query when there are neither key outliers
        nor RoPE (``s = (q*cs) . level + q . cz``), half RoPE tables, online softmax; writes one split's partial."""
        DH: tl.constexpr = D // 2
        FOLD: tl.constexpr = not ROPE and not KOUT
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
                    if KOUT:
                        ka, kb = _replace_outliers(ka, kb, KOI, KOV, kfirst, kn, hk * D, DH)
                    if ROPE:
                        ka, kb = _rope(ka, kb, COS, SIN, pos0 + i, ok, TD, HALF, DH)
                    s = tl.dot(qa, tl.trans(ka.to(DOT_DTYPE)), input_precision=PREC)
                    s += tl.dot(qb, tl.trans(kb.to(DOT_DTYPE)), input_precision=PREC)
                else:
                    s = tl.dot(qa, tl.trans(la.to(DOT_DTYPE)), input_precision=PREC)
                    s += tl.dot(qb, tl.trans(lb.to(DOT_DTYPE)), input_precision=PREC)
                    s += qcz[:, None]
                # values
                va = _select_levels(VPL, VLEV, vbase, 0, W, sub * (BT // 32), VBITS, BT, DH)
                vb = _select_levels(VPL, VLEV, vbase, DH, W, sub * (BT // 32), VBITS, BT, DH)
                soff = (vpage * Hkv + hk) * T + t
                vs = tl.load(VSC + soff).to(tl.float32)
                vz = tl.load(VZR + soff).to(tl.float32)
                va = va * vs[:, None] + vz[:, None]
                vb = vb * vs[:, None] + vz[:, None]
                if VOUT:
                    va, vb = _replace_outliers(va, vb, VOI, VOV, vfirst, vn, hk * D, DH)
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
