"""The ``@triton.jit`` bodies of the quantizing writers (launched from :mod:`kvquant.kernels.encode`).

* :func:`key_tokens_kernel`, grid ``(token tiles, H)``: keys token by token (per-channel ranges), codes packed
  into the token's units, outliers staged per (token, head) for the CSC matrix;
* :func:`value_thresholds_kernel`, grid ``(N,)``: a token's outlier thresholds, order statistics of its ``H * D``
  values;
* :func:`value_pages_kernel`, grid ``(pages,)``: a whole page of values (all heads): per-token scales, codes, and
  the page's outlier block sorted by channel;
* :func:`finish_small_kernel` / :func:`scatter_kernel`: staged key outliers into their slots.

Every writer computes exactly what :mod:`kvquant.quant.encode` computes (IEEE division, the same midpoint rule,
the same scale and zero codes), so both backends store the same bytes.
"""

from __future__ import annotations

from kvquant.kernels._triton import tl, triton

if triton is not None:
    from kvquant.kernels.jit.scales import page_scales

    @triton.jit
    def to_storage(v, BF16: tl.constexpr):
        """``v`` (float32) rounded to the 16-bit storage dtype, as float32 (exactly representable there).
        bfloat16 is rounded by hand (round to nearest even): Triton's interpreter truncates."""
        if BF16:
            u = v.to(tl.int32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & -65536
            return u.to(tl.float32, bitcast=True)
        else:
            return v.to(tl.float16).to(tl.float32)

    @triton.jit
    def code_bits(x, M, BITS: tl.constexpr):
        """Bits ``(c0, c1, c2, c3)`` (int32 0/1, LSB first; unused ones 0) of the number of sorted midpoints
        ``M[0 .. 2**BITS - 2]`` strictly below ``x`` (``torch.bucketize``), by a select tree."""
        z = (x != x).to(tl.int32)  # zeros (inputs are finite)
        if BITS == 2:
            c1 = x > tl.load(M + 1)
            c0 = x > tl.where(c1, tl.load(M + 2), tl.load(M + 0))
            c2 = z
            c3 = z
        elif BITS == 3:
            c2 = x > tl.load(M + 3)
            c1 = x > tl.where(c2, tl.load(M + 5), tl.load(M + 1))
            t = tl.where(c2, tl.where(c1, tl.load(M + 6), tl.load(M + 4)),
                         tl.where(c1, tl.load(M + 2), tl.load(M + 0)))
            c0 = x > t
            c3 = z
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
        return c0.to(tl.int32), c1.to(tl.int32), c2.to(tl.int32), c3.to(tl.int32)

    @triton.jit
    def pack_words(c, R: tl.constexpr, BITS: tl.constexpr):
        """Pack codes ``c [R, 32]`` (int32; ``R`` units) into the words of :mod:`kvquant.quant.packing`:
        returns four ``[R]`` int32 tensors ``(w0, w1, w2, w3)`` (the first ``BITS`` are used)."""
        k = tl.arange(0, 32)[None, :]
        g = k // 8
        i = k % 8
        if BITS == 4:
            w0 = tl.sum(tl.where(g == 0, c << (4 * i), 0), axis=1)
            w1 = tl.sum(tl.where(g == 1, c << (4 * i), 0), axis=1)
            w2 = tl.sum(tl.where(g == 2, c << (4 * i), 0), axis=1)
            w3 = tl.sum(tl.where(g == 3, c << (4 * i), 0), axis=1)
        else:
            low = (c & 3) << (4 * i + 2 * (g % 2))
            w0 = tl.sum(tl.where(g < 2, low, 0), axis=1)  # distinct bits: the sum is the OR
            w1 = tl.sum(tl.where(g >= 2, low, 0), axis=1)
            w2 = tl.sum(((c >> 2) & 1) << (4 * i + g), axis=1)
            w3 = w2
        return w0, w1, w2, w3

    @triton.jit
    def store_units(CODES, base, U, c, m, R: tl.constexpr, BITS: tl.constexpr):
        """Store ``R`` units of codes ``c [R, 32]`` where ``m [R]``; unit ``r``'s word ``j`` goes to
        ``CODES + base[r] + j * U``."""
        w0, w1, w2, w3 = pack_words(c, R, BITS)
        tl.store(CODES + base, w0, mask=m)
        tl.store(CODES + base + U, w1, mask=m)
        if BITS >= 3:
            tl.store(CODES + base + 2 * U, w2, mask=m)
        if BITS == 4:
            tl.store(CODES + base + 3 * U, w3, mask=m)

    # zero_code differs between calibrated layers: never folded into the compiled code (one kernel for all)
    @triton.jit(do_not_specialize=["zero_code"])
    def key_tokens_kernel(
        X, stride_xn, stride_xh, SEQ, POS, N,
        TABLE, stride_tab, CS, CZ, MIDS, zero_code,
        CODES, CNT, SST, SLOT, STV, STI, COUNTER, cap, NONFIN,
        H, D: tl.constexpr, T: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr,
        OUT: tl.constexpr, DENSE_STAGE: tl.constexpr, CHECK_FINITE: tl.constexpr,
    ):
        """Keys ``X [N, H, D]``, token ``n`` at quantized position ``POS[n]`` of sequence ``SEQ[n]``. Outliers
        (normalised value outside ``[-1, 1]``) get the zero code and are staged: per (token, head) their count
        ``CNT`` and first staging entry ``SST``, entries (value, channel) at ``STV``/``STI``, grouped by (token,
        head), channels ascending; ``SLOT[n]`` = ``page * T + offset``."""
        NU: tl.constexpr = D // 32
        h = tl.program_id(1)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        ok = n < N
        nn = tl.where(ok, n, 0).to(tl.int64)
        seq = tl.load(SEQ + nn, mask=ok, other=0)
        pos = tl.load(POS + nn, mask=ok, other=0)
        page = tl.load(TABLE + seq * stride_tab + pos // T, mask=ok, other=0).to(tl.int64)
        off = pos % T
        dd = tl.arange(0, D)[None, :]
        x = tl.load(X + nn[:, None] * stride_xn + h * stride_xh + dd, mask=ok[:, None], other=0.0)
        xf = x.to(tl.float32)
        if CHECK_FINITE:
            bad = tl.max(tl.max(((xf != xf) | (tl.abs(xf) == float("inf"))).to(tl.int32), axis=1), axis=0)
            tl.store(NONFIN, float("nan"), mask=bad > 0)
        cb = (seq * H + h)[:, None] * D + dd
        xn = tl.math.div_rn(xf - tl.load(CZ + cb, mask=ok[:, None], other=0.0),
                            tl.load(CS + cb, mask=ok[:, None], other=1.0))
        c0, c1, c2, c3 = code_bits(xn, MIDS, BITS)
        code = c0 | (c1 << 1) | (c2 << 2) | (c3 << 3)
        if OUT:
            out = ((xn < -1.0) | (xn > 1.0)) & ok[:, None]
            code = tl.where(out, zero_code, code)
        # token-major units: token n's codes are units off*NU .. off*NU + NU-1 of its page
        U: tl.constexpr = T * D // 32
        ubase = ((page * H + h) * BITS)[:, None] * U + off[:, None] * NU + tl.arange(0, NU)[None, :]  # [BN, NU]
        um = tl.reshape(ok[:, None] & (ubase >= 0), [BN * NU])
        store_units(CODES, tl.reshape(ubase, [BN * NU]), U, tl.reshape(code, [BN * NU, 32]), um, BN * NU, BITS)
        if OUT:
            oi = out.to(tl.int32)
            tcnt = tl.sum(oi, axis=1)  # [BN]
            if DENSE_STAGE:  # room for every element: (token, head) stages at its own D entries
                tstart = (nn * H + h) * D
            else:  # compacted: a range per program, reserved on a global counter
                total = tl.sum(tcnt, axis=0)
                base = tl.atomic_add(COUNTER, total, mask=total > 0)
                base = tl.where(total > 0, base, 0)
                tstart = (base + tl.cumsum(tcnt, axis=0) - tcnt).to(tl.int64)
            spos = tstart[:, None] + tl.cumsum(oi, axis=1) - oi
            tl.store(CNT + nn * H + h, tcnt, mask=ok)
            tl.store(SST + nn * H + h, tstart.to(tl.int32), mask=ok)
            keep = out & (spos < cap)
            tl.store(STV + spos, x.to(STV.dtype.element_ty), mask=keep)
            tl.store(STI + spos, (dd + tl.zeros_like(spos)).to(STI.dtype.element_ty), mask=keep)
            if h == 0:
                tl.store(SLOT + nn, page * T + off, mask=ok)

    @triton.jit
    def copy_staged(c, m2, src, dst, STV, STI, OV, OI):
        """Copy ``c [BT, HP]`` staged entries of each (token, head) from ``src`` to ``dst`` (where ``m2``)."""
        for k in range(0, tl.max(tl.max(c, axis=1), axis=0)):
            m = m2 & (k < c)
            v = tl.load(STV + src + k, mask=m)
            i = tl.load(STI + src + k, mask=m)
            tl.store(OV + dst + k, v, mask=m)
            tl.store(OI + dst + k, i.to(OI.dtype.element_ty), mask=m)

    @triton.jit
    def scatter_kernel(CNT, SST, TSTART, STV, STI, OV, OI, N, H, HP: tl.constexpr, BT: tl.constexpr):
        """Staged key outliers of tokens ``[BT]`` to their slots (``TSTART``: a slot's first entry)."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        hh = tl.arange(0, HP)
        m2 = (t < N)[:, None] & (hh < H)[None, :]
        idx = t.to(tl.int64)[:, None] * H + hh[None, :]
        c = tl.load(CNT + idx, mask=m2, other=0)
        src = tl.load(SST + idx, mask=m2, other=0)
        dst = tl.load(TSTART + t, mask=t < N, other=0)[:, None]
        if HP > 1:  # (no scan over a size-1 axis)
            dst += tl.cumsum(c, axis=1) - c
        copy_staged(c, m2, src, dst, STV, STI, OV, OI)

    @triton.jit
    def finish_small_kernel(CNT, SST, SLOT, STV, STI, DEV, START, HC, OV, OI, N, H, cap,
                            BT: tl.constexpr, HP: tl.constexpr):
        """A small append's key outliers into the CSC matrix in one program: allocate each (token, head)'s
        entries after the ``DEV[0]`` stored ones, copy them from the staging, and advance the device counters
        ``DEV = (nnz, n_slots, overflow)`` in place (no host sync). Entries that would pass the capacity ``cap`` are
        not written and raise ``DEV[2]`` (the host checks it). ``BT``, ``HP`` >= 2."""
        hh = tl.arange(0, HP)
        base = tl.load(DEV)
        top = tl.load(DEV + 1)
        for t0 in range(0, N, BT):
            t = t0 + tl.arange(0, BT)
            tm = t < N
            c_all = tl.load(CNT + t.to(tl.int64)[:, None] * H + hh[None, :], mask=tm[:, None] & (hh < H)[None, :],
                            other=0)
            over = base + tl.sum(tl.sum(c_all, axis=1), axis=0) > cap
            tl.store(DEV + 2, tl.maximum(tl.load(DEV + 2), over.to(tl.int64)))
            tm = tm & ((t * 0 + 1 - over.to(tl.int32)) > 0)
            m2 = tm[:, None] & (hh < H)[None, :]
            idx = t.to(tl.int64)[:, None] * H + hh[None, :]
            c = tl.load(CNT + idx, mask=m2, other=0)
            tot = tl.sum(c, axis=1)
            tstart = base + (tl.cumsum(tot, axis=0) - tot).to(tl.int64)
            slot = tl.load(SLOT + t, mask=tm, other=0)
            tl.store(START + slot, tstart.to(tl.int32), mask=tm)
            tl.store(HC + slot[:, None] * H + hh[None, :], c.to(tl.uint8), mask=m2)
            src = tl.load(SST + idx, mask=m2, other=0)
            dst = tstart[:, None] + (tl.cumsum(c, axis=1) - c)
            copy_staged(c, m2, src, dst, STV, STI, OV, OI)
            base += tl.sum(tot, axis=0)
            top = tl.maximum(top, tl.max(tl.where(tm, slot + 1, 0), axis=0))
        tl.store(DEV, base)
        tl.store(DEV + 1, top)

    @triton.jit
    def order_statistic(key, k):
        """Per row of the order-preserving keys ``key [R, n]`` (int64 in ``[0, 2**32)``), the ``k``-th smallest
        (0-based), found bit by bit from the top: 32 counts, no sort. Returns ``[R]``."""
        res = tl.sum(key * 0, axis=1)
        for b in tl.static_range(31, -1, -1):
            cand = res + (1 << b)
            below = tl.sum((key < cand[:, None]).to(tl.int32), axis=1)
            res = tl.where(below <= k, cand, res)
        return res

    @triton.jit
    def value_thresholds_kernel(X, stride_xp, stride_xh, stride_xt, LO, HI, k, n_tok, QLEN, H, T: tl.constexpr,
                                D: tl.constexpr, HDP: tl.constexpr, BTT: tl.constexpr, SEAL: tl.constexpr):
        """Outlier thresholds of ``BTT`` tokens (token ``r`` = token ``r % T`` of page ``r // T`` of ``X [p, H, T, D]``,
        strided): ``LO`` = its ``(k+1)``-th smallest value, ``HI`` = its ``(k+1)``-th largest, by a radix select over
        the float bits (padding sorts last). ``SEAL``: only pages whose sequence fills its open page in this decode step
        (``(QLEN[p] + 1) % T == 0``; page ``p`` is sequence ``p``'s open page)."""
        r = tl.program_id(0).to(tl.int64) * BTT + tl.arange(0, BTT)
        rok = r < n_tok
        if SEAL:
            rok = rok & ((tl.load(QLEN + r // T, mask=rok, other=0) + 1) % T == 0)
        p = r // T
        t = r % T
        j = tl.arange(0, HDP)[None, :]
        h = j // D
        n = H * D
        ok = rok[:, None] & (h < H)
        x = tl.load(X + (p * stride_xp + t * stride_xt)[:, None] + h * stride_xh + j % D, mask=ok,
                    other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        key = tl.where(bits >= 2147483648, 4294967295 - bits, bits + 2147483648)  # monotone in x
        key = tl.where(h < H, key, 4294967295)
        lo = order_statistic(key, k)
        hi = order_statistic(key, n - 1 - k)
        lo = tl.where(lo >= 2147483648, lo - 2147483648, 4294967295 - lo)
        hi = tl.where(hi >= 2147483648, hi - 2147483648, 4294967295 - hi)
        tl.store(LO + r, lo.to(tl.int32).to(tl.float32, bitcast=True), mask=rok)
        tl.store(HI + r, hi.to(tl.int32).to(tl.float32, bitcast=True), mask=rok)

    @triton.jit(do_not_specialize=["zero_code"])
    def value_pages_kernel(
        X, stride_xp, stride_xh, stride_xt, LO, HI, PAGE, MIDS, zero_code,
        CODES, VS, VZ, VREF, OVAL, OTOK, OCNT, OHS, block_cap, QLEN, TAB, stride_tab,
        H, D: tl.constexpr, T: tl.constexpr, BITS: tl.constexpr, OUT: tl.constexpr, SEAL: tl.constexpr,
    ):
        """Page ``i``'s values ``X [i, H, T, D]`` (strided) into page ``PAGE[i]``: per (head, token) the inliers'
        min/max give scale and zero (:func:`~kvquant.kernels.jit.scales.page_scales`: codes ``VS``/``VZ``, the
        (page, head) reference ``VREF``), codes go to the page's units, and the
        outliers (beyond the token's ``LO``/``HI``) to the page's block, ordered by head, channel, token: per-channel
        counts ``OCNT [., H, D]``, head starts ``OHS [., H]``, entries (value, token) at ``OVAL``/``OTOK``."""
        U: tl.constexpr = T * D // 32
        i = tl.program_id(0).to(tl.int64)
        if SEAL:  # sequence i's open page, if this decode step fills it (QLEN before the step's increment)
            q = tl.load(QLEN + i)
            if (q + 1) % T != 0:
                return
            page = tl.load(TAB + i * stride_tab + q // T).to(tl.int64)
        else:
            page = tl.load(PAGE + i).to(tl.int64)
        tt = tl.arange(0, T)[:, None]
        dd = tl.arange(0, D)[None, :]
        lo = tl.load(LO + i * T + tt)
        hi = tl.load(HI + i * T + tt)
        running = i * 0  # entries written so far in this page's block
        for h in range(0, H):
            x = tl.load(X + i * stride_xp + h * stride_xh + tt * stride_xt + dd)
            xf = x.to(tl.float32)
            if OUT:
                out = (xf < lo) | (xf > hi)
                vmin = tl.min(tl.where(out, float("inf"), xf), axis=1, keep_dims=True)
                vmax = tl.max(tl.where(out, float("-inf"), xf), axis=1, keep_dims=True)
                empty = vmin == float("inf")  # every value of the head is an outlier
                vmin = tl.where(empty, 0.0, vmin)
                vmax = tl.where(empty, 0.0, vmax)
            else:
                vmin = tl.min(xf, axis=1, keep_dims=True)
                vmax = tl.max(xf, axis=1, keep_dims=True)
            scode, zcode, smax, zmin, zstep, sc, zr = page_scales(vmin, vmax)
            soff = (page * H + h) * T + tt
            tl.store(VS + soff, scode.to(tl.uint8))
            tl.store(VZ + soff, zcode.to(tl.uint8))
            roff = (page * H + h) * 3 + tl.arange(0, 1)[None, :]
            tl.store(VREF + roff, smax)
            tl.store(VREF + roff + 1, zmin)
            tl.store(VREF + roff + 2, zstep)
            c0, c1, c2, c3 = code_bits(tl.math.div_rn(xf - zr, sc), MIDS, BITS)
            code = c0 | (c1 << 1) | (c2 << 2) | (c3 << 3)
            if OUT:
                code = tl.where(out, zero_code, code)
            ubase = (page * H + h) * BITS * U + tl.arange(0, U)
            store_units(CODES, ubase, U, tl.reshape(code, [U, 32]), ubase >= 0, U, BITS)
            if OUT:
                oi = out.to(tl.int32)
                ccnt = tl.sum(oi, axis=0)  # [D] per channel
                cstart = running + tl.cumsum(ccnt, axis=0) - ccnt
                dest = cstart[None, :] + tl.cumsum(oi, axis=0) - oi  # channel-major, tokens ascending
                tl.store(OCNT + (page * H + h) * D + tl.arange(0, D), ccnt.to(OCNT.dtype.element_ty))
                tl.store(OHS + page * H + h, running.to(tl.int32))
                tl.store(OVAL + page * block_cap + dest, x.to(OVAL.dtype.element_ty), mask=out)
                tl.store(OTOK + page * block_cap + dest, (tt + tl.zeros_like(dest)).to(tl.uint8), mask=out)
                running += tl.sum(ccnt, axis=0)
