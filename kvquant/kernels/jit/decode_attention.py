"""The ``@triton.jit`` bodies of the decode attention (launched from :mod:`kvquant.kernels.decode_attention`).

Each (sequence, KV head, range of pages) is one program serving the ``G`` query heads of that KV head (each K/V
byte is read once), in two passes that keep each program's registers few:

* :func:`keys_kernel`, grid ``(B * Hkv, splits)``: per tile of ``BT`` tokens, codes -> levels
  (:func:`~kvquant.kernels.lut.unit_levels`), per-channel affine map, rotation by the tile's in-page offsets
  ``R(tau)`` (constant tables; the query is rotated by the tile's base position instead, ``R(p0 + tau) = R(p0)
  R(tau)``), then ``S^T = K . Q^T``; the scores go to a ``[B, Hq, Lmax]`` buffer.
* :func:`key_corr_kernel`, grid ``(B, token blocks)``: key outliers as score corrections, a lane per stored entry
  (every head of a block of tokens at once): ``q . R(p)(x - dense)``, added atomically to its token's score.
* :func:`values_kernel`, grid ``(B * Hkv, splits)``: online softmax over the scores; values: codes -> levels, the
  per-token scale folded into the probabilities (``p * scale``, plus ``sum(p * zero)``), ``O^T += V^T . P^T``;
  the open (last, incomplete) page is read exactly.
* :func:`exact_kernel`, grid ``(B * Hkv,)``: the exact sink and residual tokens, as one more split.
* :func:`reduce_kernel`, grid ``(B * Hq,)``: log-sum-exp combination of the splits and of the step's own token.
* :func:`value_outliers_kernel`, grid ``(B * Hkv, splits)``: value outliers, a lane per stored entry, with the final
  probabilities; per-channel sums from prefix sums over the page's channel-sorted entries, added atomically.

Scores are in the log2 domain (queries pre-scaled by ``softmax_scale * log2(e)``).
"""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton
from kvquant.kernels.jit.lut import unit_levels

