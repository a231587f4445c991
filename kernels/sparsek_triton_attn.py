"""SparseK attention forward kernel (SPEC 1.4) over per-block gathered key lists.

One program owns one query block of one KV head and *all* ``G`` query heads of its group: its
``BM`` rows are ``(g, i)`` pairs, row ``r`` -> head ``g = r // BQ``, query ``i0 + r % BQ`` with
``BQ = BM // G`` (any G from 1 to 16; the ``BM - G*BQ`` leftover rows are masked, nothing is
padded to 16 heads). The group shares the selection, so every K/V tile it loads serves all heads.

Keys a block visits (see :mod:`sparsek_triton_select`):

* part A: the compacted list ``S_{i0}`` (gathered loads), each key tested against the row's
  ``theta_i`` (is it in ``S_i``?) and gated by ``clip(u_j - tau_i, 0, 1)``;
* part B: the contiguous range ``(c_{i0}, pos_last]``: window keys (gate 1) and the candidates
  that enter inside the block (same test as part A).

The softmax is over the visible keys, gates multiply the values only (SPEC 1.4). Math in fp32;
fp16/bf16 operands go to the matrix units as they are, fp32 inputs are upcast everywhere.

The backward (dQ; dK/dV/d(scores)) is in :mod:`sparsek_triton_bwd`; ``_visibility`` is shared.

Rows (``_row_item``): padded batches run a ``(block, b * Hkv + hk)`` grid; packed documents
(``PACKED``) a ``(valid block of any document, hk)`` grid from a table, every tensor addressed
through the document's first token ``row0`` (batch strides 0, per-token arrays ``[Hkv or H, T]``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sparsek_triton_select import _row_item


@triton.jit
def _visibility(j, u, pos, tau, thu, thj, q_ok, jm, window, WINDOW_PART: tl.constexpr):
    """Visible mask, gate, and 'fractional selected candidate' mask for a [BM, BN] tile."""
    sel = (u[None, :] > thu[:, None]) | ((u[None, :] == thu[:, None]) & (j[None, :] >= thj[:, None]))
    gate = tl.minimum(tl.maximum(u[None, :] - tau[:, None], 0.0), 1.0)
    if WINDOW_PART:
        win = (j[None, :] > pos[:, None] - window) & (j[None, :] <= pos[:, None])
        cand = (j[None, :] <= pos[:, None] - window) & sel
        vis = (win | cand) & jm[None, :] & q_ok[:, None]
        gate = tl.where(win, 1.0, gate)
    else:
        cand = sel
        vis = sel & jm[None, :] & q_ok[:, None]
    frac = vis & cand & (gate > 0.0) & (gate < 1.0)
    return vis, gate, frac


@triton.jit
def _load_keys(kb, vb, ub, j, jm, skl, BD: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """K, V tiles ``[BN, BD]`` (upcast when ``UPCAST``) and scores ``[BN]`` of keys ``j`` (mask ``jm``)."""
    d = tl.arange(0, BD)
    kvm = jm[:, None] & (d < D)[None, :]
    kv_off = j.to(tl.int64)[:, None] * skl + d[None, :]
    kt = tl.load(kb + kv_off, mask=kvm, other=0.0)
    vt = tl.load(vb + kv_off, mask=kvm, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    u = tl.load(ub + j, mask=jm, other=0.0)
    return kt, vt, u


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k, v, vis, gate, qk_scale, UPCAST: tl.constexpr):
    """One online-softmax step in base 2 (``qk_scale = scale * log2(e)``, ``m_i`` in log2 units):
    ``exp2`` is the hardware instruction, ``exp`` costs an extra multiply per element."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    pg = p * gate
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(pg, v)
    else:
        acc = acc * alpha[:, None] + tl.dot(pg.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _sparsek_fwd_kernel(
    Q, K, V, U, TAU, THU, THJ, IDX, CNT, OFF, KVLEN, OUT, LSE, BTAB, TOK,
    sqb, sqh, sql, skb, skh, skl, sob, soh, sol,
    Lq, Lk, window, scale, nblocks, cap,
    HKV: tl.constexpr, G: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PACKED: tl.constexpr,
):
    b, blk, rb, row0, lq, slot = _row_item(tl.program_id(0), tl.program_id(1), BTAB, TOK, KVLEN, Lq, nblocks,
                                         HKV, PACKED)
    hk = rb % HKV
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    r = tl.arange(0, BM)
    g = r // BQ
    qi = blk * BQ + r % BQ
    row_ok = (r < G * BQ) & (qi < lq)
    pos = off + qi
    q_ok = row_ok & (pos >= 0) & (pos < kvlen)
    h = hk * G + g
    d = tl.arange(0, BD)
    dm = d < D
    qptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + (row0 + qi.to(tl.int64))[:, None] * sql + d[None, :]
    q = tl.load(qptr, mask=row_ok[:, None] & dm[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    so = rb * Lq + row0 + qi
    tau = tl.load(TAU + so, mask=row_ok, other=0.0)
    thu = tl.load(THU + so, mask=row_ok, other=0.0)
    thj = tl.load(THJ + so, mask=row_ok, other=0)
    kb = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + row0 * skl
    vb = V + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + row0 * skl
    ub = U + rb * Lk + row0

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    qk_scale = scale * LOG2E

    # part A: the gathered selection of the block's first query
    cnt = tl.load(CNT + slot)
    ib = IDX + slot * cap
    for t0 in range(0, cnt, BN):
        t = t0 + tl.arange(0, BN)
        jm = t < cnt
        j = tl.load(ib + t, mask=jm, other=0)
        kt, vt, u = _load_keys(kb, vb, ub, j, jm, skl, BD, D, UPCAST)
        vis, gate, _fr = _visibility(j, u, pos, tau, thu, thj, q_ok, jm, window, False)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kt, vt, vis, gate, qk_scale, UPCAST)

    # part B: contiguous range after the first query's candidates (window + entering keys)
    i_last = tl.minimum(blk * BQ + BQ, lq) - 1
    lo = tl.maximum(off + blk * BQ - window + 1, 0)
    hi = tl.minimum(off + i_last + 1, kvlen)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        jm = j < hi
        kt, vt, u = _load_keys(kb, vb, ub, j, jm, skl, BD, D, UPCAST)
        vis, gate, _fr = _visibility(j, u, pos, tau, thu, thj, q_ok, jm, window, True)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kt, vt, vis, gate, qk_scale, UPCAST)

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out = tl.where(has[:, None], out, 0.0)
    optr = OUT + b.to(tl.int64) * sob + h.to(tl.int64)[:, None] * soh + (row0 + qi.to(tl.int64))[:, None] * sol + d[None, :]
    tl.store(optr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dm[None, :])
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, 0.0)  # natural log, as the reference
    tl.store(LSE + (rb * G + g) * Lq + row0 + qi, lse, mask=row_ok)
