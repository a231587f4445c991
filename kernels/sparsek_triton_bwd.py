"""SparseK attention backward (FlashAttention-2's split, adapted to per-block key lists).

* **dQ** (:func:`_sparsek_bwd_dq_kernel`): query-major like the forward, over the same per-block
  lists; it also writes the per-row sums of the SPARSEK mean term (``mrow``). No atomics.
* **dK, dV, d(scores)** (:func:`_sparsek_bwd_dkdv_kernel`): key-major inside a *super-block*
  of ``NSUB`` query blocks. Thresholds only grow along the sequence (SPEC 1.3), so every key a
  query of the super-block selects from the candidates of its first query ``I0`` is in
  ``S_{I0}``, and the others lie in the contiguous range ``(c_{I0}, last position]`` (window and
  keys that enter inside the super-block): the forward's "list + range" cover, one level up. A
  program holds one key tile (gathered from the list, or contiguous from the range), loops over
  the super-block's query blocks and accumulates dK, dV and d(scores) in registers; it adds them
  once, so a key receives one partial sum per super-block. Range tiles skip the query blocks that
  end before them (causality); list tiles test the selection only (their keys are candidates of
  every query of the super-block).

How the dK/dV loop is made fast (H100, L = 128K, issue 3's shape; docs/benchmarks.md): tiles of
scores are computed transposed, ``S^T = K Q^T`` (``[BN keys, BM rows]``), so ``P^T``/``dS^T`` feed
the dK/dV products without transposing a computed register tile (only loaded tiles are
transposed); the loop advances pointers, has no branch in its body and is software-pipelined
(``num_stages=2``). The first version (row-major tiles, one stage) took 180 ms of a 277 ms
fwd+bwd; this one brings the fwd+bwd to 170 ms. The query-major fused backward with per-tile
dK/dV atomics that preceded both was as slow as the first split version (atomics were not its
bottleneck) and was removed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sparsek_triton_attn import LOG2E, _load_keys, _visibility
from .sparsek_triton_select import _row_item


@triton.jit
def _delta_kernel(OUT, DO, DELTA, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """``delta = rowsum(O * dO)`` in float32 over ``R`` contiguous rows of ``D`` (FlashAttention's
    backward preprocessing): one read of O and dO in their own dtype, where PyTorch's
    ``(do.float() * o.float()).sum(-1)`` wrote two float32 copies and their product (3 x 2 GiB and
    several passes at 128K, issue 3's shape). Kept out of the dQ kernel, whose registers are full."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    rm = r < R
    m = rm[:, None] & (d < D)[None, :]
    off = r.to(tl.int64)[:, None] * D + d[None, :]
    o = tl.load(OUT + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * g, 1), mask=rm)


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, TAU, THU, THJ, b, hk, rb, row0, i0, off, kvlen, lq, Lq,
               sqb, sqh, sql, sdb, sdh, sdl,
               HKV: tl.constexpr, G: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr,
               D: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr):
    """q, dO and the per-row statistics of one query block (``BM`` rows = G heads x BQ queries).

    Row addressing of ``_row_item``: ``rb``/``row0`` locate the row in the per-token arrays, ``lq``
    is its query count (``Lq`` the token stride of those arrays)."""
    r = tl.arange(0, BM)
    g = r // BQ
    qi = i0 + r % BQ
    row_ok = (r < G * BQ) & (qi < lq)
    pos = off + qi
    q_ok = row_ok & (pos >= 0) & (pos < kvlen)
    h = hk * G + g
    d = tl.arange(0, BD)
    rm = row_ok[:, None] & (d < D)[None, :]
    tq = (row0 + qi.to(tl.int64))[:, None]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + tq * sql + d[None, :], mask=rm, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64)[:, None] * sdh + tq * sdl + d[None, :], mask=rm, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    so = rb * Lq + row0 + qi
    tau = tl.load(TAU + so, mask=row_ok, other=0.0)
    thu = tl.load(THU + so, mask=row_ok, other=0.0)
    thj = tl.load(THJ + so, mask=row_ok, other=0)
    sr = (rb * G + g) * Lq + row0 + qi
    lse = tl.load(LSE + sr, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + sr, mask=row_ok, other=0.0)
    return q, do, tau, thu, thj, lse, delta, pos, q_ok, row_ok, h, qi, sr


