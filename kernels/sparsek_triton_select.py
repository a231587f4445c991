"""SparseK selection on the GPU (SPEC 1.2-1.3): per-query thresholds and per-block key lists.

For every query ``i`` (per batch row and KV head) the candidates are the prefix
``C_i = [0, c_i]`` with ``c_i = pos_i - window``. Two numbers describe everything the attention
needs about ``C_i``:

* ``tau_i``: the SPARSEK threshold (gate of a selected key ``j`` is ``clip(u_j - tau_i, 0, 1)``);
* ``theta_i = (theta_u, theta_j)``: the k-th largest ``(u, j)`` pair in lexicographic order, so
  that ``j in S_i`` iff ``u_j > theta_u or (u_j == theta_u and j >= theta_j)``; this encodes
  the top-k with ties broken toward the larger (newer) ``j`` without materialising ``S_i``.

Both are found by bisection on the *ordered integer image* of float32 (a monotone bijection), so
32 halvings always reach adjacent floats: ``theta_u`` comes out as exactly the k-th largest
value, and ``tau`` is then made exact by the closed-form step of :mod:`sparsek_projection`.
A program handles a tile of queries and streams the prefix once per halving; all queries of the
tile share those loads.

Why a per-block list: ``C_i`` only grows with ``i``, so a key of the common prefix
``C_{i0}`` of a query block that is selected by any query ``i >= i0`` is already in ``S_{i0}``
(a subset cannot rank it lower). A block of queries therefore works on ``S_{i0}`` (at most ``k``
keys, compacted here in increasing ``j``) plus the contiguous range ``(c_{i0}, pos_last]``,
which holds the window and the few candidates that enter inside the block.
"""

