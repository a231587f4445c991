"""SparseK selection on the GPU (SPEC 1.2-1.3): per-query thresholds and per-block key lists.

For every query ``i`` (per batch row and KV head) the candidates are the prefix
``C_i = [0, n_i)`` with ``n_i = clamp(pos_i - window + 1, 0, kv_len)``. Two numbers describe
everything the attention needs about ``C_i``:

* ``tau_i``: the SPARSEK threshold (gate of a selected key ``j`` is ``clip(u_j - tau_i, 0, 1)``);
* ``theta_i = (theta_u, theta_j)``: the k-th largest ``(u, j)`` pair in lexicographic order, so
  that ``j in S_i`` iff ``u_j > theta_u or (u_j == theta_u and j >= theta_j)``; this encodes
  the top-k with ties broken toward the larger (newer) ``j`` without materialising ``S_i``.

**Full path** (:func:`_full_select`): bisection on the *ordered integer image* of float32 (a
monotone bijection), so 32 halvings always reach adjacent floats: ``theta_u`` comes out as exactly
the k-th largest value, and ``tau`` is then made exact by the closed-form step of
:mod:`sparsek_projection` (taken relative to the bisection point, so the sum of fractional parts
stays in ``(0, 1)`` per term and keeps float32 precision at any position). It streams the whole
prefix ~36 times per query tile: O(L^2), so it is only used at a few anchor queries.

**Band path** (why selection is sub-quadratic). ``n_i`` only grows with ``i``, so between two
queries ``a < b`` whose results are known, every ``i`` in ``[a, b]`` has ``tau_a <= tau_i <= tau_b``
and ``theta_a <= theta_i <= theta_b`` (candidates are only added). With the bracket
``[tlo, thi]`` (``tau_a``/``tau_b`` widened by a small margin), a key with ``u - thi >= 1`` is
clipped to 1 for every ``t`` in the bracket, one with ``u - tlo <= 0`` to 0, and one with
``u - thi > 0`` and ``u - tlo < 1`` is fractional, ``u - t``, throughout (``fl(u - t)`` is monotone
in ``t``, so these classes hold in float32 too); only the "edge" keys (``u`` within the bracket
width of ``tlo``/``thi``, or of ``tlo + 1``/``thi + 1``) need per-query work. Likewise for theta:
keys above ``theta_b`` are always counted, keys below ``theta_a`` never, and only the keys in
``[theta_a, theta_b]`` matter. One streaming pass per interval (``_band_build_kernel``) counts and
sums the constant classes of the common prefix ``[0, n_a)`` and compacts the edge keys of
``[0, n_b)``; each query then adds the constant classes of its own tail ``[n_a, n_i)`` (at most
``b - a`` keys) and bisects over the edge keys only (``_band_select_kernel``), with the same
closed-form step. Every query checks that the bracket is valid for it (``f(tlo) >= k > f(thi)``
and the same for the counts) and a tile falls back to the full path if not, or if an edge list
overflowed its capacity, or if ``a`` has at most ``k`` candidates, so the result never depends on
the margin or on the score distribution: only the speed does.

The known queries come in levels: the full path at every ``strides[0]``-th query (and the last
one), then each level ``l`` fills the queries at every ``strides[l]``-th position between those
of level ``l - 1`` (e.g. ``4096 -> 256 -> 1``): the work is
``O(L^2 / strides[0]) + O(L * (edges + strides[l-1]))``, linear in practice.

Why a per-block list: ``C_i`` only grows with ``i``, so a key of the common prefix
``C_{i0}`` of a query block that is selected by any query ``i >= i0`` is already in ``S_{i0}``
(a subset cannot rank it lower). A block of queries therefore works on ``S_{i0}`` (at most ``k``
keys, compacted here in increasing ``j``) plus the contiguous range ``(c_{i0}, pos_last]``,
which holds the window and the few candidates that enter inside the block. ``S_{i0}`` is filtered
from the last level's interval list ``{j < n_b : u_j >= theta_a}`` (about ``k`` + the theta band
keys) instead of the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _to_key(x):
    """float32 -> int64 key, monotone: a < b (as floats) iff key(a) < key(b)."""
    b = x.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _from_key(kk):
    b = kk.to(tl.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _n_cand(qi, off, kvlen, window):
    return tl.minimum(tl.maximum(off + qi - window + 1, 0), kvlen)


@triton.jit
def _row_of(bh, TOK, KVLEN, Lq, HKV: tl.constexpr, PACKED: tl.constexpr):
    """Row ``b`` of the program axis ``bh = b * HKV + hk``: ``(b, rb, row0, lq)``.

    Padded batches: the per-token arrays (``u``, ``tau``, ...) are ``[B*Hkv, L]``, ``rb = bh``,
    ``row0 = 0``, ``lq = Lq``. Packed documents (see ``PackedDocs``): they are ``[Hkv, T]``,
    ``rb = hk``, ``row0`` is the document's first token and ``lq`` its length; row ``rb``'s token
    ``i`` is at ``rb * Lq + row0 + i`` either way (``Lq = T`` when packed).
    """
    b = bh // HKV
    if PACKED:
        rb = (bh % HKV).to(tl.int64)
        row0 = tl.load(TOK + b).to(tl.int64)
        lq = tl.load(KVLEN + b)
    else:
        rb = bh.to(tl.int64)
        row0 = 0
        lq = Lq
    return b, rb, row0, lq


@triton.jit
def _row_item(pid, pid_row, TAB, TOK, KVLEN, Lq, NITEMS, HKV: tl.constexpr, PACKED: tl.constexpr):
    """``(b, item, rb, row0, lq, slot)`` of a program over per-row items (query blocks, band intervals).

    Padded: the grid is ``(item, b * HKV + hk)``. Packed: it is ``(valid item of any document, hk)``
    and ``TAB[pid] = (document, item)``, so no program falls past a document's end. ``slot`` indexes
    the per-item arrays ``[rows rb, NITEMS, ...]`` (``NITEMS`` = items per row; packed: all items).
    """
    if PACKED:
        b = tl.load(TAB + 2 * pid)
        item = tl.load(TAB + 2 * pid + 1)
        rb = pid_row.to(tl.int64)
        row0 = tl.load(TOK + b).to(tl.int64)
        lq = tl.load(KVLEN + b)
    else:
        b = pid_row // HKV
        item = pid
        rb = pid_row.to(tl.int64)
        row0 = 0
        lq = Lq
    return b, item, rb, row0, lq, rb * NITEMS + pid


@triton.jit
def _full_select(ub, n, topk, BQ: tl.constexpr, BN: tl.constexpr):
    """Exact ``tau, theta_u, theta_j, |F|`` for the prefixes ``[0, n)`` by streaming them (O(n) x 36)."""
    big = n > topk
    kf = topk * 1.0
    tau = tl.full([BQ], float("-inf"), tl.float32)
    thu = tl.full([BQ], float("-inf"), tl.float32)
    thj = tl.zeros([BQ], tl.int32)
    nfr = tl.zeros([BQ], tl.int32)
    nmax = tl.max(n, 0)
    if nmax > topk:
        # scan 0: prefix minimum and maximum
        mx = tl.full([BQ], float("-inf"), tl.float32)
        mn = tl.full([BQ], float("inf"), tl.float32)
        for j0 in range(0, nmax, BN):
            j = j0 + tl.arange(0, BN)
            u = tl.load(ub + j, mask=j < nmax, other=0.0)
            inp = j[None, :] < n[:, None]
            mx = tl.maximum(mx, tl.max(tl.where(inp, u[None, :], float("-inf")), 1))
            mn = tl.minimum(mn, tl.min(tl.where(inp, u[None, :], float("inf")), 1))
        mx = tl.where(big, mx, 1.0)
        mn = tl.where(big, mn, 0.0)
        # tau: f(t) = sum clip(u - t, 0, 1), invariant f(lo) >= k > f(hi)
        lo_t = _to_key(mn - 2.0)
        hi_t = _to_key(mx)
        # theta: c(t) = #{u >= t}, invariant c(lo) >= k > c(hi)
        lo_c = _to_key(mn)
        hi_c = _to_key(mx) + 1
        for _it in range(32):
            mid_t = lo_t + (hi_t - lo_t) // 2
            mid_c = lo_c + (hi_c - lo_c) // 2
            # _from_key, inlined (a helper call per iteration is slow under the interpreter)
            bt = mid_t.to(tl.int32)
            tt = (bt ^ ((bt >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            bc = mid_c.to(tl.int32)
            tc = (bc ^ ((bc >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            f = tl.zeros([BQ], tl.float32)
            c = tl.zeros([BQ], tl.int32)
            for j0 in range(0, nmax, BN):
                j = j0 + tl.arange(0, BN)
                u = tl.load(ub + j, mask=j < nmax, other=0.0)
                inp = j[None, :] < n[:, None]
                p = tl.minimum(tl.maximum(u[None, :] - tt[:, None], 0.0), 1.0)
                f += tl.sum(tl.where(inp, p, 0.0), 1)
                c += tl.sum((inp & (u[None, :] >= tc[:, None])).to(tl.int32), 1)
            ge = f >= kf
            lo_t = tl.where(ge, mid_t, lo_t)
            hi_t = tl.where(ge, hi_t, mid_t)
            gc = c >= topk
            lo_c = tl.where(gc, mid_c, lo_c)
            hi_c = tl.where(gc, hi_c, mid_c)
        tau0 = _from_key(lo_t)
        th = _from_key(lo_c)

        # closed-form step at tau0 (relative to the row maximum, as the reference), tie statistics
        n_one = tl.zeros([BQ], tl.float32)
        n_fr = tl.zeros([BQ], tl.float32)
        s_fr = tl.zeros([BQ], tl.float32)
        above = tl.zeros([BQ], tl.int32)
        ties = tl.zeros([BQ], tl.int32)
        for j0 in range(0, nmax, BN):
            j = j0 + tl.arange(0, BN)
            u = tl.load(ub + j, mask=j < nmax, other=0.0)
            inp = j[None, :] < n[:, None]
            dlt = u[None, :] - tau0[:, None]
            n_one += tl.sum((inp & (dlt >= 1.0)).to(tl.float32), 1)
            fr = inp & (dlt > 0.0) & (dlt < 1.0)
            n_fr += tl.sum(fr.to(tl.float32), 1)
            s_fr += tl.sum(tl.where(fr, u[None, :] - mx[:, None], 0.0), 1)
            above += tl.sum((inp & (u[None, :] > th[:, None])).to(tl.int32), 1)
            ties += tl.sum((inp & (u[None, :] == th[:, None])).to(tl.int32), 1)
        t_ex = mx + (n_one + s_fr - kf) / tl.maximum(n_fr, 1.0)
        tau = tl.where(big, tl.where(n_fr > 0, t_ex, tau0), float("-inf"))
        thu = tl.where(big, th, float("-inf"))

        # number of fractional candidates at the final tau (the backward's |F_i|)
        nf = tl.zeros([BQ], tl.int32)
        for j0 in range(0, nmax, BN):
            j = j0 + tl.arange(0, BN)
            u = tl.load(ub + j, mask=j < nmax, other=0.0)
            inp = j[None, :] < n[:, None]
            dlt = u[None, :] - tau[:, None]
            nf += tl.sum((inp & (dlt > 0.0) & (dlt < 1.0)).to(tl.int32), 1)
        nfr = tl.where(big, nf, 0)

        # ties at theta_u: keep the `need` newest; theta_j = largest t with #{ties, j >= t} >= need
        need = topk - above
        tie_rows = big & (ties > need)
        if tl.max(tie_rows.to(tl.int32), 0) > 0:
            lo_j = tl.zeros([BQ], tl.int32)
            hi_j = n
            for _it in range(32):
                mid_j = lo_j + (hi_j - lo_j) // 2
                cnt = tl.zeros([BQ], tl.int32)
                for j0 in range(0, nmax, BN):
                    j = j0 + tl.arange(0, BN)
                    u = tl.load(ub + j, mask=j < nmax, other=0.0)
                    inp = j[None, :] < n[:, None]
                    hit = inp & (u[None, :] == th[:, None]) & (j[None, :] >= mid_j[:, None])
                    cnt += tl.sum(hit.to(tl.int32), 1)
                ok = cnt >= need
                lo_j = tl.where(ok, mid_j, lo_j)
                hi_j = tl.where(ok, hi_j, mid_j)
            thj = tl.where(tie_rows, lo_j, 0)
    return tau, thu, thj, nfr


# Triton specialises integer arguments on divisibility by 16, and for the score rows' length
# ``Lk`` that changes the layout the compiler picks for the reductions over a score block. A document
# packed with others (``Lk`` = total tokens) and the same document alone (``Lk`` = its length) then
# get differently compiled selection kernels whose float32 sums differ in the last bits, so tau and
# the whole forward are no longer bit-identical (seen on the H100). The score loads are masked row
# gathers, which gain little from a known alignment; the selection timings are in docs/benchmarks.md.
_SCORE_LENGTH = ["Lk"]


@triton.jit(do_not_specialize_on_alignment=_SCORE_LENGTH)
def _anchor_kernel(
    U, OFF, KVLEN, TAU, THU, THJ, NFRAC, TOK,
    Lq, Lk, topk, window, stride, nq,
    BQ: tl.constexpr, BN: tl.constexpr, HKV: tl.constexpr, PACKED: tl.constexpr,
):
    """Full path at queries ``min(t * stride, lq - 1)``, ``t < nq`` and ``t <= cdiv(lq - 1, stride)``
    (``stride == 1``: every query; ``lq``: the row's queries, below ``Lq`` for short packed documents)."""
    pid = tl.program_id(0)
    b, rb, row0, lq = _row_of(tl.program_id(1), TOK, KVLEN, Lq, HKV, PACKED)
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    t = pid * BQ + tl.arange(0, BQ)
    tmask = (t < nq) & (t * stride < lq - 1 + stride)
    qi = tl.minimum(t * stride, lq - 1)
    n = tl.where(tmask, _n_cand(qi, off, kvlen, window), 0)
    ub = U + rb * Lk + row0
    tau, thu, thj, nfr = _full_select(ub, n, topk, BQ, BN)
    o = rb * Lq + row0 + qi
    tl.store(TAU + o, tau, mask=tmask)
    tl.store(THU + o, thu, mask=tmask)
    tl.store(THJ + o, thj, mask=tmask)
    tl.store(NFRAC + o, nfr, mask=tmask)


@triton.jit
def _margin(t):
    """Bracket widening: absorbs float32 differences between the anchors' and a query's own tau."""
    return tl.where(t > float("-inf"), 1e-3 + 1e-5 * tl.abs(t), 0.0)


@triton.jit(do_not_specialize_on_alignment=_SCORE_LENGTH)
def _band_build_kernel(
    U, OFF, KVLEN, TAU, THU, EJ, EU, FJ, FU, LJ, CF, CI, ITAB, TOK,
    Lq, Lk, window, S, M, CAP_E, CAP_F, CAP_L,
    BUILD_LIST: tl.constexpr, BN: tl.constexpr, HKV: tl.constexpr, PACKED: tl.constexpr,
):
    """One interval ``[a, b] = [m S, min((m + 1) S, Lq - 1)]``: constants of ``[0, n_a)`` and edge lists.

    ``CF[., :4] = tlo, thi, sum_lin (u - shift), shift``; ``CI[., :6] = #one, #lin, #above theta_b,
    #tau edges, #theta edges, #list`` (counts may exceed the capacities: the readers check).
    """
    b, m, rb, row0, lq, slot = _row_item(tl.program_id(0), tl.program_id(1), ITAB, TOK, KVLEN, Lq, M, HKV, PACKED)
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    qa = m * S
    qb = tl.minimum(qa + S, lq - 1)
    na = _n_cand(qa, off, kvlen, window)
    nb = _n_cand(qb, off, kvlen, window)
    so = rb * Lq + row0
    tau_a = tl.load(TAU + so + qa)
    tau_b = tl.load(TAU + so + qb)
    clo = tl.load(THU + so + qa)
    chi = tl.load(THU + so + qb)
    tlo = tau_a - _margin(tau_a)
    thi = tau_b + _margin(tau_b)
    ub = U + rb * Lk + row0
    ejb = EJ + slot * CAP_E
    eub = EU + slot * CAP_E
    fjb = FJ + slot * CAP_F
    fub = FU + slot * CAP_F
    ljb = LJ + slot * CAP_L
    # shift of the sums: the largest key of the common prefix (a score value, so u - shift is exact
    # on quantised scores, as in the reference's row-maximum shift)
    shift = tl.load(ub + tl.maximum(na - 1, 0)) * 0.0 + float("-inf")
    for j0 in range(0, na, BN):
        j = j0 + tl.arange(0, BN)
        shift = tl.maximum(shift, tl.max(tl.load(ub + j, mask=j < na, other=float("-inf")), 0))
    shift = tl.where(shift > float("-inf"), shift, 0.0)
    n1 = 0
    nl = 0
    na_ = 0
    sl = 0.0
    ce = 0
    cf = 0
    cl = 0
    for j0 in range(0, nb, BN):
        j = j0 + tl.arange(0, BN)
        jm = j < nb
        u = tl.load(ub + j, mask=jm, other=0.0)
        d_hi = u - thi
        d_lo = u - tlo
        one = d_hi >= 1.0
        zero = d_lo <= 0.0
        lin = (d_hi > 0.0) & (d_lo < 1.0)
        base = jm & (j < na)
        n1 += tl.sum((base & one).to(tl.int32), 0)
        nl += tl.sum((base & lin).to(tl.int32), 0)
        sl += tl.sum(tl.where(base & lin, u - shift, 0.0), 0)
        na_ += tl.sum((base & (u > chi)).to(tl.int32), 0)
        te = jm & (one == 0) & (zero == 0) & (lin == 0)
        ti = te.to(tl.int32)
        ts = ce + tl.cumsum(ti, 0) - 1
        tl.store(ejb + ts, j, mask=te & (ts < CAP_E))
        tl.store(eub + ts, u, mask=te & (ts < CAP_E))
        ce += tl.sum(ti, 0)
        fe = jm & (u >= clo) & (u <= chi)
        fi = fe.to(tl.int32)
        fs = cf + tl.cumsum(fi, 0) - 1
        tl.store(fjb + fs, j, mask=fe & (fs < CAP_F))
        tl.store(fub + fs, u, mask=fe & (fs < CAP_F))
        cf += tl.sum(fi, 0)
        if BUILD_LIST:
            le = jm & (u >= clo)
            li = le.to(tl.int32)
            ls = cl + tl.cumsum(li, 0) - 1
            tl.store(ljb + ls, j, mask=le & (ls < CAP_L))
            cl += tl.sum(li, 0)
    tl.store(CF + slot * 4 + 0, tlo)
    tl.store(CF + slot * 4 + 1, thi)
    tl.store(CF + slot * 4 + 2, sl)
    tl.store(CF + slot * 4 + 3, shift)
    tl.store(CI + slot * 8 + 0, n1)
    tl.store(CI + slot * 8 + 1, nl)
    tl.store(CI + slot * 8 + 2, na_)
    tl.store(CI + slot * 8 + 3, ce)
    tl.store(CI + slot * 8 + 4, cf)
    tl.store(CI + slot * 8 + 5, cl)


@triton.jit
def _band_f(t, c1, cl, sl, s, ejb, eub, ce, n, BQ: tl.constexpr, BE: tl.constexpr):
    """``f_i(t) = sum_{C_i} clip(u - t, 0, 1)`` from the constant classes plus the tau edge keys."""
    f = c1.to(tl.float32) + sl - cl.to(tl.float32) * (t - s)
    for e0 in range(0, ce, BE):
        e = e0 + tl.arange(0, BE)
        em = e < ce
        ej = tl.load(ejb + e, mask=em, other=0)
        eu = tl.load(eub + e, mask=em, other=0.0)
        inp = em[None, :] & (ej[None, :] < n[:, None])
        p = tl.minimum(tl.maximum(eu[None, :] - t[:, None], 0.0), 1.0)
        f += tl.sum(tl.where(inp, p, 0.0), 1)
    return f


@triton.jit
def _band_c(tc, ca, fjb, fub, cf, n, BE: tl.constexpr):
    """``#{j in C_i : u_j >= tc}`` for ``tc`` in the theta bracket."""
    c = ca
    for e0 in range(0, cf, BE):
        e = e0 + tl.arange(0, BE)
        em = e < cf
        fj = tl.load(fjb + e, mask=em, other=0)
        fu = tl.load(fub + e, mask=em, other=0.0)
        inp = em[None, :] & (fj[None, :] < n[:, None])
        c += tl.sum((inp & (fu[None, :] >= tc[:, None])).to(tl.int32), 1)
    return c


@triton.jit
def _band_tile(ITAB, TOK, KVLEN, Lq, S, R, M, TPI, BQ: tl.constexpr, HKV: tl.constexpr, PACKED: tl.constexpr):
    """The queries of this program's band tile, shared by the select and fallback kernels:
    ``(b, m, rb, row0, lq, slot, qi, tmask, flag)``; ``flag`` is the tile's entry in ``FALLBACK``."""
    pid = tl.program_id(0)
    b, m, rb, row0, lq, slot = _row_item(pid // TPI, tl.program_id(1), ITAB, TOK, KVLEN, Lq, M, HKV, PACKED)
    t = (pid % TPI) * BQ + tl.arange(0, BQ)
    qi = m * S + t * R
    tmask = (t >= 1) & (t * R < S) & (qi < lq - 1)
    return b, m, rb, row0, lq, slot, qi, tmask, tl.program_id(1) * tl.num_programs(0) + pid


@triton.jit(do_not_specialize_on_alignment=_SCORE_LENGTH)
def _band_select_kernel(
    U, OFF, KVLEN, TAU, THU, THJ, NFRAC, EJ, EU, FJ, FU, CF, CI, ITAB, TOK, FALLBACK,
    Lq, Lk, topk, window, S, R, M, TPI, CAP_E, CAP_F,
    BQ: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, HKV: tl.constexpr, PACKED: tl.constexpr,
):
    """Queries ``m S + t R`` (``1 <= t < S / R``, below ``Lq - 1``) of interval ``m`` from its bracket.

    A tile whose bracket check fails (or whose edge lists overflowed) stores nothing and sets
    ``FALLBACK[tile]``; :func:`_band_fallback_kernel` then runs the full path for it. Keeping the
    full path out of this kernel keeps its register count low (sm_90, BQ=32, 4 warps, 64-edge
    chunks: 255 -> 168; ``benchmarks/kernel_registers.py``), so more programs fit on an SM; the
    fallback is rare (first intervals, odd scores).
    """
    b, m, rb, row0, lq, slot, qi, tmask, flag = _band_tile(ITAB, TOK, KVLEN, Lq, S, R, M, TPI, BQ, HKV, PACKED)
    if tl.max(tmask.to(tl.int32), 0) > 0:
        off = tl.load(OFF + b)
        kvlen = tl.load(KVLEN + b)
        n = tl.where(tmask, _n_cand(qi, off, kvlen, window), 0)
        nmax = tl.max(n, 0)
        kf = topk * 1.0
        so = rb * Lq + row0
        ub = U + rb * Lk + row0
        qa = m * S
        na = _n_cand(qa, off, kvlen, window)
        tau_a = tl.load(TAU + so + qa)
        clo = tl.load(THU + so + qa)
        chi = tl.load(THU + so + tl.minimum(qa + S, lq - 1))
        tlo = tl.load(CF + slot * 4 + 0)
        thi = tl.load(CF + slot * 4 + 1)
        sl0 = tl.load(CF + slot * 4 + 2)
        shift = tl.load(CF + slot * 4 + 3)
        ce = tl.load(CI + slot * 8 + 3)
        cf = tl.load(CI + slot * 8 + 4)
        ejb = EJ + slot * CAP_E
        eub = EU + slot * CAP_E
        fjb = FJ + slot * CAP_F
        fub = FU + slot * CAP_F

        tau = tl.full([BQ], float("-inf"), tl.float32)
        thu = tl.full([BQ], float("-inf"), tl.float32)
        thj = tl.zeros([BQ], tl.int32)
        nfr = tl.zeros([BQ], tl.int32)
        band_ok = (tau_a > float("-inf")) & (ce <= CAP_E) & (cf <= CAP_F)
        if band_ok:
            # constant classes: common prefix [0, n_a) + the query's own tail [n_a, n_i)
            c1 = tl.zeros([BQ], tl.int32) + tl.load(CI + slot * 8 + 0)
            cl = tl.zeros([BQ], tl.int32) + tl.load(CI + slot * 8 + 1)
            ca = tl.zeros([BQ], tl.int32) + tl.load(CI + slot * 8 + 2)
            sl = tl.zeros([BQ], tl.float32) + sl0
            for j0 in range(na, nmax, BN):
                j = j0 + tl.arange(0, BN)
                u = tl.load(ub + j, mask=j < nmax, other=0.0)
                inp = j[None, :] < n[:, None]
                d_hi = u - thi
                d_lo = u - tlo
                lin = (d_hi > 0.0) & (d_lo < 1.0)
                c1 += tl.sum((inp & (d_hi >= 1.0)[None, :]).to(tl.int32), 1)
                cl += tl.sum((inp & lin[None, :]).to(tl.int32), 1)
                sl += tl.sum(tl.where(inp & lin[None, :], (u - shift)[None, :], 0.0), 1)
                ca += tl.sum((inp & (u > chi)[None, :]).to(tl.int32), 1)
            # the bracket must hold for every query of the tile: f(tlo) >= k > f(thi), same for counts
            lo_t = tl.zeros([BQ], tl.int64) + _to_key(tlo)
            hi_t = tl.zeros([BQ], tl.int64) + _to_key(thi)
            lo_c = tl.zeros([BQ], tl.int64) + _to_key(clo)
            hi_c = tl.zeros([BQ], tl.int64) + _to_key(chi) + 1
            f_lo = _band_f(_from_key(lo_t), c1, cl, sl, shift, ejb, eub, ce, n, BQ, BE)
            f_hi = _band_f(_from_key(hi_t), c1, cl, sl, shift, ejb, eub, ce, n, BQ, BE)
            c_lo = _band_c(_from_key(lo_c), ca, fjb, fub, cf, n, BE)
            good = (f_lo >= kf) & (f_hi < kf) & (c_lo >= topk) & (ca < topk)
            band_ok = tl.min((good | (tmask == 0)).to(tl.int32), 0) > 0
            if band_ok:
                # iterations: enough halvings for the wider of the two brackets (floor(log2) + 2)
                span = tl.maximum(tl.max(hi_t - lo_t, 0), tl.max(hi_c - lo_c, 0))
                lg = ((span.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 127
                for _it in range(lg + 2):
                    mid_t = lo_t + (hi_t - lo_t) // 2
                    mid_c = lo_c + (hi_c - lo_c) // 2
                    # _band_f and _band_c inlined (helper calls in a loop are slow under the interpreter)
                    bt = mid_t.to(tl.int32)
                    tt = (bt ^ ((bt >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
                    bc = mid_c.to(tl.int32)
                    tc = (bc ^ ((bc >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
                    f = c1.to(tl.float32) + sl - cl.to(tl.float32) * (tt - shift)
                    for e0 in range(0, ce, BE):
                        e = e0 + tl.arange(0, BE)
                        em = e < ce
                        ej = tl.load(ejb + e, mask=em, other=0)
                        eu = tl.load(eub + e, mask=em, other=0.0)
                        inp = em[None, :] & (ej[None, :] < n[:, None])
                        p = tl.minimum(tl.maximum(eu[None, :] - tt[:, None], 0.0), 1.0)
                        f += tl.sum(tl.where(inp, p, 0.0), 1)
                    c = ca
                    for e0 in range(0, cf, BE):
                        e = e0 + tl.arange(0, BE)
                        em = e < cf
                        fj = tl.load(fjb + e, mask=em, other=0)
                        fu = tl.load(fub + e, mask=em, other=0.0)
                        inp = em[None, :] & (fj[None, :] < n[:, None])
                        c += tl.sum((inp & (fu[None, :] >= tc[:, None])).to(tl.int32), 1)
                    ge = f >= kf
                    lo_t = tl.where(ge, mid_t, lo_t)
                    hi_t = tl.where(ge, hi_t, mid_t)
                    gc = c >= topk
                    lo_c = tl.where(gc, mid_c, lo_c)
                    hi_c = tl.where(gc, hi_c, mid_c)
                tau0 = _from_key(lo_t)
                th = _from_key(lo_c)
                # closed-form step (relative to the shift) on the sets at tau0
                n_one = c1.to(tl.float32)
                n_fr = cl.to(tl.float32)
                s_fr = sl
                for e0 in range(0, ce, BE):
                    e = e0 + tl.arange(0, BE)
                    em = e < ce
                    ej = tl.load(ejb + e, mask=em, other=0)
                    eu = tl.load(eub + e, mask=em, other=0.0)
                    inp = em[None, :] & (ej[None, :] < n[:, None])
                    dlt = eu[None, :] - tau0[:, None]
                    n_one += tl.sum((inp & (dlt >= 1.0)).to(tl.float32), 1)
                    fr = inp & (dlt > 0.0) & (dlt < 1.0)
                    n_fr += tl.sum(fr.to(tl.float32), 1)
                    s_fr += tl.sum(tl.where(fr, (eu - shift)[None, :], 0.0), 1)
                t_ex = shift + (n_one + s_fr - kf) / tl.maximum(n_fr, 1.0)
                tau = tl.where(n_fr > 0, t_ex, tau0)
                tau = tl.minimum(tl.maximum(tau, tlo), thi)
                # |F_i| at the final tau, theta tie statistics
                nf = cl
                for e0 in range(0, ce, BE):
                    e = e0 + tl.arange(0, BE)
                    em = e < ce
                    ej = tl.load(ejb + e, mask=em, other=0)
                    eu = tl.load(eub + e, mask=em, other=0.0)
                    inp = em[None, :] & (ej[None, :] < n[:, None])
                    dlt = eu[None, :] - tau[:, None]
                    nf += tl.sum((inp & (dlt > 0.0) & (dlt < 1.0)).to(tl.int32), 1)
                nfr = nf
                above = ca
                ties = tl.zeros([BQ], tl.int32)
                for e0 in range(0, cf, BE):
                    e = e0 + tl.arange(0, BE)
                    em = e < cf
                    fj = tl.load(fjb + e, mask=em, other=0)
                    fu = tl.load(fub + e, mask=em, other=0.0)
                    inp = em[None, :] & (fj[None, :] < n[:, None])
                    above += tl.sum((inp & (fu[None, :] > th[:, None])).to(tl.int32), 1)
                    ties += tl.sum((inp & (fu[None, :] == th[:, None])).to(tl.int32), 1)
                thu = th
                need = topk - above
                tie_rows = tmask & (ties > need)
                if tl.max(tie_rows.to(tl.int32), 0) > 0:
                    lo_j = tl.zeros([BQ], tl.int32)
                    hi_j = n
                    for _it in range(32):
                        mid_j = lo_j + (hi_j - lo_j) // 2
                        cnt = tl.zeros([BQ], tl.int32)
                        for e0 in range(0, cf, BE):
                            e = e0 + tl.arange(0, BE)
                            em = e < cf
                            fj = tl.load(fjb + e, mask=em, other=0)
                            fu = tl.load(fub + e, mask=em, other=0.0)
                            hit = (em[None, :] & (fj[None, :] < n[:, None]) & (fu[None, :] == th[:, None])
                                   & (fj[None, :] >= mid_j[:, None]))
                            cnt += tl.sum(hit.to(tl.int32), 1)
                        ok = cnt >= need
                        lo_j = tl.where(ok, mid_j, lo_j)
                        hi_j = tl.where(ok, hi_j, mid_j)
                    thj = tl.where(tie_rows, lo_j, 0)
        tl.store(FALLBACK + flag, (band_ok == 0).to(tl.int32))
        if band_ok:
            o = so + qi
            tl.store(TAU + o, tau, mask=tmask)
            tl.store(THU + o, thu, mask=tmask)
            tl.store(THJ + o, thj, mask=tmask)
            tl.store(NFRAC + o, nfr, mask=tmask)
    else:
        tl.store(FALLBACK + flag, 0)


@triton.jit(do_not_specialize_on_alignment=_SCORE_LENGTH)
def _band_fallback_kernel(
    U, OFF, KVLEN, TAU, THU, THJ, NFRAC, ITAB, TOK, FALLBACK,
    Lq, Lk, topk, window, S, R, M, TPI,
    BQ: tl.constexpr, BN: tl.constexpr, HKV: tl.constexpr, PACKED: tl.constexpr,
):
    """The full path for the band tiles that :func:`_band_select_kernel` flagged (same grid and tiles)."""
    b, m, rb, row0, lq, slot, qi, tmask, flag = _band_tile(ITAB, TOK, KVLEN, Lq, S, R, M, TPI, BQ, HKV, PACKED)
    if tl.load(FALLBACK + flag) != 0:
        off = tl.load(OFF + b)
        kvlen = tl.load(KVLEN + b)
        n = tl.where(tmask, _n_cand(qi, off, kvlen, window), 0)
        tau, thu, thj, nfr = _full_select(U + rb * Lk + row0, n, topk, BQ, BN)
        o = rb * Lq + row0 + qi
        tl.store(TAU + o, tau, mask=tmask)
        tl.store(THU + o, thu, mask=tmask)
        tl.store(THJ + o, thj, mask=tmask)
        tl.store(NFRAC + o, nfr, mask=tmask)


@triton.jit
def _block_list_kernel(
    U, OFF, KVLEN, THU, THJ, IDX, CNT, LJ, CI, BTAB, TOK, IST,
    Lq, Lk, window, nblocks, cap, S, M, CAP_L,
    HAS_LIST: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, HKV: tl.constexpr, PACKED: tl.constexpr,
):
    """Compact ``S_{i0}`` (first query of each block) into ``IDX[bh, blk, :CNT]``, sorted by j.

    The keys come from the interval list ``{j < n_b : u_j >= theta_a}`` when there is one that did
    not overflow (every key of ``S_{i0}`` has ``u_j >= theta_{i0} >= theta_a``), else from the prefix.
    Packed documents: blocks come from ``BTAB``; a document's intervals start at ``IST[b]``.
    """
    b, blk, rb, row0, lq, bslot = _row_item(tl.program_id(0), tl.program_id(1), BTAB, TOK, KVLEN, Lq, nblocks,
                                          HKV, PACKED)
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    i0 = blk * BQ
    n0 = _n_cand(i0, off, kvlen, window)
    thu = tl.load(THU + rb * Lq + row0 + i0)
    thj = tl.load(THJ + rb * Lq + row0 + i0)
    ub = U + rb * Lk + row0
    out = IDX + bslot * cap
    total = n0
    use = 0
    if PACKED:  # the document's own intervals (none when it has one token: slot clamped, unused)
        m0 = 0
        m_row = 0
        if HAS_LIST:
            m0 = tl.load(IST + b)
            m_row = tl.load(IST + b + 1) - m0
        slot = rb * M + tl.minimum(m0 + tl.maximum(tl.minimum(i0 // S, m_row - 1), 0), M - 1)
    else:
        slot = rb * M + tl.minimum(i0 // S, M - 1)
    if HAS_LIST:
        lcnt = tl.load(CI + slot * 8 + 5)
        use = (lcnt <= CAP_L).to(tl.int32)
        if PACKED:
            use = tl.where(m_row > 0, use, 0)
        total = tl.where(use > 0, lcnt, n0)
    ljb = LJ + slot * CAP_L
    cnt = 0
    for t0 in range(0, total, BN):
        t = t0 + tl.arange(0, BN)
        tm = t < total
        usev = (t * 0 + use) > 0
        j = tl.where(usev, tl.load(ljb + t, mask=tm & usev, other=0), t)
        m = tm & (j < n0)
        u = tl.load(ub + j, mask=m, other=0.0)
        sel = m & ((u > thu) | ((u == thu) & (j >= thj)))
        si = sel.to(tl.int32)
        pos = cnt + tl.cumsum(si, 0) - 1
        tl.store(out + pos, j, mask=sel)
        cnt += tl.sum(si, 0)
    tl.store(CNT + bslot, cnt)


def default_strides(lq: int) -> tuple[int, ...]:
    """Query spacing of the levels: full path at every ``strides[0]``-th query, then band levels."""
    if lq > 8192:
        return (4096, 256, 1)
    if lq > 1024:
        return (256, 1)
    return (1,)


class PackedDocs:
    """Packed documents (``cu_seqlens``) as rows of the SparseK kernels; empty documents dropped.

    Row ``b`` is a document: ``length[b]`` tokens from ``tok[b]`` on in the token axis, queries ==
    keys (``off[b] = 0``). Per-token arrays (``u``, ``tau``, ...) are ``[Hkv, T]`` (``[H, T]`` per
    query head): no padded copy. Kernels over per-row items (query blocks, band intervals) run over
    a table of the valid ``(document, item)`` pairs instead of a padded grid (see ``_row_item``).
    Built from the host copy of ``cu_seqlens``; the tables are cached per block/interval size.
    """

    def __init__(self, bounds: list[int], device: torch.device):
        docs = [(a, e - a) for a, e in zip(bounds, bounds[1:], strict=False) if e > a]
        self.rows = len(docs)
        self.total = bounds[-1]
        self.lengths = [n for _, n in docs]
        self.max_len = max(self.lengths, default=0)
        table = torch.tensor([[a for a, _ in docs], self.lengths, [0] * self.rows], dtype=torch.int32)
        table = table.to(device)
        self.tok, self.length, self.off = table[0], table[1], table[2]
        self.device = device
        self._cache: dict = {}

    def _items(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = int(counts.sum())
        doc = torch.repeat_interleave(torch.arange(self.rows), counts)
        first = torch.cumsum(counts, 0) - counts
        table = torch.zeros((max(n, 1), 2), dtype=torch.int32)
        table[:n, 0] = doc.to(torch.int32)
        table[:n, 1] = (torch.arange(n) - first[doc]).to(torch.int32)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(torch.int32)
        return table.to(self.device), starts.to(self.device), n

    def blocks(self, block_q: int) -> tuple[torch.Tensor, int]:
        """``(table [n, 2] of (document, block), n)`` for query blocks of ``block_q`` queries."""
        key = ("blocks", block_q)
        if key not in self._cache:
            lengths = torch.tensor(self.lengths, dtype=torch.long)
            table, _, n = self._items(torch.div(lengths + block_q - 1, block_q, rounding_mode="floor"))
            self._cache[key] = (table, n)
        return self._cache[key]

    def intervals(self, s: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(table of (document, interval), first interval of each document [rows + 1], n)``:
        band intervals ``[m s, min((m + 1) s, length - 1)]``, ``cdiv(length - 1, s)`` per document."""
        key = ("intervals", s)
        if key not in self._cache:
            lengths = torch.tensor(self.lengths, dtype=torch.long)
            self._cache[key] = self._items(torch.div(lengths - 1 + s - 1, s, rounding_mode="floor"))
        return self._cache[key]

    def token_doc(self) -> torch.Tensor:
        """Row (document) of every packed token, ``[T]`` int64 (tokens of empty documents: none)."""
        if "token_doc" not in self._cache:
            lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
            self._cache["token_doc"] = torch.repeat_interleave(torch.arange(self.rows, device=self.device), lengths)
        return self._cache["token_doc"]


def segment_key(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like ``(seg, x)`` for float32 ``x`` ``[..., T]`` and segments ``seg``
    ``[T]`` (non-decreasing): one cummax/searchsorted over a packed row then never crosses a document."""
    b = (x + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 -> 0.0, so the order is float equality
    ordered = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(torch.int64) + 2**31
    return seg * 2**32 + ordered


def _segment_cummax(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Running maximum of float32 ``x`` ``[R, T]`` along dim 1, restarted at every segment."""
    key = torch.cummax(segment_key(x, seg), dim=1).values
    b = ((key & 0xFFFFFFFF) - 2**31).to(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32)


@dataclass
class Selection:
    """Per-query ``tau`` (monotone), ``theta_u``, ``theta_j``, ``|F|`` ``[BH, Lq]``, and the last
    band level's interval lists (``None`` when the full path ran at every query)."""

    tau: torch.Tensor
    thu: torch.Tensor
    thj: torch.Tensor
    nfrac: torch.Tensor
    lists: tuple[torch.Tensor, torch.Tensor, int, int, int] | None  # (LJ, CI, S, M, CAP_L)
    # per band level, 1 for every tile that took the full path (diagnostics and tests: speed only)
    fallbacks: tuple[torch.Tensor, ...] = ()


def _caps(interval: int, topk: int, caps: tuple[int, int] | None) -> tuple[int, int]:
    """Edge-list capacities of an interval of ``interval`` queries: tau edges, theta edges.

    Both lists hold about ``interval`` keys when the scores carry a recency slope (every key that
    enters between the two anchors pushes one out of the top-k, and tau moves with it), so neither
    may be smaller than that: with theta's capacity at half of tau's, the 4096-query intervals of
    recency-dominated scores overflowed by one key (4097 theta edges) and every one of their tiles
    took the full path.
    """
    if caps is not None:
        return caps
    cap_e = int(min(max(4 * interval, 256), 8192))
    return cap_e, cap_e


def sparsek_selection(
    u: torch.Tensor, offsets: torch.Tensor, kv_len: torch.Tensor, lq: int, topk: int, window: int,
    hkv: int, strides: tuple[int, ...] | None = None, block_q: int = 32, block_n: int = 256,
    anchor_block_q: int = 4, anchor_block_n: int = 1024, build_block_n: int = 1024,
    band_block_q: int = 32, band_block_e: int = 64, caps: tuple[int, int] | None = None,
    packed: PackedDocs | None = None, anchor_warps: int = 4, build_warps: int = 4, band_warps: int = 4,
) -> Selection:
    """Thresholds and top-k boundaries of every query of ``u`` ``[B*Hkv, Lk]`` float32 (see module doc).

    ``strides``: decreasing, each a multiple of the next, ending in 1 (default :func:`default_strides`).
    ``caps``: capacities of the tau / theta edge lists per interval (default: from the interval size);
    overflowing intervals take the full path, so caps change speed, never results.
    ``packed``: ``u`` is ``[Hkv, T]`` of packed documents (``lq = T``, ``offsets``/``kv_len`` are
    ``packed.off``/``packed.length``); the results are ``[Hkv, T]`` too, levels follow the longest one.
    ``*_warps``: warps per program of the anchor, band build and band select kernels (speed only).
    """
    bh, lk = u.shape
    lq_grid = lq if packed is None else packed.max_len
    rows = bh if packed is None else packed.rows * hkv  # grid rows of the per-row kernels
    tok = offsets if packed is None else packed.tok
    strides = tuple(strides) if strides is not None else default_strides(lq_grid)
    if not strides or strides[-1] != 1 or any(a % b or a <= b for a, b in zip(strides, strides[1:], strict=False)):
        raise ValueError(f"strides must decrease to 1, each a multiple of the next; got {strides}")
    dev = u.device
    shape = (bh, lq)
    tau = torch.empty(shape, device=dev, dtype=torch.float32)
    thu = torch.empty_like(tau)
    thj = torch.empty(shape, device=dev, dtype=torch.int32)
    nfrac = torch.empty_like(thj)
    s0 = strides[0]
    nq = triton.cdiv(lq_grid - 1, s0) + 1
    bq0, bn0 = (block_q, block_n) if s0 == 1 else (anchor_block_q, anchor_block_n)
    _anchor_kernel[(triton.cdiv(nq, bq0), rows)](u, offsets, kv_len, tau, thu, thj, nfrac, tok, lq, lk, topk,
                                                 window, s0, nq, BQ=bq0, BN=bn0, HKV=hkv, PACKED=packed is not None,
                                                 num_warps=anchor_warps)
    lists = None
    fallbacks = []
    for level, (s, r) in enumerate(zip(strides, strides[1:], strict=False)):
        if packed is None:
            m, grid_rows, itab = triton.cdiv(lq - 1, s), bh, offsets
        else:  # every valid interval of every document, one program row per KV head
            itab, _, m = packed.intervals(s)
            grid_rows = hkv
        if m == 0:
            break
        last = level == len(strides) - 2
        cap_e, cap_f = _caps(s, topk, caps)
        cap_l = topk + max(cap_f // 2, 64) if last else 1  # k + the theta edges (~interval)
        ej = torch.empty((bh, m, cap_e), device=dev, dtype=torch.int32)
        eu = torch.empty((bh, m, cap_e), device=dev, dtype=torch.float32)
        fj = torch.empty((bh, m, cap_f), device=dev, dtype=torch.int32)
        fu = torch.empty((bh, m, cap_f), device=dev, dtype=torch.float32)
        lj = torch.empty((bh, m, cap_l), device=dev, dtype=torch.int32)
        cf = torch.empty((bh, m, 4), device=dev, dtype=torch.float32)
        ci = torch.empty((bh, m, 8), device=dev, dtype=torch.int32)
        _band_build_kernel[(m, grid_rows)](u, offsets, kv_len, tau, thu, ej, eu, fj, fu, lj, cf, ci, itab, tok,
                                           lq, lk, window, s, m, cap_e, cap_f, cap_l,
                                           BUILD_LIST=last, BN=build_block_n, HKV=hkv, PACKED=packed is not None,
                                           num_warps=build_warps)
        bq = min(band_block_q, triton.next_power_of_2(s // r))
        tpi = triton.cdiv(s // r, bq)
        grid = (m * tpi, grid_rows)
        fallback = torch.empty(grid[::-1], device=dev, dtype=torch.int32)
        _band_select_kernel[grid](u, offsets, kv_len, tau, thu, thj, nfrac, ej, eu, fj, fu, cf, ci, itab, tok, fallback,
                                  lq, lk, topk, window, s, r, m, tpi, cap_e, cap_f,
                                  BQ=bq, BN=block_n, BE=band_block_e, HKV=hkv, PACKED=packed is not None,
                                  num_warps=band_warps)
        _band_fallback_kernel[grid](u, offsets, kv_len, tau, thu, thj, nfrac, itab, tok, fallback,
                                    lq, lk, topk, window, s, r, m, tpi, BQ=bq, BN=block_n, HKV=hkv,
                                    PACKED=packed is not None)
        fallbacks.append(fallback)
        if last:
            lists = (lj, ci, s, m, cap_l)
    # tau is monotone in exact arithmetic (SPEC 1.3); forward and backward use this monotone value.
    if packed is None:
        tau = torch.cummax(tau, dim=1).values
    else:  # per document
        tau = _segment_cummax(tau, packed.token_doc())
    return Selection(tau, thu, thj, nfrac, lists, tuple(fallbacks))


def sparsek_thresholds(
    u: torch.Tensor, offsets: torch.Tensor, kv_len: torch.Tensor, lq: int, topk: int, window: int,
    hkv: int, block_q: int = 32, block_n: int = 256, strides: tuple[int, ...] | None = None, **kw,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query ``tau``, ``theta_u``, ``theta_j`` and ``|F|`` for ``u`` ``[B*Hkv, Lk]`` float32."""
    sel = sparsek_selection(u, offsets, kv_len, lq, topk, window, hkv, strides, block_q, block_n, **kw)
    return sel.tau, sel.thu, sel.thj, sel.nfrac


def sparsek_block_lists(
    u: torch.Tensor, offsets: torch.Tensor, kv_len: torch.Tensor, thu: torch.Tensor, thj: torch.Tensor,
    lq: int, topk: int, window: int, hkv: int, block_q: int, block_n: int = 256,
    lists: tuple[torch.Tensor, torch.Tensor, int, int, int] | None = None,
    packed: PackedDocs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected keys of each query block's first query: ``idx [BH, nblocks, cap]``, ``cnt [BH, nblocks]``.

    ``packed``: ``idx [Hkv, blocks of all documents, cap]`` in the order of ``packed.blocks(block_q)``.
    """
    bh, lk = u.shape
    if packed is None:
        nblocks = triton.cdiv(lq, block_q)
        cap = max(1, min(topk, lk))
        grid, btab, tok = (nblocks, bh), offsets, offsets
    else:
        btab, nblocks = packed.blocks(block_q)
        cap = max(1, min(topk, packed.max_len))
        grid, tok = (nblocks, hkv), packed.tok
    idx = torch.empty((bh, nblocks, cap), device=u.device, dtype=torch.int32)
    cnt = torch.empty((bh, nblocks), device=u.device, dtype=torch.int32)
    if lists is None:
        lj = ci = cnt
        s, m, cap_l = 1, 1, 0
    else:
        lj, ci, s, m, cap_l = lists
    ist = packed.intervals(s)[1] if packed is not None and lists is not None else tok
    if nblocks > 0:
        _block_list_kernel[grid](u, offsets, kv_len, thu, thj, idx, cnt, lj, ci, btab, tok, ist, lq, lk, window,
                                 nblocks, cap, s, m, cap_l, HAS_LIST=lists is not None, BQ=block_q, BN=block_n,
                                 HKV=hkv, PACKED=packed is not None)
    return idx, cnt