@triton.jit
def _dq_tile(dq, mrow, q, do, lse2, delta, kt, vt, vis, gate, frac, qk_scale, UPCAST: tl.constexpr):
    """``qk_scale = scale * log2(e)``, ``lse2 = lse * log2(e)``: one FMA and an ``exp2`` per element."""
    p = tl.where(vis, tl.exp2(tl.dot(q, tl.trans(kt)) * qk_scale - lse2[:, None]), 0.0)
    dw = tl.dot(do, tl.trans(vt))
    ds = p * (dw * gate - delta[:, None])
    if UPCAST:
        dq += tl.dot(ds, kt)
    else:
        dq += tl.dot(ds.to(kt.dtype), kt)
    mrow += tl.sum(tl.where(frac, dw * p, 0.0), 1)
    return dq, mrow


@triton.jit
def _sparsek_bwd_dq_kernel(
    Q, K, V, U, TAU, THU, THJ, IDX, CNT, OFF, KVLEN, DO, LSE, DELTA, DQ, MROW, BTAB, TOK,
    sqb, sqh, sql, skb, skh, skl, sdb, sdh, sdl,
    Lq, Lk, window, scale, nblocks, cap,
    HKV: tl.constexpr, G: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PACKED: tl.constexpr,
):
    """dQ (like Q) and ``mrow`` (per-row ``sum_{F cap S} dp``) of one query block."""
    b, blk, rb, row0, lq, slot = _row_item(tl.program_id(0), tl.program_id(1), BTAB, TOK, KVLEN, Lq, nblocks,
                                         HKV, PACKED)
    hk = rb % HKV
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    i0 = blk * BQ
    q, do, tau, thu, thj, lse, delta, pos, q_ok, row_ok, h, qi, sr = _load_rows(
        Q, DO, LSE, DELTA, TAU, THU, THJ, b, hk, rb, row0, i0, off, kvlen, lq, Lq, sqb, sqh, sql, sdb, sdh, sdl,
        HKV, G, BQ, BM, D, BD, UPCAST)
    d = tl.arange(0, BD)
    dm = d < D
    kb = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + row0 * skl
    vb = V + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + row0 * skl
    ub = U + rb * Lk + row0
    dq = tl.zeros([BM, BD], tl.float32)
    mrow = tl.zeros([BM], tl.float32)
    qk_scale = scale * LOG2E
    lse2 = lse * LOG2E

    cnt = tl.load(CNT + slot)
    ib = IDX + slot * cap
    for t0 in range(0, cnt, BN):
        t = t0 + tl.arange(0, BN)
        jm = t < cnt
        j = tl.load(ib + t, mask=jm, other=0)
        kt, vt, u = _load_keys(kb, vb, ub, j, jm, skl, BD, D, UPCAST)
        vis, gate, frac = _visibility(j, u, pos, tau, thu, thj, q_ok, jm, window, False)
        dq, mrow = _dq_tile(dq, mrow, q, do, lse2, delta, kt, vt, vis, gate, frac, qk_scale, UPCAST)

    i_last = tl.minimum(i0 + BQ, lq) - 1
    lo = tl.maximum(off + i0 - window + 1, 0)
    hi = tl.minimum(off + i_last + 1, kvlen)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        jm = j < hi
        kt, vt, u = _load_keys(kb, vb, ub, j, jm, skl, BD, D, UPCAST)
        vis, gate, frac = _visibility(j, u, pos, tau, thu, thj, q_ok, jm, window, True)
        dq, mrow = _dq_tile(dq, mrow, q, do, lse2, delta, kt, vt, vis, gate, frac, qk_scale, UPCAST)

    rm = row_ok[:, None] & dm[None, :]
    dqp = DQ + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + (row0 + qi.to(tl.int64))[:, None] * sql + d[None, :]
    tl.store(dqp, (dq * scale).to(DQ.dtype.element_ty), mask=rm)
    tl.store(MROW + sr, mrow, mask=row_ok)