from __future__ import annotations

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
def _select_kernel(
    U, OFF, KVLEN, TAU, THU, THJ, NFRAC,
    Lq, Lk, topk, window,
    BQ: tl.constexpr, BN: tl.constexpr, HKV: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    qi = pid * BQ + tl.arange(0, BQ)
    qmask = qi < Lq
    pos = off + qi
    # number of candidates (computed for every query, valid or not: block lists need it)
    n = tl.minimum(tl.maximum(pos - window + 1, 0), kvlen)
    n = tl.where(qmask, n, 0)
    nmax = tl.max(n, 0)
    ub = U + bh.to(tl.int64) * Lk
    big = n > topk
    kf = topk * 1.0

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
        tt = _from_key(mid_t)
        tc = _from_key(mid_c)
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
    thu = _from_key(lo_c)

    # closed-form step at tau0, and the tie statistics of theta
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
        s_fr += tl.sum(tl.where(fr, u[None, :], 0.0), 1)
        above += tl.sum((inp & (u[None, :] > thu[:, None])).to(tl.int32), 1)
        ties += tl.sum((inp & (u[None, :] == thu[:, None])).to(tl.int32), 1)
    tau = tl.where(n_fr > 0, (n_one + s_fr - kf) / tl.maximum(n_fr, 1.0), tau0)
    tau = tl.where(big, tau, float("-inf"))
    thu = tl.where(big, thu, float("-inf"))

    # number of fractional candidates at the final tau (the backward's |F_i|)
    nf = tl.zeros([BQ], tl.int32)
    for j0 in range(0, nmax, BN):
        j = j0 + tl.arange(0, BN)
        u = tl.load(ub + j, mask=j < nmax, other=0.0)
        inp = j[None, :] < n[:, None]
        dlt = u[None, :] - tau[:, None]
        nf += tl.sum((inp & (dlt > 0.0) & (dlt < 1.0)).to(tl.int32), 1)

    # ties at theta_u: keep the `need` newest; theta_j = largest t with #{ties, j >= t} >= need
    need = topk - above
    tie_rows = big & (ties > need)
    thj = tl.zeros([BQ], tl.int32)
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
                hit = inp & (u[None, :] == thu[:, None]) & (j[None, :] >= mid_j[:, None])
                cnt += tl.sum(hit.to(tl.int32), 1)
            ok = cnt >= need
            lo_j = tl.where(ok, mid_j, lo_j)
            hi_j = tl.where(ok, hi_j, mid_j)
        thj = tl.where(tie_rows, lo_j, 0)

    o = bh.to(tl.int64) * Lq + qi
    tl.store(TAU + o, tau, mask=qmask)
    tl.store(THU + o, thu, mask=qmask)
    tl.store(THJ + o, thj, mask=qmask)
    tl.store(NFRAC + o, tl.where(big, nf, 0), mask=qmask)


@triton.jit
def _block_list_kernel(
    U, OFF, KVLEN, THU, THJ, IDX, CNT,
    Lq, Lk, window, nblocks, cap,
    BQ: tl.constexpr, BN: tl.constexpr, HKV: tl.constexpr,
):
    """Compact ``S_{i0}`` (first query of each block) into ``IDX[bh, blk, :CNT]``, sorted by j."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    off = tl.load(OFF + b)
    kvlen = tl.load(KVLEN + b)
    i0 = blk * BQ
    n0 = tl.minimum(tl.maximum(off + i0 - window + 1, 0), kvlen)
    thu = tl.load(THU + bh.to(tl.int64) * Lq + i0)
    thj = tl.load(THJ + bh.to(tl.int64) * Lq + i0)
    ub = U + bh.to(tl.int64) * Lk
    out = IDX + (bh.to(tl.int64) * nblocks + blk) * cap
    cnt = 0
    for j0 in range(0, n0, BN):
        j = j0 + tl.arange(0, BN)
        m = j < n0
        u = tl.load(ub + j, mask=m, other=0.0)
        sel = m & ((u > thu) | ((u == thu) & (j >= thj)))
        si = sel.to(tl.int32)
        slot = cnt + tl.cumsum(si, 0) - 1
        tl.store(out + slot, j, mask=sel)
        cnt += tl.sum(si, 0)
    tl.store(CNT + bh * nblocks + blk, cnt)


def sparsek_thresholds(
    u: torch.Tensor, offsets: torch.Tensor, kv_len: torch.Tensor, lq: int, topk: int, window: int,
    hkv: int, block_q: int = 32, block_n: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query ``tau``, ``theta_u``, ``theta_j`` and ``|F|`` for ``u`` ``[B*Hkv, Lk]`` float32.

    ``tau`` is made monotone along the queries with a running maximum (it is in exact arithmetic,
    SPEC 1.3); forward and backward both use that same monotone value.
    """
    bh, lk = u.shape
    shape = (bh, lq)
    tau = torch.empty(shape, device=u.device, dtype=torch.float32)
    thu = torch.empty_like(tau)
    thj = torch.empty(shape, device=u.device, dtype=torch.int32)
    nfrac = torch.empty_like(thj)
    grid = (triton.cdiv(lq, block_q), bh)
    _select_kernel[grid](u, offsets, kv_len, tau, thu, thj, nfrac, lq, lk, topk, window,
                         BQ=block_q, BN=block_n, HKV=hkv)
    tau = torch.cummax(tau, dim=1).values
    return tau, thu, thj, nfrac


def sparsek_block_lists(
    u: torch.Tensor, offsets: torch.Tensor, kv_len: torch.Tensor, thu: torch.Tensor, thj: torch.Tensor,
    lq: int, topk: int, window: int, hkv: int, block_q: int, block_n: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected keys of each query block's first query: ``idx [BH, nblocks, cap]``, ``cnt [BH, nblocks]``."""
    bh, lk = u.shape
    nblocks = triton.cdiv(lq, block_q)
    cap = max(1, min(topk, lk))
    idx = torch.empty((bh, nblocks, cap), device=u.device, dtype=torch.int32)
    cnt = torch.empty((bh, nblocks), device=u.device, dtype=torch.int32)
    _block_list_kernel[(nblocks, bh)](u, offsets, kv_len, thu, thj, idx, cnt, lq, lk, window, nblocks, cap,
                                       BQ=block_q, BN=block_n, HKV=hkv)
    return idx, cnt
