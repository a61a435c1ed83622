"""The Triton bodies of the fused quantize-append (launched by :mod:`kvquant.kernels.quantize_append`, which
describes the algorithm): ``_quantize_kernel`` (codes into the bit-planes, value scales, outliers staged),
``_scatter_kernel`` and ``_finish_small_kernel`` (staged outliers into the sparse matrix), ``_thresholds_kernel``
(per-token value thresholds by a sort) and the functions they share."""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton

if triton is not None:

    @triton.jit
    def _to_storage(v, BF16: tl.constexpr):
        """``v`` (float32) rounded to the 16-bit storage dtype, as float32 (exactly representable there).

        bfloat16 is rounded by hand (round to nearest even on the bits): Triton's interpreter truncates.
        """
        if BF16:
            u = v.to(tl.int32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & -65536
            return u.to(tl.float32, bitcast=True)
        else:
            return v.to(tl.float16).to(tl.float32)

    @triton.jit
    def _code_bits(x, M, BITS: tl.constexpr):
        """Bits ``(c0, c1, c2, c3)`` (bool, LSB first; unused ones False) of the number of sorted midpoints
        ``M[0 .. 2**BITS - 2]`` strictly below ``x``, by a select tree (BITS compares, no integer code)."""
        f = x != x  # all False (inputs are finite)
        if BITS == 2:
            c1 = x > tl.load(M + 1)
            c0 = x > tl.where(c1, tl.load(M + 2), tl.load(M + 0))
            c2 = f
            c3 = f
        elif BITS == 3:
            c2 = x > tl.load(M + 3)
            c1 = x > tl.where(c2, tl.load(M + 5), tl.load(M + 1))
            t = tl.where(c2, tl.where(c1, tl.load(M + 6), tl.load(M + 4)),
                         tl.where(c1, tl.load(M + 2), tl.load(M + 0)))
            c0 = x > t
            c3 = f
        else:
            c3 = x > tl.load(M + 7)
            c2 = x > tl.where(c3, tl.load(M + 11), tl.load(M + 3))
            c1 = x > tl.where(c3, tl.where(c2, tl.load(M + 13), tl.load(M + 9)),
                              tl.where(c2, tl.load(M + 5), tl.load(M + 1)))
            t = tl.where(c3, tl.where(c2, tl.where(c1, tl.load(M + 14), tl.load(M + 12)),
                                      tl.where(c1, tl.load(M + 10), tl.load(M + 8))),
                         tl.where(c2, tl.where(c1, tl.load(M + 6), tl.load(M + 4)),
                                  tl.where(c1, tl.load(M + 2), tl.load(M + 0))))
            c0 = x > t
        return c0, c1, c2, c3

    @triton.jit
    def _quantize_kernel(
        X, stride_xn, stride_xh,
        RUN_FIRST, RUN_START, RUN_CNT, CTILE, tile0,
        TABLE, stride_tab,
        CS, CZ, stride_cb, stride_ch,
        LO, HI, MIDS,
        PL, VS, VZ,
        CNT, SST, SLOT, STV, STI, COUNTER, cap, NONFIN,
        B, H,
        D: tl.constexpr, T: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
        KEY: tl.constexpr, OUT: tl.constexpr, ZERO_CODE: tl.constexpr, CODE_TREE: tl.constexpr,
        DENSE_STAGE: tl.constexpr, CHECK_FINITE: tl.constexpr,
    ):
        W: tl.constexpr = T // 32
        NW: tl.constexpr = BN // 32
        NL: tl.constexpr = (1 << BITS) - 1
        h = tl.program_id(0)
        tile = tile0 + tl.program_id(1)
        n_tiles = tl.load(CTILE + B)
        if tile < n_tiles:
            # which sequence: tiles of sequence b are CTILE[b] .. CTILE[b+1]-1
            bi = tl.arange(0, BP)
            ends = tl.load(CTILE + 1 + bi, mask=bi < B, other=2147483647)
            b = tl.sum((ends <= tile).to(tl.int32), axis=0)
            start = tl.load(RUN_START + b)  # first position written in sequence b
            cnt = tl.load(RUN_CNT + b)
            first = tl.load(RUN_FIRST + b)  # its first entry in X
            a = (start // BN + (tile - tl.load(CTILE + b))) * BN  # first position of the tile
            wi = tl.arange(0, NW)[:, None, None]
            ln = tl.arange(0, 32)[None, :, None]
            dd = tl.arange(0, D)[None, None, :]
            p = a + wi * 32 + ln  # [NW, 32, 1] positions
            ok = (p >= start) & (p < start + cnt)
            e = first + p - start  # entries
            page = tl.load(TABLE + b * stride_tab + a // T).to(tl.int64)
            off = p % T
            x = tl.load(X + e * stride_xn + h * stride_xh + dd, mask=ok, other=0.0)  # [NW, 32, D]
            xf = x.to(tl.float32)
            if CHECK_FINITE:  # NaN/Inf: set the flag (float32, NaN = seen) the host reads every few steps
                bad = tl.max(tl.reshape(((xf != xf) | (tl.abs(xf) == float("inf"))).to(tl.int32), [BN * D]), axis=0)
                tl.store(NONFIN, float("nan"), mask=bad > 0)
            if KEY:
                cbase = b * stride_cb + h * stride_ch
                cs = tl.load(CS + cbase + dd)
                cz = tl.load(CZ + cbase + dd)
                xn = tl.math.div_rn(xf - cz, cs)
                if OUT:
                    out = ((xn < -1.0) | (xn > 1.0)) & ok
            else:
                if OUT:
                    lo = tl.load(LO + e, mask=ok, other=0.0)
                    hi = tl.load(HI + e, mask=ok, other=0.0)
                    out = ((xf < lo) | (xf > hi)) & ok
                    vmin = tl.min(tl.where(out, float("inf"), xf), axis=2, keep_dims=True)
                    vmax = tl.max(tl.where(out, float("-inf"), xf), axis=2, keep_dims=True)
                    empty = vmin == float("inf")  # every entry of the head is an outlier
                    vmin = tl.where(empty, 0.0, vmin)
                    vmax = tl.where(empty, 0.0, vmax)
                else:
                    vmin = tl.min(xf, axis=2, keep_dims=True)
                    vmax = tl.max(xf, axis=2, keep_dims=True)
                sc = _to_storage(tl.maximum((vmax - vmin) * 0.5, 1e-6), VS.dtype.element_ty == tl.bfloat16)
                zr = _to_storage((vmax + vmin) * 0.5, VS.dtype.element_ty == tl.bfloat16)
                soff = (page * H + h) * T + off
                tl.store(VS + soff, sc.to(VS.dtype.element_ty), mask=ok)
                tl.store(VZ + soff, zr.to(VZ.dtype.element_ty), mask=ok)
                xn = tl.math.div_rn(xf - zr, sc)
            # bit-planes: word (page, h, d, j, w) holds bit j of tokens 32w .. 32w+31 of the page, token at lane
            partial = (start > a) | (start + cnt < a + BN)
            pbase = ((page * H + h) * D + dd) * (BITS * W) + (a % T) // 32 + wi  # [NW, 1, D]
            if CODE_TREE:
                # nearest level by binary search over the sorted midpoints, one bit per level (most significant
                # first): bit = x > threshold of the node, which is torch.bucketize's count of midpoints below x
                c0, c1, c2, c3 = _code_bits(xn, MIDS, BITS)
                onehot = tl.full([NW, 32, 1], 1, tl.int32) << ln
                if OUT:
                    inl = ok & ~out
                for j in tl.static_range(BITS):
                    if j == 0:
                        cj = c0
                    elif j == 1:
                        cj = c1
                    elif j == 2:
                        cj = c2
                    else:
                        cj = c3
                    if OUT:
                        if (ZERO_CODE >> j) & 1:
                            cj = (cj & ok) | out
                        else:
                            cj = cj & inl
                    else:
                        cj = cj & ok
                    word = tl.sum(tl.where(cj, onehot, 0), axis=1, keep_dims=True)  # [NW, 1, D]
                    ptr = PL + pbase + j * W
                    if partial:  # other tokens of these words may be stored already: keep their bits
                        word = word | tl.load(ptr)
                    tl.store(ptr, word)
            else:
                # nearest level = number of midpoints strictly below (torch.bucketize, right=False)
                code = tl.zeros([NW, 32, D], dtype=tl.int32)
                for k in tl.static_range(NL):
                    code += (xn > tl.load(MIDS + k)).to(tl.int32)
                if OUT:
                    code = tl.where(out, ZERO_CODE, code)
                code = tl.where(ok, code, 0)  # lanes of other positions stay as they are (zero on fresh pages)
                for j in tl.static_range(BITS):
                    # the 32 lanes are distinct bits, so their sum is their OR (int32 wrap-around sets bit 31)
                    word = tl.sum(((code >> j) & 1) << ln, axis=1, keep_dims=True)  # [NW, 1, D]
                    ptr = PL + pbase + j * W
                    if partial:  # other tokens of these words may be stored already: keep their bits
                        word = word | tl.load(ptr)
                    tl.store(ptr, word)
            if OUT:
                # prefix sums over the tile's BN tokens in token order (w * 32 + lane), on 1-D / 2-D views:
                # Triton 3.6 fails to lower scans over the size-1 axes of [NW, 32, 1] tensors (NW = 1)
                oi = tl.reshape(out.to(tl.int32), [BN, D])
                tcnt = tl.sum(oi, axis=1)  # [BN] outliers per token (this head)
                if DENSE_STAGE:  # room for every element: (token, head) stages at its own D entries
                    tstart = (tl.reshape(e, [BN]) * H + h) * D
                else:  # compacted: a range per program, reserved on a global counter
                    total = tl.sum(tcnt, axis=0)
                    base = tl.atomic_add(COUNTER, total, mask=total > 0)
                    base = tl.where(total > 0, base, 0)
                    tstart = base + tl.cumsum(tcnt, axis=0) - tcnt  # [BN]
                pos = tl.reshape(tstart[:, None] + tl.cumsum(oi, axis=1) - oi, [NW, 32, D])  # staging positions
                tcnt = tl.reshape(tcnt, [NW, 32, 1])
                tstart = tl.reshape(tstart, [NW, 32, 1])
                tl.store(CNT + e * H + h, tcnt, mask=ok)
                tl.store(SST + e * H + h, tstart, mask=ok)
                keep = out & (pos < cap)
                tl.store(STV + pos, x.to(STV.dtype.element_ty), mask=keep)
                tl.store(STI + pos, h * D + dd, mask=keep)
                if h == 0:
                    tl.store(SLOT + e, page * T + off, mask=ok)

    @triton.jit
    def _copy_staged(c, m2, src, dst, STV, STI, OV, OI):
        """Copy ``c [BT, HP]`` staged entries of each (token, head) from ``src`` to ``dst`` (where ``m2``)."""
        for k in range(0, tl.max(tl.max(c, axis=1), axis=0)):
            m = m2 & (k < c)
            v = tl.load(STV + src + k, mask=m)
            i = tl.load(STI + src + k, mask=m)
            tl.store(OV + dst + k, v, mask=m)
            tl.store(OI + dst + k, i.to(OI.dtype.element_ty), mask=m)

    @triton.jit
    def _scatter_kernel(CNT, SST, TSTART, STV, STI, OV, OI, N, H, HP: tl.constexpr, BT: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        hh = tl.arange(0, HP)
        m2 = (t < N)[:, None] & (hh < H)[None, :]
        idx = t.to(tl.int64)[:, None] * H + hh[None, :]
        c = tl.load(CNT + idx, mask=m2, other=0)
        src = tl.load(SST + idx, mask=m2, other=0)
        dst = tl.load(TSTART + t, mask=t < N, other=0)[:, None]
        if HP > 1:  # (no scan over a size-1 axis: Triton 3.6 fails to lower some of those)
            dst += tl.cumsum(c, axis=1) - c
        _copy_staged(c, m2, src, dst, STV, STI, OV, OI)

    @triton.jit
    def _thresholds_kernel(X, stride_xn, stride_xh, LO, HI, i0_lo, i1_lo, f_lo, i0_hi, i1_hi, f_hi, H,
                           D: tl.constexpr, HDP: tl.constexpr):
        """Per-token outlier thresholds of values: order statistics ``i0``/``i1`` of the token's ``H * D``
        entries (a sort; padding sorts last) and the float32 interpolation ``v0 + (v1 - v0) * f`` of
        :func:`~kvquant.quant.stats.masked_quantile_pair` (launched without FMA contraction: bit-identical)."""
        t = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, HDP)
        h = k // D
        x = tl.load(X + t * stride_xn + h * stride_xh + k % D, mask=h < H, other=float("inf")).to(tl.float32)
        xs = tl.sort(x)
        lo0 = tl.max(tl.where(k == i0_lo, xs, float("-inf")), axis=0)
        lo1 = tl.max(tl.where(k == i1_lo, xs, float("-inf")), axis=0)
        hi0 = tl.max(tl.where(k == i0_hi, xs, float("-inf")), axis=0)
        hi1 = tl.max(tl.where(k == i1_hi, xs, float("-inf")), axis=0)
        tl.store(LO + t, lo0 + (lo1 - lo0) * f_lo)
        tl.store(HI + t, hi0 + (hi1 - hi0) * f_hi)

    @triton.jit
    def _finish_small_kernel(CNT, SST, SLOT, STV, STI, DEV, START, COUNT, HC, OV, OI, N, H,
                             BT: tl.constexpr, HP: tl.constexpr):
        """A small append's outliers into the sparse matrix, in one program: allocate each (token, head)'s
        entries after the ``DEV[0]`` stored ones (slot start, count and per-head counts), copy them from the
        staging, and advance the device counters ``DEV = (nnz, n_slots)`` in place (what
        :meth:`~kvquant.sparse.slots.BlockedSlotMatrix.allocate_slots_async` plus :func:`_scatter_kernel`
        do in several launches). ``BT``, ``HP`` >= 2 (no scans over size-1 axes)."""
        hh = tl.arange(0, HP)
        base = tl.load(DEV)
        top = tl.load(DEV + 1)
        for t0 in range(0, N, BT):
            t = t0 + tl.arange(0, BT)
            tm = t < N
            m2 = tm[:, None] & (hh < H)[None, :]
            idx = t.to(tl.int64)[:, None] * H + hh[None, :]
            c = tl.load(CNT + idx, mask=m2, other=0)
            tot = tl.sum(c, axis=1)
            tstart = base + (tl.cumsum(tot, axis=0) - tot).to(tl.int64)
            slot = tl.load(SLOT + t, mask=tm, other=0)
            tl.store(START + slot, tstart.to(tl.int32), mask=tm)
            tl.store(COUNT + slot, tot.to(COUNT.dtype.element_ty), mask=tm)
            tl.store(HC + slot[:, None] * H + hh[None, :], c.to(tl.uint8), mask=m2)
            src = tl.load(SST + idx, mask=m2, other=0)
            dst = tstart[:, None] + (tl.cumsum(c, axis=1) - c)
            _copy_staged(c, m2, src, dst, STV, STI, OV, OI)
            base += tl.sum(tot, axis=0)
            top = tl.maximum(top, tl.max(tl.where(tm, slot + 1, 0), axis=0))
        tl.store(DEV, base)
        tl.store(DEV + 1, top)