@triton.jit
def _dkdv_loop(
    kt, vt, u, j, jm, dk, dv, du, first,
    Q, DO, TAU, THU, THJ, LSE, DELTA,
    b, hk, rb, row0, I0, off, kvlen, lq, Lq, window, scale,
    sqb, sqh, sql, sdb, sdh, sdl,
    G: tl.constexpr, BQ: tl.constexpr, NSUB: tl.constexpr, BM: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, WINDOW_PART: tl.constexpr,
):
    """dK, dV, d(scores) of one key tile summed over query blocks ``first .. NSUB - 1`` of the
    super-block starting at ``I0``, in the transposed orientation (``[BN keys, BM rows]``)."""
    r = tl.arange(0, BM)
    g = r // BQ
    rr = r % BQ
    row_valid = r < G * BQ
    h = hk * G + g
    d = tl.arange(0, BD)
    dm = d < D
    q0 = (row0 + I0 + first * BQ + rr).to(tl.int64)  # token of each row in the first visited block
    qT_ptr = Q + b.to(tl.int64) * sqb + (h.to(tl.int64) * sqh + q0 * sql)[None, :] + d[:, None]
    do_ptr = DO + b.to(tl.int64) * sdb + (h.to(tl.int64) * sdh + q0 * sdl)[:, None] + d[None, :]
    qk_scale = scale * LOG2E
    st_ptr = rb * Lq + q0  # per-(KV head, token) statistics
    sr_ptr = (rb * G + g) * Lq + q0  # per-(query head, token) statistics
    for s in range(first, NSUB):
        qi = I0 + s * BQ + rr
        row_ok = row_valid & (qi < lq)
        pos = off + qi
        q_ok = row_ok & (pos >= 0) & (pos < kvlen)
        qT = tl.load(qT_ptr, mask=row_ok[None, :] & dm[:, None], other=0.0)
        do = tl.load(do_ptr, mask=row_ok[:, None] & dm[None, :], other=0.0)
        tau = tl.load(TAU + st_ptr, mask=row_ok, other=0.0)
        thu = tl.load(THU + st_ptr, mask=row_ok, other=0.0)
        thj = tl.load(THJ + st_ptr, mask=row_ok, other=0)
        lse = tl.load(LSE + sr_ptr, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + sr_ptr, mask=row_ok, other=0.0)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        sel = (u[:, None] > thu[None, :]) | ((u[:, None] == thu[None, :]) & (j[:, None] >= thj[None, :]))
        gate = tl.minimum(tl.maximum(u[:, None] - tau[None, :], 0.0), 1.0)
        if WINDOW_PART:
            win = (j[:, None] > pos[None, :] - window) & (j[:, None] <= pos[None, :])
            cand = (j[:, None] <= pos[None, :] - window) & sel
            vis = (win | cand) & jm[:, None] & q_ok[None, :]
            gate = tl.where(win, 1.0, gate)
            frac = cand & (gate > 0.0) & (gate < 1.0)
        else:
            # list keys are candidates of every query: visibility is the selection test, and a
            # selected key's gate is > 0, so it is fractional iff < 1 (pT is 0 where not visible)
            vis = sel & jm[:, None] & q_ok[None, :]
            frac = gate < 1.0
        pT = tl.where(vis, tl.exp2(tl.dot(kt, qT) * qk_scale - lse[None, :] * LOG2E), 0.0)
        dwT = tl.dot(vt, tl.trans(do))
        dsT = pT * (dwT * gate - delta[None, :])
        if UPCAST:
            dv += tl.dot(pT * gate, do)
            dk += tl.dot(dsT, tl.trans(qT))
        else:
            dv += tl.dot((pT * gate).to(do.dtype), do)
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
        du += tl.sum(tl.where(frac, dwT * pT, 0.0), 1)
        qT_ptr += BQ * sql
        do_ptr += BQ * sdl
        st_ptr += BQ
        sr_ptr += BQ
    return dk, dv, du


