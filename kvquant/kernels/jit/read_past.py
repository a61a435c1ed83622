"""The ``@triton.jit`` body of the past read of a multi-token step (launched from :mod:`kvquant.kernels.read_past`).

One program per (head, sequence, block of ``BT`` output columns): each column's logical token (sink, quantized,
open value page or residual) is read from where the store keeps it, dequantized in float32 (codes -> levels ->
per-channel map for keys, per-token scale and zero for values), key outliers put back exactly, RoPE applied to keys
and the result written once, in the output's dtype, at the column of the padded layout. Value outliers are put back
afterwards by the launcher (one scatter over the stored entries)."""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton
from kvquant.kernels.jit.lut import unit_levels
from kvquant.kernels.jit.scales import value_scale_zero

if triton is not None:

    @triton.jit
    def slot_entries(KSS, KHC, slot, h, H, ok, HC: tl.constexpr):
        """Where head ``h``'s key outliers of slots ``slot [N]`` are: ``(first entry, count)``, each ``[N]`` (a
        slot's entries are contiguous, head after head, from ``KSS[slot]``; ``KHC [slots, H]`` counts them per
        head). Reads the counts of heads ``0 .. h`` only, ``HC`` at a time (a whole row of ``H`` counts per lane
        would hold ``H`` registers per slot). Rows where ``ok`` is false get no entries."""
        hs = tl.arange(0, HC)[None, :]
        row0 = slot.to(tl.int64)[:, None] * H
        before = tl.zeros_like(slot).to(tl.int32)
        cnt = tl.zeros_like(slot).to(tl.int32)
        for h0 in range(0, h + 1, HC):
            hh = h0 + hs
            c = tl.load(KHC + row0 + hh, mask=(hh <= h) & ok[:, None], other=0).to(tl.int32)
            before += tl.sum(tl.where(hh < h, c, 0), axis=1)
            cnt += tl.sum(tl.where(hh == h, c, 0), axis=1)
        return tl.load(KSS + slot, mask=ok, other=0) + before, cnt

    @triton.jit
    def _half_levels(CODES, base, U, t, unit0, LEV, ok, BITS: tl.constexpr, NU: tl.constexpr, NH: tl.constexpr,
                     BT: tl.constexpr):
        """float32 levels ``[BT, NH * 32]`` of the ``NH`` code units from ``unit0`` of in-page tokens ``t [BT]``
        whose (page, head) codes start at word ``base [BT]`` (rows where ``ok`` is false read nothing), decoded by the
        decode kernels' :func:`~kvquant.kernels.jit.lut.unit_levels` (its gather path, float32 levels)."""
        wbase = base[:, None] + t[:, None] * NU + unit0 + tl.arange(0, NH)[None, :]
        m = ok[:, None]
        w0 = tl.load(CODES + wbase, mask=m, other=0)
        w1 = tl.load(CODES + wbase + U, mask=m, other=0)
        w2 = w1
        w3 = w1
        if BITS >= 3:
            w2 = tl.load(CODES + wbase + 2 * U, mask=m, other=0)
        if BITS == 4:
            w3 = tl.load(CODES + wbase + 3 * U, mask=m, other=0)
        return unit_levels(w0, w1, w2, w3, LEV, LEV, BITS, BT, NH, False, tl.float32)

    # integer arguments that change with the batch's lengths are not specialized on (divisibility by 16, == 1):
    # a chunked prefill would otherwise compile the kernel again whenever one of them changes class (~0.8 s each)
    @triton.jit(do_not_specialize=["o_b", "o_h", "S", "n_sink", "n_res", "tab_stride", "H"])
    def read_past_kernel(
        OUT, o_b, o_h, o_s, SRC, S,
        SINK, n_sink, RES, n_res, SLEN, QLEN, RLEN,
        CODES, LEV, TAB, tab_stride, CS, CZ, VSC, VZR, VREF, OPEN,
        KSS, KHC, KOV, KOI, COS, SIN, H,
        D: tl.constexpr, T: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, KEY: tl.constexpr,
        KOUT: tl.constexpr, DEFERRED: tl.constexpr, ROPE: tl.constexpr, HC: tl.constexpr,
    ):
        """Columns ``j`` of ``OUT[b, h, :S, :]``: logical token ``SRC[b, j]`` (``-1``: padding, zeros)."""
        DH: tl.constexpr = D // 2
        NU: tl.constexpr = D // 32
        U: tl.constexpr = T * D // 32
        pid = tl.program_id(0)  # one axis (no 65535 limit); the heads of a column block run side by side, so its
        h = pid % H  # RoPE rows stay in L2
        nblk = tl.cdiv(S, BT)
        b = (pid // H) // nblk
        bh = b * H + h
        j = ((pid // H) % nblk) * BT + tl.arange(0, BT)
        jm = j < S
        k = tl.load(SRC + b * S + j, mask=jm, other=-1)
        slen = tl.load(SLEN + b)
        qlen = tl.load(QLEN + b)
        rlen = tl.load(RLEN + b)
        i = k - slen
        r = i - qlen
        in_sink = (k >= 0) & (k < slen)
        in_q = (i >= 0) & (i < qlen)
        in_res = (r >= 0) & (r < rlen)
        ca = tl.arange(0, DH)
        cb = ca + DH
        # exact tokens: sinks and the residual window
        srow = (bh * n_sink + tl.where(in_sink, k, 0)).to(tl.int64) * D
        rrow = (bh * n_res + tl.where(in_res, r, 0)).to(tl.int64) * D
        xa = tl.load(SINK + srow[:, None] + ca[None, :], mask=in_sink[:, None], other=0.0).to(tl.float32)
        xb = tl.load(SINK + srow[:, None] + cb[None, :], mask=in_sink[:, None], other=0.0).to(tl.float32)
        xa += tl.load(RES + rrow[:, None] + ca[None, :], mask=in_res[:, None], other=0.0).to(tl.float32)
        xb += tl.load(RES + rrow[:, None] + cb[None, :], mask=in_res[:, None], other=0.0).to(tl.float32)
        # quantized tokens (values of the open page: exact)
        ic = tl.where(in_q, i, 0)
        coded = in_q
        if DEFERRED:
            sealed = (qlen // T) * T
            coded = in_q & (ic < sealed)
        page = tl.load(TAB + b * tab_stride + ic // T, mask=coded, other=0).to(tl.int64)
        t = ic % T
        base = (page * H + h) * BITS * U
        qa = _half_levels(CODES, base, U, t, 0, LEV, coded, BITS, NU, NU // 2, BT)
        qb = _half_levels(CODES, base, U, t, NU // 2, LEV, coded, BITS, NU, NU // 2, BT)
        if KEY:
            qa = qa * tl.load(CS + bh * D + ca)[None, :] + tl.load(CZ + bh * D + ca)[None, :]
            qb = qb * tl.load(CS + bh * D + cb)[None, :] + tl.load(CZ + bh * D + cb)[None, :]
        else:
            sc, zr = value_scale_zero(VSC, VZR, VREF, page * H + h, t, T, coded)
            qa = qa * sc[:, None] + zr[:, None]
            qb = qb * sc[:, None] + zr[:, None]
            if DEFERRED:
                is_open = in_q & (ic >= sealed)
                orow = (bh * T + t).to(tl.int64) * D
                qa = tl.where(is_open[:, None], tl.load(OPEN + orow[:, None] + ca[None, :], mask=is_open[:, None],
                                                        other=0.0).to(tl.float32), qa)
                qb = tl.where(is_open[:, None], tl.load(OPEN + orow[:, None] + cb[None, :], mask=is_open[:, None],
                                                        other=0.0).to(tl.float32), qb)
        xa = tl.where(in_q[:, None], qa, xa)
        xb = tl.where(in_q[:, None], qb, xb)
        if KOUT:  # key outliers, exact, before the rotation: a token's entries are contiguous, head after head
            first, cnt = slot_entries(KSS, KHC, page * T + t, h, H, coded, HC)
            for e in range(0, tl.max(cnt, axis=0)):
                has = e < cnt
                c = tl.load(KOI + first + e, mask=has, other=0).to(tl.int32)[:, None]
                v = tl.load(KOV + first + e, mask=has, other=0.0).to(tl.float32)[:, None]
                xa = tl.where(has[:, None] & (ca[None, :] == c), v, xa)
                xb = tl.where(has[:, None] & (cb[None, :] == c), v, xb)
        if ROPE:  # x * cos + rotate_half(x) * sin, tables [B, S, D] per column
            crow = (b * S + j).to(tl.int64) * D
            ok = jm[:, None]
            cos_a = tl.load(COS + crow[:, None] + ca[None, :], mask=ok, other=1.0)
            cos_b = tl.load(COS + crow[:, None] + cb[None, :], mask=ok, other=1.0)
            sin_a = tl.load(SIN + crow[:, None] + ca[None, :], mask=ok, other=0.0)
            sin_b = tl.load(SIN + crow[:, None] + cb[None, :], mask=ok, other=0.0)
            xa, xb = xa * cos_a - xb * sin_a, xb * cos_b + xa * sin_b
        real = (k >= 0)[:, None]
        orow = b.to(tl.int64) * o_b + h * o_h + j.to(tl.int64) * o_s
        dt = OUT.dtype.element_ty
        tl.store(OUT + orow[:, None] + ca[None, :], tl.where(real, xa, 0.0).to(dt), mask=jm[:, None])
        tl.store(OUT + orow[:, None] + cb[None, :], tl.where(real, xb, 0.0).to(dt), mask=jm[:, None])

    @triton.jit(do_not_specialize=["o_b", "o_h", "S1", "tab_stride", "n_pages", "block_cap", "H"])
    def value_outliers_kernel(
        OUT, o_b, o_h, o_s, COL, S1, SLEN, SEALED, TAB, tab_stride, n_pages,
        CNT, HSTART, TOK, VAL, block_cap, H,
        D: tl.constexpr, T: tl.constexpr, E: tl.constexpr,
    ):
        """The exact value outliers of one (sequence, sealed page, head), written over the dequantized values at
        their columns: the head's entries are ``HSTART[blk, h]`` on, channel after channel (``CNT[blk, h, :]`` of
        each), token offsets in ``TOK``; ``COL[b, k]`` is the column of logical token ``k`` (sinks first)."""
        pid = tl.program_id(0)
        h = pid % H
        p = (pid // H) % n_pages
        b = pid // (H * n_pages)
        sealed = tl.load(SEALED + b)
        if p * T < sealed:
            blk = tl.load(TAB + b * tab_stride + p).to(tl.int64)
            ch = tl.arange(0, D)
            cnt = tl.load(CNT + (blk * H + h) * D + ch).to(tl.int32)
            cum = tl.cumsum(cnt, axis=0)  # inclusive: channel c holds entries [cum[c] - cnt[c], cum[c])
            n = tl.sum(cnt, axis=0)
            start = tl.load(HSTART + blk * H + h)
            k0 = tl.load(SLEN + b) + p * T
            for e0 in range(0, n, E):
                e = e0 + tl.arange(0, E)
                ok = e < n
                chan = tl.sum((cum[None, :] <= e[:, None]).to(tl.int32), axis=1)
                at = blk * block_cap + start + e
                tok = tl.load(TOK + at, mask=ok, other=0).to(tl.int32)
                v = tl.load(VAL + at, mask=ok, other=0.0)
                col = tl.load(COL + b * S1 + k0 + tok, mask=ok, other=0)
                dst = b.to(tl.int64) * o_b + h * o_h + col.to(tl.int64) * o_s + chan
                tl.store(OUT + dst, v.to(OUT.dtype.element_ty), mask=ok)