if triton is not None:
    from kvquant.kernels.jit.scales import page_ref, token_scale_zero, value_scale_zero

    @triton.jit
    def _tile_levels(CODES, wbase, U, LUT, LEV, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                     USE_ASM: tl.constexpr, DT: tl.constexpr):
        """Levels ``[R, C * 32]`` of the units whose word 0 is at ``CODES + wbase [R, C]``."""
        w0 = tl.load(CODES + wbase)
        w1 = tl.load(CODES + wbase + U)
        w2 = w1
        w3 = w1
        if BITS >= 3:
            w2 = tl.load(CODES + wbase + 2 * U)
        if BITS == 4:
            w3 = tl.load(CODES + wbase + 3 * U)
        return unit_levels(w0, w1, w2, w3, LUT, LEV, BITS, R, C, USE_ASM, DT)

    @triton.jit
    def key_corr_kernel(
        Q, CORR, KTAB, k_tab_stride, KSS, KHC, KOV, KOI, KDZ, QLEN, SLEN, POS, COS, SIN,
        Hkv, Hq, Lmax,
        G: tl.constexpr, GQ: tl.constexpr, HP: tl.constexpr, LOGH: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
        BLK: tl.constexpr, JJ: tl.constexpr, ROPE: tl.constexpr,
    ):
        """Score corrections of the key outliers, a lane per stored entry: ``q_hq . R(p_i) (x - dense)`` added
        (atomically) to the score ``CORR[b, hq, i]`` of its token (``[B, Hq, Lmax]``, written by
        :func:`keys_kernel`). A program takes ``BLK`` tokens of one sequence and every head: a slot's entries are
        one run, head after head, so the token's row of per-head counts (one coalesced load) gives each entry its
        head by a binary search over their prefix sums (``HP = 2**LOGH`` heads, padded), and each round takes
        ``JJ`` entries of every token at once, whatever heads they belong to (no loop per head, and no lane idles
        on a head with no entries)."""
        DH: tl.constexpr = D // 2
        b = tl.program_id(0)
        i = tl.program_id(1) * BLK + tl.arange(0, BLK)
        qlen = tl.load(QLEN + b)
        ok = i < qlen
        page = tl.load(KTAB + b * k_tab_stride + i // T, mask=ok, other=0).to(tl.int64)
        slot = page * T + i % T
        hh = tl.arange(0, HP)
        cnt = tl.load(KHC + slot[:, None] * Hkv + hh[None, :], mask=ok[:, None] & (hh < Hkv)[None, :],
                      other=0).to(tl.int32)  # [BLK, HP]
        ends = tl.cumsum(cnt, axis=1)
        total = tl.sum(cnt, axis=1)
        first = tl.load(KSS + slot, mask=ok, other=0)
        ptok = (tl.load(POS + b) + tl.load(SLEN + b) + i).to(tl.int64)
        g = tl.arange(0, GQ)
        jj = tl.arange(0, JJ)
        for j0 in range(0, tl.max(total, axis=0), JJ):
            j = j0 + jj
            has = j[None, :] < total[:, None]  # [BLK, JJ]
            head = tl.zeros([BLK, JJ], tl.int32)  # heads whose run ends at or before entry j: a binary search
            for k in tl.static_range(LOGH):
                cand = head + (HP >> (k + 1))
                head = tl.where(tl.gather(ends, cand - 1, axis=1) <= j[None, :], cand, head)
            e = first[:, None] + j[None, :]
            c = tl.load(KOI + e, mask=has, other=0).to(tl.int32)
            x = tl.load(KOV + e, mask=has, other=0.0).to(tl.float32)
            delta = tl.where(has, x - tl.load(KDZ + (b * Hkv + head) * D + c, mask=has, other=0.0), 0.0)
            m3 = has[:, :, None] & (g < G)[None, None, :]
            qrow = (b * Hq + head * G)[:, :, None].to(tl.int64) + g[None, None, :]  # [BLK, JJ, GQ]
            qc = tl.load(Q + qrow * D + c[:, :, None], mask=m3, other=0.0)
            if ROPE:
                low = c < DH
                partner = tl.where(low, c + DH, c - DH)
                fi = tl.where(low, c, partner)
                cs_ = tl.load(COS + ptok[:, None] * DH + fi, mask=has, other=1.0)
                sn_ = tl.load(SIN + ptok[:, None] * DH + fi, mask=has, other=0.0)
                sn_ = tl.where(low, sn_, -sn_)
                qp = tl.load(Q + qrow * D + partner[:, :, None], mask=m3, other=0.0)
                qc = qc * cs_[:, :, None] + qp * sn_[:, :, None]
            tl.atomic_add(CORR + qrow * Lmax + i[:, None, None], qc * delta[:, :, None], mask=m3, sem="relaxed")

    @triton.jit
    def _scores(KC, kbase, tofs, U, KLUT, KLEV, csa, csb, cza, czb, qaT, qbT, rc, rs, COS, SIN, p_tile,
                ok, GP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, KBITS: tl.constexpr,
                ROPE: tl.constexpr, USE_ASM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, RED: tl.constexpr):
        """Scores ``S^T [BT, GP]`` of a tile of quantized keys (log2 domain), dense part. Keys are
        ``R(p0 + tau)(cs * level + cz)``: the levels take
        the per-channel map and the in-tile rotation ``R(tau)`` (constant tables), the query the tile's base
        rotation ``R(p0)^T``. ``RED``: one query head (``GP == 1``), products summed along the rows instead of a
        ``tl.dot`` with one column."""
        DH: tl.constexpr = D // 2
        NH: tl.constexpr = DH // 32
        ka = _tile_levels(KC, kbase + tofs, U, KLUT, KLEV, KBITS, BT, NH, USE_ASM, DT) * csa + cza
        kb = _tile_levels(KC, kbase + tofs + NH, U, KLUT, KLEV, KBITS, BT, NH, USE_ASM, DT) * csb + czb
        dcol = tl.arange(0, DH)
        if ROPE:
            c0 = tl.load(COS + p_tile * DH + dcol)[:, None]
            s0 = tl.load(SIN + p_tile * DH + dcol)[:, None]
            qa = (qaT * c0 + qbT * s0).to(DT)  # R(p0)^T q
            qb = (qbT * c0 - qaT * s0).to(DT)
            ka, kb = ka * rc - kb * rs, kb * rc + ka * rs
        else:
            qa = qaT.to(DT)
            qb = qbT.to(DT)
        if RED:  # one query head: row reductions in the tile's own layout
            s = tl.sum(ka.to(tl.float32) * tl.sum(qa.to(tl.float32), axis=1)[None, :], axis=1)
            s += tl.sum(kb.to(tl.float32) * tl.sum(qb.to(tl.float32), axis=1)[None, :], axis=1)
            s = s[:, None]
        else:
            s = tl.dot(ka, qa, input_precision=PREC) + tl.dot(kb, qb, input_precision=PREC)
        return tl.where(ok[:, None], s, float("-inf"))

    @triton.jit
    def _split_pages(QLEN, Hkv, pages_per_split, T: tl.constexpr):
        """The (sequence, KV head) of this program, its sequence's quantized length and its pages ``[p0, p1)``."""
        pid = tl.program_id(0)
        b = pid // Hkv
        hk = pid % Hkv
        qlen = tl.load(QLEN + b)
        p0 = tl.program_id(1) * pages_per_split
        p1 = tl.minimum(p0 + pages_per_split, (qlen + T - 1) // T)
        return b, hk, qlen, p0, p1

    @triton.jit
    def _softmax_step(s, m):
        """Online softmax over a tile of scores ``s [BT, GP]`` (log2 domain) against the running max ``m [GP]``:
        the new max, the factor ``alpha`` that rescales what was accumulated, and the tile's ``p``."""
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, tl.exp2(m - m_safe), tl.exp2(s - m_safe[None, :])

    @triton.jit
    def keys_kernel(
        Q, SC, Lmax, KC, KLUT, KLEV, KCS, KCZ, KTAB, k_tab_stride, QLEN, SLEN, POS, COS, SIN, RC, RS,
        Hkv, Hq, pages_per_split,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BT: tl.constexpr,
        KBITS: tl.constexpr, ROPE: tl.constexpr, USE_ASM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
        RED: tl.constexpr,
    ):
        """First pass of one split: the dense scores of its quantized keys (``-inf`` past the sequence's length)
        to ``SC [B, Hq, Lmax]`` (log2 domain)."""
        DH: tl.constexpr = D // 2
        NU: tl.constexpr = D // 32  # units per token
        NH: tl.constexpr = DH // 32  # units per half
        U: tl.constexpr = T * D // 32  # units per (page, head)
        b, hk, qlen, p0, p1 = _split_pages(QLEN, Hkv, pages_per_split, T)
        g = tl.arange(0, GP)
        gm = g < G
        dcol = tl.arange(0, DH)
        qrow = (b * Hq + hk * G + g).to(tl.int64) * D
        crow = (b * Hq + hk * G + g).to(tl.int64) * Lmax
        # Q^T halves [DH, GP] (rotated to the query's own position and pre-scaled)
        qaT = tl.load(Q + qrow[None, :] + dcol[:, None], mask=gm[None, :], other=0.0)
        qbT = tl.load(Q + qrow[None, :] + DH + dcol[:, None], mask=gm[None, :], other=0.0)
        cb = (b * Hkv + hk) * D
        csa = tl.load(KCS + cb + dcol)[None, :].to(DT)
        csb = tl.load(KCS + cb + DH + dcol)[None, :].to(DT)
        cza = tl.load(KCZ + cb + dcol)[None, :].to(DT)
        czb = tl.load(KCZ + cb + DH + dcol)[None, :].to(DT)
        tt = tl.arange(0, BT)
        tofs = tt[:, None] * NU + tl.arange(0, NH)[None, :]  # a token's first unit of each half, in a tile
        if ROPE:
            rc = tl.load(RC + tt[:, None] * DH + dcol[None, :]).to(DT)
            rs = tl.load(RS + tt[:, None] * DH + dcol[None, :]).to(DT)
        else:
            rc = tl.zeros([BT, DH], DT)
            rs = rc
        pos_base = tl.load(POS + b) + tl.load(SLEN + b)  # position of quantized token 0
        for pi in range(p0, p1):
            kpage = tl.load(KTAB + b * k_tab_stride + pi).to(tl.int64)
            for sub in tl.static_range(T // BT):
                i = pi * T + sub * BT + tt
                s = _scores(KC, (kpage * Hkv + hk) * KBITS * U + sub * BT * NU, tofs, U, KLUT, KLEV,
                            csa, csb, cza, czb, qaT, qbT, rc, rs, COS, SIN, (pos_base + pi * T + sub * BT).to(tl.int64),
                            i < qlen, GP, D, BT, KBITS, ROPE, USE_ASM, DT, PREC, RED)
                tl.store(SC + crow[None, :] + i[:, None], s, mask=gm[None, :])

    @triton.jit
    def _values_one_head(OP, MP, LP, SC, Lmax, VC, VLUT, VLEV, VSC, VZR, VREF, VTAB, v_tab_stride, VOPEN, b, hk, qlen,
                         p0, p1, sealed, Hkv, Hq, NS1, D: tl.constexpr, T: tl.constexpr, BT: tl.constexpr,
                         VBITS: tl.constexpr, USE_ASM: tl.constexpr, DT: tl.constexpr):
        """The values pass of one split for one query head per KV head, without dots and without rescaling: the
        split's maximum score first (its scores only), then ``acc [BT, D/2] += p * scale * level`` elementwise in the
        tile's own layout, summed over the tokens once at the end."""
        DH: tl.constexpr = D // 2
        NU: tl.constexpr = D // 32
        NH: tl.constexpr = DH // 32
        U: tl.constexpr = T * D // 32
        tt = tl.arange(0, BT)
        dcol = tl.arange(0, DH)
        tofs = tt[:, None] * NU + tl.arange(0, NH)[None, :]
        hq = (b * Hq + hk).to(tl.int64)  # G == 1: the query head is the KV head
        srow = SC + hq * Lmax
        mrow = tl.full([BT], float("-inf"), tl.float32)
        for pi in range(p0, p1):
            for sub in tl.static_range(T // BT):
                i = pi * T + sub * BT + tt
                mrow = tl.maximum(mrow, tl.load(srow + i, mask=i < qlen, other=float("-inf")))
        m = tl.max(mrow, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        acc_a = tl.zeros([BT, DH], tl.float32)
        acc_b = tl.zeros([BT, DH], tl.float32)
        lrow = tl.zeros([BT], tl.float32)
        zrow = tl.zeros([BT], tl.float32)
        ph = b * Hkv + hk
        for pi in range(p0, tl.minimum(p1, sealed)):  # sealed pages: every token is real
            vph = tl.load(VTAB + b * v_tab_stride + pi).to(tl.int64) * Hkv + hk  # (page, head) row
            smax, zmin, zstep = page_ref(VREF, vph)
            for sub in tl.static_range(T // BT):
                t = sub * BT + tt
                p = tl.exp2(tl.load(srow + pi * T + t) - m_safe)
                sc, zr = token_scale_zero(VSC, VZR, vph, t, T, t >= 0, smax, zmin, zstep)
                lrow += p
                zrow += p * zr
                w = (p * sc)[:, None]
                vbase = vph * VBITS * U + sub * BT * NU
                acc_a += w * _tile_levels(VC, vbase + tofs, U, VLUT, VLEV, VBITS, BT, NH, USE_ASM, DT).to(tl.float32)
                acc_b += w * _tile_levels(VC, vbase + tofs + NH, U, VLUT, VLEV, VBITS, BT, NH, USE_ASM,
                                          DT).to(tl.float32)
        if (sealed >= p0) & (sealed < p1):  # the open page: exact values
            for sub in tl.static_range(T // BT):
                t = sub * BT + tt
                ok = sealed * T + t < qlen
                p = tl.exp2(tl.load(srow + sealed * T + t, mask=ok, other=float("-inf")) - m_safe)
                lrow += p
                vrow = (ph * T + t).to(tl.int64)[:, None] * D + dcol[None, :]
                acc_a += p[:, None] * tl.load(VOPEN + vrow, mask=ok[:, None], other=0.0).to(tl.float32)
                acc_b += p[:, None] * tl.load(VOPEN + vrow + DH, mask=ok[:, None], other=0.0).to(tl.float32)
        z = tl.sum(zrow, axis=0)
        orow = hq * NS1 + tl.program_id(1)
        tl.store(MP + orow, m)
        tl.store(LP + orow, tl.sum(lrow, axis=0))
        tl.store(OP + orow * D + dcol, tl.sum(acc_a, axis=0) + z)
        tl.store(OP + orow * D + DH + dcol, tl.sum(acc_b, axis=0) + z)

    @triton.jit
    def values_kernel(
        OP, MP, LP, SC, Lmax, VC, VLUT, VLEV, VSC, VZR, VREF, VTAB, v_tab_stride, VOPEN, QLEN,
        Hkv, Hq, pages_per_split, NS1,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr, BT: tl.constexpr,
        VBITS: tl.constexpr, USE_ASM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    ):
        """Second pass of one split: online softmax over its scores ``SC`` (outlier corrections included) and the
        probability-weighted values; the partial output, max and sum go to ``OP``/``MP``/``LP``. One query head per
        KV head (``GP == 1``): :func:`_values_one_head`, elementwise instead of dots."""
        DH: tl.constexpr = D // 2
        NU: tl.constexpr = D // 32
        NH: tl.constexpr = DH // 32
        U: tl.constexpr = T * D // 32
        b, hk, qlen, p0, p1 = _split_pages(QLEN, Hkv, pages_per_split, T)
        sealed = qlen // T  # values of page `sealed` (if any) are in the open page, exact
        if GP == 1:
            _values_one_head(OP, MP, LP, SC, Lmax, VC, VLUT, VLEV, VSC, VZR, VREF, VTAB, v_tab_stride, VOPEN, b, hk,
                             qlen, p0, p1, sealed, Hkv, Hq, NS1, D, T, BT, VBITS, USE_ASM, DT)
            return
        g = tl.arange(0, GP)
        gm = g < G
        dcol = tl.arange(0, DH)
        crow = (b * Hq + hk * G + g).to(tl.int64) * Lmax
        tt = tl.arange(0, BT)
        tofs = tt[:, None] * NU + tl.arange(0, NH)[None, :]
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc_a = tl.zeros([DH, GP], tl.float32)
        acc_b = tl.zeros([DH, GP], tl.float32)
        zacc = tl.zeros([GP], tl.float32)
        ph = b * Hkv + hk
        for pi in range(p0, tl.minimum(p1, sealed)):  # pages of quantized values
            vph = tl.load(VTAB + b * v_tab_stride + pi).to(tl.int64) * Hkv + hk  # (page, head) row
            smax, zmin, zstep = page_ref(VREF, vph)
            for sub in tl.static_range(T // BT):
                t = sub * BT + tt
                s = tl.load(SC + crow[None, :] + (pi * T + t)[:, None], mask=gm[None, :], other=float("-inf"))
                m_new, alpha, p = _softmax_step(s, m)
                lsum = lsum * alpha + tl.sum(p, axis=0)
                sc, zr = token_scale_zero(VSC, VZR, vph, t, T, t >= 0, smax, zmin, zstep)
                zacc = zacc * alpha + tl.sum(p * zr[:, None], axis=0)
                pt = (p * sc[:, None]).to(DT)
                vbase = vph * VBITS * U + sub * BT * NU
                va = _tile_levels(VC, vbase + tofs, U, VLUT, VLEV, VBITS, BT, NH, USE_ASM, DT)
                vb = _tile_levels(VC, vbase + tofs + NH, U, VLUT, VLEV, VBITS, BT, NH, USE_ASM, DT)
                acc_a = acc_a * alpha[None, :] + tl.dot(tl.trans(va), pt, input_precision=PREC)
                acc_b = acc_b * alpha[None, :] + tl.dot(tl.trans(vb), pt, input_precision=PREC)
                m = m_new
        if (sealed >= p0) & (sealed < p1):  # the open page: exact values
            for sub in tl.static_range(T // BT):
                t = sub * BT + tt
                i = sealed * T + t
                ok = i < qlen
                s = tl.load(SC + crow[None, :] + i[:, None], mask=gm[None, :] & ok[:, None], other=float("-inf"))
                m_new, alpha, p = _softmax_step(s, m)
                lsum = lsum * alpha + tl.sum(p, axis=0)
                zacc = zacc * alpha
                vrow = (ph * T + t).to(tl.int64)[None, :] * D
                va = tl.load(VOPEN + vrow + dcol[:, None], mask=ok[None, :], other=0.0).to(DT)
                vb = tl.load(VOPEN + vrow + DH + dcol[:, None], mask=ok[None, :], other=0.0).to(DT)
                pt = p.to(DT)
                acc_a = acc_a * alpha[None, :] + tl.dot(va, pt, input_precision=PREC)
                acc_b = acc_b * alpha[None, :] + tl.dot(vb, pt, input_precision=PREC)
                m = m_new
        orow = (b * Hq + hk * G + g).to(tl.int64) * NS1 + tl.program_id(1)
        tl.store(MP + orow, m, mask=gm)
        tl.store(LP + orow, lsum, mask=gm)
        tl.store(OP + orow[None, :] * D + dcol[:, None], acc_a + zacc[None, :], mask=gm[None, :])
        tl.store(OP + orow[None, :] * D + DH + dcol[:, None], acc_b + zacc[None, :], mask=gm[None, :])

    @triton.jit
    def value_outliers_kernel(
        OUT, MF, LF, SC, Lmax, VSC, VZR, VREF, VTAB, v_tab_stride, VOV, VOT, VOC, VOH, v_block_cap, v_zero_level,
        QLEN, Hkv, Hq, pages_per_split,
        G: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, T: tl.constexpr, PP: tl.constexpr, BE: tl.constexpr,
    ):
        """Value outliers of the sealed pages of one split: ``OUT[b, hq] += sum p * (x - dense)`` with the final
        probabilities ``exp2(s - MF) / LF`` (after :func:`reduce_kernel`). A lane per stored entry, ``PP`` pages
        at a time: a page's entries are sorted by channel, so a channel's sum is the difference of the prefix sums
        of ``p * (x - dense)`` at its two ends (no per-channel loop, whatever the skew between channels); one atomic
        add per (channel, query head) and program."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // Hkv
        hk = pid % Hkv
        sealed = tl.load(QLEN + b) // T
        p0 = split * pages_per_split
        p1 = tl.minimum(p0 + pages_per_split, sealed)
        dd = tl.arange(0, D)
        g = tl.arange(0, GQ)
        gm = g < G
        hq = (b * Hq + hk * G + g).to(tl.int64)
        mf = tl.load(MF + hq, mask=gm, other=0.0)
        inv_l = 1.0 / tl.load(LF + hq, mask=gm, other=1.0)
        pp = tl.arange(0, PP)
        jj = tl.arange(0, BE)
        acc = tl.zeros([D, GQ], tl.float32)
        for q0 in range(p0, p1, PP):
            pi = q0 + pp
            pok = pi < p1
            vpage = tl.load(VTAB + b * v_tab_stride + pi, mask=pok, other=0).to(tl.int64)
            ph = vpage * Hkv + hk
            cnt = tl.load(VOC + ph[:, None] * D + dd[None, :], mask=pok[:, None], other=0).to(tl.int32)  # [PP, D]
            end = tl.cumsum(cnt, axis=1)
            start = end - cnt
            total = tl.sum(cnt, axis=1)
            base = vpage * v_block_cap + tl.load(VOH + ph, mask=pok, other=0)
            for e0 in range(0, tl.max(total, axis=0), BE):
                e = e0 + jj
                has = e[None, :] < total[:, None]  # [PP, BE]
                eidx = base[:, None] + e[None, :]
                tok = tl.load(VOT + eidx, mask=has, other=0).to(tl.int32)
                x = tl.load(VOV + eidx, mask=has, other=0.0).to(tl.float32)
                sc, zr = value_scale_zero(VSC, VZR, VREF, ph[:, None], tok, T, has)
                dense = sc * v_zero_level + zr
                col = pi[:, None] * T + tok
                s = tl.load(SC + hq[None, None, :] * Lmax + col[:, :, None], mask=has[:, :, None] & gm[None, None, :],
                            other=float("-inf"))  # [PP, BE, GQ]
                w = tl.exp2(s - mf[None, None, :]) * inv_l[None, None, :] * tl.where(has, x - dense, 0.0)[:, :, None]
                csum = tl.cumsum(w, axis=1)  # entries e0 .. e0 + j, inclusive
                hi = tl.minimum(tl.maximum(end - e0, 0), BE)  # [PP, D]: the channel's entries in this chunk
                lo = tl.minimum(tl.maximum(start - e0, 0), BE)
                at_hi = tl.gather(csum, tl.broadcast_to(tl.maximum(hi - 1, 0)[:, :, None], [PP, D, GQ]), axis=1)
                at_lo = tl.gather(csum, tl.broadcast_to(tl.maximum(lo - 1, 0)[:, :, None], [PP, D, GQ]), axis=1)
                part = tl.where((hi > 0)[:, :, None], at_hi, 0.0) - tl.where((lo > 0)[:, :, None], at_lo, 0.0)
                acc += tl.sum(part, axis=0)
        if p1 > p0:
            tl.atomic_add(OUT + hq[None, :] * D + dd[:, None], acc, mask=(dd[:, None] < D) & gm[None, :])

    @triton.jit
    def _rope(xa, xb, COS, SIN, pos, ok, DH: tl.constexpr):
        """``x * cos + rotate_half(x) * sin`` at positions ``pos [BE]`` on halves ``[BE, DH]`` (half tables)."""
        dims = tl.arange(0, DH)
        off = pos.to(tl.int64)[:, None] * DH + dims[None, :]
        ca = tl.load(COS + off, mask=ok[:, None], other=1.0)
        sa = tl.load(SIN + off, mask=ok[:, None], other=0.0)
        return xa * ca - xb * sa, xb * ca + xa * sa

    @triton.jit
    def _attend(qa, qb, ka, kb, va, vb, ok, m, lsum, acc_a, acc_b, DT: tl.constexpr, PREC: tl.constexpr):
        """Online-softmax update over ``[BE]`` exact tokens (log2 domain)."""
        s = tl.dot(qa, tl.trans(ka.to(DT)), input_precision=PREC)
        s += tl.dot(qb, tl.trans(kb.to(DT)), input_precision=PREC)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        pd = p.to(DT)
        acc_a = acc_a * alpha[:, None] + tl.dot(pd, va.to(DT), input_precision=PREC)
        acc_b = acc_b * alpha[:, None] + tl.dot(pd, vb.to(DT), input_precision=PREC)
        return m_new, lsum, acc_a, acc_b

    @triton.jit
    def exact_kernel(
        Q, OP, MP, LP,
        KSINK, VSINK, KRES, VRES, SLEN, QLEN, RLEN, POS, COS, SIN,
        Hkv, Hq, NS1, n_sink, n_res,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BE: tl.constexpr, ROPE: tl.constexpr,
        DT: tl.constexpr, PREC: tl.constexpr,
    ):
        """The exact sinks and residual tokens of (sequence, KV head) ``pid``, as split ``NS1 - 1``."""
        DH: tl.constexpr = D // 2
        pid = tl.program_id(0)
        b = pid // Hkv
        hk = pid % Hkv
        g = tl.arange(0, GP)
        dims = tl.arange(0, DH)
        row = (b * Hq + hk * G + g).to(tl.int64) * D
        gm = (g < G)[:, None]
        qa = tl.load(Q + row[:, None] + dims[None, :], mask=gm, other=0.0).to(DT)
        qb = tl.load(Q + row[:, None] + DH + dims[None, :], mask=gm, other=0.0).to(DT)
        tt = tl.arange(0, BE)
        slen = tl.load(SLEN + b).to(tl.int32)
        qlen = tl.load(QLEN + b).to(tl.int32)
        rlen = tl.load(RLEN + b).to(tl.int32)
        pos0 = tl.load(POS + b).to(tl.int32)
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc_a = tl.zeros([GP, DH], tl.float32)
        acc_b = tl.zeros([GP, DH], tl.float32)
        sbase = (b * Hkv + hk).to(tl.int64) * n_sink * D
        for j0 in range(0, slen, BE):  # sinks: token j at position pos0 + j
            j = j0 + tt
            ok = j < slen
            off = sbase + j[:, None] * D + dims[None, :]
            ka = tl.load(KSINK + off, mask=ok[:, None], other=0.0).to(tl.float32)
            kb = tl.load(KSINK + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            va = tl.load(VSINK + off, mask=ok[:, None], other=0.0).to(tl.float32)
            vb = tl.load(VSINK + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            if ROPE:
                ka, kb = _rope(ka, kb, COS, SIN, pos0 + j, ok, DH)
            m, lsum, acc_a, acc_b = _attend(qa, qb, ka, kb, va, vb, ok, m, lsum, acc_a, acc_b, DT, PREC)
        rbase = (b * Hkv + hk).to(tl.int64) * n_res * D
        for r0 in range(0, rlen, BE):  # residual: token r at position pos0 + slen + qlen + r
            r = r0 + tt
            ok = r < rlen
            off = rbase + r[:, None] * D + dims[None, :]
            ka = tl.load(KRES + off, mask=ok[:, None], other=0.0).to(tl.float32)
            kb = tl.load(KRES + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            va = tl.load(VRES + off, mask=ok[:, None], other=0.0).to(tl.float32)
            vb = tl.load(VRES + off + DH, mask=ok[:, None], other=0.0).to(tl.float32)
            if ROPE:
                ka, kb = _rope(ka, kb, COS, SIN, pos0 + slen + qlen + r, ok, DH)
            m, lsum, acc_a, acc_b = _attend(qa, qb, ka, kb, va, vb, ok, m, lsum, acc_a, acc_b, DT, PREC)
        orow = (b * Hq + hk * G + g).to(tl.int64) * NS1 + NS1 - 1
        tl.store(MP + orow, m, mask=g < G)
        tl.store(LP + orow, lsum, mask=g < G)
        tl.store(OP + orow[:, None] * D + dims[None, :], acc_a, mask=gm)
        tl.store(OP + orow[:, None] * D + DH + dims[None, :], acc_b, mask=gm)

    @triton.jit
    def reduce_kernel(OP, MP, LP, OUT, MF, LF, NS1, QS, KN, VN, Hq, G, D: tl.constexpr, NSP: tl.constexpr,
                      EXTRA: tl.constexpr):
        """Log-sum-exp combination of the splits (and of the extra exact token ``KN/VN [B, Hkv, D]``); the final max
        and sum go to ``MF``/``LF`` (the value outliers' probabilities)."""
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
        tl.store(MF + row, mx)
        tl.store(LF + row, den)