@triton.jit
def _sparsek_bwd_dkdv_kernel(
    Q, K, V, U, TAU, THU, THJ, IDX, CNT, OFF, KVLEN, DO, LSE, DELTA, DK, DV, DU, STAB, TOK,
    sqb, sqh, sql, skb, skh, skl, sdb, sdh, sdl,
    Lq, Lk, window, scale, nsb, cap, ntiles_a,
    HKV: tl.constexpr, G: tl.constexpr, BQ: tl.constexpr, NSUB: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PACKED: tl.constexpr,
):
    """One key tile of one super-block (``NSUB`` query blocks): dK, dV (fp32 ``[B, Hkv, Lk, D]``)
    and the gate part of d(scores) (``[B*Hkv, Lk]``), accumulated over the super-block, added once.

    Tiles ``< ntiles_a`` come from the super-block's list ``S_{I0}`` (``IDX``/``CNT``), the others
    from the contiguous range ``(c_{I0}, last position]``.
    """
    tile = tl.program_id(0)
    # super-block sb of row b (packed documents: the grid runs over a table of valid super-blocks)
    b, sb, rb, row0, lq, sslot = _row_item(tl.program_id(1), tl.program_id(2), STAB, TOK, KVLEN, Lq, nsb, HKV, PACKED)
    hk = rb % HKV
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    I0 = sb * (BQ * NSUB)
    last = tl.minimum(I0 + BQ * NSUB, lq) - 1
    d = tl.arange(0, BD)
    dm = d < D
    part_a = tile < ntiles_a
    if part_a:
        cnt = tl.load(CNT + sslot)
        t = tile * BN + tl.arange(0, BN)
        jm = t < cnt
        j = tl.load(IDX + sslot * cap + t, mask=jm, other=0)
        first = tl.full([], 0, tl.int32)  # list keys are candidates of every query: no block to skip
    else:
        lo = tl.maximum(off + I0 - window + 1, 0)
        hi = tl.minimum(off + last + 1, kvlen)
        j = lo + (tile - ntiles_a) * BN + tl.arange(0, BN)
        jm = j < hi
        # query blocks whose last position is before the tile's first key see none of it
        first = tl.maximum(lo + (tile - ntiles_a) * BN - off - I0 - BQ + 1, 0) // BQ
    if tl.max(jm.to(tl.int32), 0) > 0:
        kvm = jm[:, None] & dm[None, :]
        kb = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + row0 * skl
        vb = V + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + row0 * skl
        kt, vt, u = _load_keys(kb, vb, U + rb * Lk + row0, j, jm, skl, BD, D, UPCAST)
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BD], tl.float32)
        du = tl.zeros([BN], tl.float32)
        if part_a:
            dk, dv, du = _dkdv_loop(kt, vt, u, j, jm, dk, dv, du, first, Q, DO, TAU, THU, THJ, LSE, DELTA,
                                    b, hk, rb, row0, I0, off, kvlen, lq, Lq, window, scale,
                                    sqb, sqh, sql, sdb, sdh, sdl, G, BQ, NSUB, BM, D, BD, UPCAST, False)
        else:
            dk, dv, du = _dkdv_loop(kt, vt, u, j, jm, dk, dv, du, first, Q, DO, TAU, THU, THJ, LSE, DELTA,
                                    b, hk, rb, row0, I0, off, kvlen, lq, Lq, window, scale,
                                    sqb, sqh, sql, sdb, sdh, sdl, G, BQ, NSUB, BM, D, BD, UPCAST, True)
        dkv = (rb * Lk + row0 + j.to(tl.int64))[:, None] * D + d[None, :]
        tl.atomic_add(DV + dkv, dv, mask=kvm)
        tl.atomic_add(DK + dkv, dk * scale, mask=kvm)
        tl.atomic_add(DU + rb * Lk + row0 + j, du, mask=jm)
