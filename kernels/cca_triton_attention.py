"""CCA attention (SPEC 2.2-2.3) as Triton kernels: forward, and backward with gradients to
``q``, ``k``, ``v``, ``k_core`` and ``v_core``.

Layout of the work. A program owns one KV head and a block of ``BLOCK_M`` *packed rows*: ``QPB =
BLOCK_M // G`` consecutive query positions times the ``G`` query heads of that KV head (row ``r``
is position ``r // G``, head ``r % G``). Every K/V tile is loaded once and used by all G heads
(the shared K/V tile of GQA), and ``G`` is never padded to 16: for G = 3 and ``BLOCK_M = 64``
the block holds 21 positions and one idle row. A narrow block of positions also keeps the raw
window of the block tight (``s + g + QPB`` keys instead of ``s + g + BLOCK_M``).

Query ``i`` sits at position ``pos = q_offsets[b] + i`` and sees cores ``n < min(P(pos), N)`` and
raw keys ``P(pos) * g <= j <= pos`` with ``P(pos) = floor(max(pos + 1 - s, 0) / g)`` (true floor:
every division here is of non-negative integers). Each program walks the cores, then the raw
keys, with one online softmax; per tile a scalar test decides whether the tile is visible to
every row of the block, and only boundary tiles pay for the element-wise mask.

Backward (flash-attention 2 style, no atomics, deterministic):
* ``_dq_kernel``: per packed-row block, recomputes probabilities from the saved log-sum-exp,
  writes ``dq`` and ``delta = rowsum(o * do)``.
* ``_dkdv_kernel``: per tile of raw keys (``IS_CORE=False``) or of cores (``IS_CORE=True``), walks
  the packed-row blocks of the queries that can see the tile. Raw keys are seen by about
  ``s + g`` queries; core ``n`` by every query from position ``(n + 1) g + s - 1`` on, so core
  programs are long. They are launched heaviest first.

Rows that are out of range (past ``Lq``, idle packed rows, positions outside ``[0, seqlens[b])``)
load zero queries/gradients and an infinite log-sum-exp, so they contribute exactly nothing in
unmasked tiles. Everything accumulates in float32; ``tl.dot`` takes the input dtype (bf16/fp16
tensor cores) with float32 accumulation, the probabilities are rounded to the input dtype before
the value product, as in flash-attention.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .cca_reference import cca_core_queries, check_packed_cores
from .sparsek_reference import packed_bounds
from .triton_options import dot_options

_LOG2E = 1.4426950408889634


@triton.jit
def _n_cores(pos, window, group):
    """``P(pos)``: cores visible at ``pos`` (0 while ``pos + 1 <= window``; pos may be negative)."""
    return tl.maximum(pos + 1 - window, 0) // group


@triton.jit
def _row_layout(b, kv_len, TOK, CST, Lq, Lk, N, group, PACKED: tl.constexpr):
    """Where row ``b`` lives: ``(t0, c0, lq, lk, n_cores, sb)``.

    Padded batches: row ``b`` is batch row ``b`` (``t0 = c0 = 0``, the batch strides address it,
    ``sb = b`` for the ``[B, H, Lq]`` side arrays). Packed documents: row ``b`` is document ``b``,
    its tokens start at ``t0`` of the token axis and its cores at ``c0`` of the core axis (the
    batch strides are 0 and the side arrays are ``[H, T]``, ``sb = 0``); queries == keys ==
    ``kv_len`` and it has ``kv_len // group`` cores.
    """
    if PACKED:
        t0 = tl.load(TOK + b)
        c0 = tl.load(CST + b)
        lq = kv_len
        lk = kv_len
        n_cores = kv_len // group
        sb = 0
    else:
        t0 = 0
        c0 = 0
        lq = Lq
        lk = Lk
        n_cores = N
        sb = b
    return t0, c0, lq, lk, n_cores, sb


@triton.jit
def _softmax_step(acc, m_i, l_i, qk, v):
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, KC, VC, OUT, LSE, SEQ, OFF, TOK, CST,
    sqb, sqh, sqm, skb, skh, skm, scb, sch, scm,
    Lq, Lk, N, group, window, qk_scale,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_OFF: tl.constexpr,
    PACKED: tl.constexpr,
):
    QPB: tl.constexpr = BLOCK_M // G
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # late blocks see the most cores: start them first
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    if HAS_SEQ:
        kv_len = tl.load(SEQ + b)
    else:
        kv_len = Lk
    if HAS_OFF:
        off = tl.load(OFF + b)
    else:
        off = Lk - Lq
    t0, c0, lq, lk, n_cores, sb = _row_layout(b, kv_len, TOK, CST, Lq, Lk, N, group, PACKED)
    q0 = pid_m * QPB
    r = tl.arange(0, BLOCK_M)
    pl = r // G
    hd = r % G
    iq = q0 + pl
    pos = off + iq
    in_rows = (pl < QPB) & (iq < lq)
    ok = in_rows & (pos >= 0) & (pos < kv_len)
    p_row = _n_cores(pos, window, group)
    core_hi = tl.where(ok, tl.minimum(p_row, n_cores), 0)  # cores n < core_hi
    raw_lo = p_row * group
    raw_hi = tl.where(ok, pos, -1)  # raw keys raw_lo <= j <= raw_hi
    # Positions of the block's valid rows lie in [pmin, pmax] (empty when pmax < pmin).
    pmin = tl.maximum(off + q0, 0)
    pmax = tl.minimum(off + tl.minimum(q0 + QPB, lq) - 1, kv_len - 1)
    nonempty = pmax >= pmin

    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    head = (hk * G + hd).to(tl.int64)
    row_off = b.to(tl.int64) * sqb + head * sqh + (t0 + iq) * sqm
    q = tl.load(Q + row_off[:, None] + offs_d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)

    # Cores: [0, c_all) are visible to every row, [c_all, c_end) to some.
    c_all = tl.minimum(_n_cores(pmin, window, group), n_cores)
    c_end = tl.where(nonempty, tl.minimum(_n_cores(pmax, window, group), n_cores), 0)
    kc_base = KC + b.to(tl.int64) * scb + hk * sch + c0 * scm
    vc_base = VC + b.to(tl.int64) * scb + hk * sch + c0 * scm
    for start in range(0, c_end, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols < n_cores)[:, None] & dmask[None, :]
        k = tl.load(kc_base + cols[:, None] * scm + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vc_base + cols[:, None] * scm + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if start + BLOCK_N > c_all:
            qk = tl.where(cols[None, :] < core_hi[:, None], qk, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v)

    # Raw keys: [r_start, pmax]; keys in [full_lo, pmin] are visible to every row.
    r_start = _n_cores(pmin, window, group) * group
    r_end = tl.where(nonempty, pmax + 1, r_start)
    full_lo = _n_cores(pmax, window, group) * group
    k_base = K + b.to(tl.int64) * skb + hk * skh + t0 * skm
    v_base = V + b.to(tl.int64) * skb + hk * skh + t0 * skm
    for start in range(r_start, r_end, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols < lk)[:, None] & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * skm + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * skm + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if (start < full_lo) | (start + BLOCK_N > pmin + 1):
            vis = (cols[None, :] >= raw_lo[:, None]) & (cols[None, :] <= raw_hi[:, None])
            qk = tl.where(vis, qk, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = tl.where(ok[:, None], acc / l_safe[:, None], 0.0)
    tl.store(OUT + row_off[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=in_rows[:, None] & dmask[None, :])
    lse = tl.where(ok, m_i + tl.log2(l_safe), float("inf"))
    lse_off = (sb * H + hk * G + hd).to(tl.int64) * Lq + t0 + iq
    tl.store(LSE + lse_off, lse, mask=in_rows)


@triton.jit
def _dq_kernel(
    Q, K, V, KC, VC, OUT, DO, DQ, LSE, DELTA, SEQ, OFF, TOK, CST,
    sqb, sqh, sqm, skb, skh, skm, scb, sch, scm,
    Lq, Lk, N, group, window, qk_scale, sm_scale,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_OFF: tl.constexpr,
    PACKED: tl.constexpr,
):
    QPB: tl.constexpr = BLOCK_M // G
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    if HAS_SEQ:
        kv_len = tl.load(SEQ + b)
    else:
        kv_len = Lk
    if HAS_OFF:
        off = tl.load(OFF + b)
    else:
        off = Lk - Lq
    t0, c0, lq, lk, n_cores, sb = _row_layout(b, kv_len, TOK, CST, Lq, Lk, N, group, PACKED)
    q0 = pid_m * QPB
    r = tl.arange(0, BLOCK_M)
    pl = r // G
    hd = r % G
    iq = q0 + pl
    pos = off + iq
    in_rows = (pl < QPB) & (iq < lq)
    ok = in_rows & (pos >= 0) & (pos < kv_len)
    p_row = _n_cores(pos, window, group)
    core_hi = tl.where(ok, tl.minimum(p_row, n_cores), 0)
    raw_lo = p_row * group
    raw_hi = tl.where(ok, pos, -1)
    pmin = tl.maximum(off + q0, 0)
    pmax = tl.minimum(off + tl.minimum(q0 + QPB, lq) - 1, kv_len - 1)
    nonempty = pmax >= pmin

    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    head = (hk * G + hd).to(tl.int64)
    row_off = b.to(tl.int64) * sqb + head * sqh + (t0 + iq) * sqm
    ld_mask = ok[:, None] & dmask[None, :]
    q = tl.load(Q + row_off[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + row_off[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
    o = tl.load(OUT + row_off[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse_off = (sb * H + hk * G + hd).to(tl.int64) * Lq + t0 + iq
    tl.store(DELTA + lse_off, delta, mask=in_rows)
    lse = tl.load(LSE + lse_off, mask=ok, other=float("inf"))
    dq = tl.zeros([BLOCK_M, DP], dtype=tl.float32)

    c_all = tl.minimum(_n_cores(pmin, window, group), n_cores)
    c_end = tl.where(nonempty, tl.minimum(_n_cores(pmax, window, group), n_cores), 0)
    kc_base = KC + b.to(tl.int64) * scb + hk * sch + c0 * scm
    vc_base = VC + b.to(tl.int64) * scb + hk * sch + c0 * scm
    for start in range(0, c_end, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols < n_cores)[:, None] & dmask[None, :]
        k = tl.load(kc_base + cols[:, None] * scm + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vc_base + cols[:, None] * scm + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if start + BLOCK_N > c_all:
            p = tl.where(cols[None, :] < core_hi[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    r_start = _n_cores(pmin, window, group) * group
    r_end = tl.where(nonempty, pmax + 1, r_start)
    full_lo = _n_cores(pmax, window, group) * group
    k_base = K + b.to(tl.int64) * skb + hk * skh + t0 * skm
    v_base = V + b.to(tl.int64) * skb + hk * skh + t0 * skm
    for start in range(r_start, r_end, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols < lk)[:, None] & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * skm + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * skm + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if (start < full_lo) | (start + BLOCK_N > pmin + 1):
            vis = (cols[None, :] >= raw_lo[:, None]) & (cols[None, :] <= raw_hi[:, None])
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    dq = dq * sm_scale
    tl.store(DQ + row_off[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=in_rows[:, None] & dmask[None, :])


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SEQ, OFF, TOK, CST,
    sqb, sqh, sqm, skb, skh, skm,
    Lq, Lk, NK, group, window, qk_scale, sm_scale,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_OFF: tl.constexpr,
    IS_CORE: tl.constexpr, PACKED: tl.constexpr,
):
    """``K``/``V``/``DK``/``DV`` are the raw keys (``NK = Lk`` rows) or the cores (``NK = N``)."""
    QPB: tl.constexpr = BLOCK_M // G
    n0 = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    if HAS_SEQ:
        kv_len = tl.load(SEQ + b)
    else:
        kv_len = Lk
    if HAS_OFF:
        off = tl.load(OFF + b)
    else:
        off = Lk - Lq
    t0, c0, lq, lk, n_cores, sb = _row_layout(b, kv_len, TOK, CST, Lq, Lk, NK, group, PACKED)
    if IS_CORE:
        kt0 = c0
        nk = n_cores
    else:
        kt0 = t0
        nk = lk

    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    cols = n0 + tl.arange(0, BLOCK_N)
    kv_mask = (cols < nk)[:, None] & dmask[None, :]
    kv_off = b.to(tl.int64) * skb + hk * skh + (kt0 + cols[:, None]) * skm + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)

    # Positions that can see some key of the tile.
    if IS_CORE:
        pos_first = (n0 + 1) * group + window - 1
        pos_last = kv_len - 1
    else:
        pos_first = n0
        j_last = tl.maximum(tl.minimum(n0 + BLOCK_N, kv_len) - 1, 0)
        pos_last = tl.minimum((j_last // group + 1) * group + window - 2, kv_len - 1)
    iq_lo = tl.maximum(pos_first - off, 0)
    iq_hi = tl.minimum(pos_last - off + 1, lq)

    r = tl.arange(0, BLOCK_M)
    pl = r // G
    hd = r % G
    head_off = b.to(tl.int64) * sqb + (hk * G + hd).to(tl.int64) * sqh + t0 * sqm
    lse_base = (sb * H + hk * G + hd).to(tl.int64) * Lq + t0
    dk = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    for iq0 in range(iq_lo, iq_hi, QPB):
        iq = iq0 + pl
        rmask = (pl < QPB) & (iq < iq_hi)
        row_ptr = head_off + iq * sqm
        ld_mask = rmask[:, None] & dmask[None, :]
        q = tl.load(Q + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
        do = tl.load(DO + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
        lse = tl.load(LSE + lse_base + iq, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + lse_base + iq, mask=rmask, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        pa = off + iq0
        pos = off + iq
        if IS_CORE:
            if _n_cores(pa, window, group) < n0 + BLOCK_N:
                p_t = tl.where(cols[:, None] < _n_cores(pos, window, group)[None, :], p_t, 0.0)
        else:
            if (pa < n0 + BLOCK_N - 1) | (_n_cores(pa + QPB - 1, window, group) * group > n0):
                vis = (cols[:, None] >= (_n_cores(pos, window, group) * group)[None, :]) & (cols[:, None] <= pos[None, :])
                p_t = tl.where(vis, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


# Block shapes: (BLOCK_M packed rows, BLOCK_N keys, num_warps, num_stages) per kernel.
# The interpreter (CPU) gets tiny blocks so tests cover many tiles and boundaries.
_INTERPRETER_CONFIG = {"fwd": (16, 16, 4, 1), "dq": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dkdv_split": (16, 16, 4, 1)}
_CONFIG_OVERRIDE: dict[str, tuple[int, int, int, int]] = {}

# Which dK/dV backward runs (module-level switch, env ``SPARSEK_CCA_DKDV`` at import):
# "split": ``cca_triton_backward`` (one launch, core tiles heaviest-first across heads, long core
#          query ranges cut into NSPLIT pieces summed in a fixed order, raw tiles as fillers);
# "tiles": the first version, ``_dkdv_kernel`` per key tile, cores then raw keys.
DKDV_IMPL = os.environ.get("SPARSEK_CCA_DKDV", "split")
# Options of the "split" path: nsplit None = chosen from the shape (choose_nsplit); fuse = core
# and raw work in one launch; two_pass = dV then dK with one accumulator live (5 products).
SPLIT_OPTIONS: dict = {"nsplit": None, "fuse": True, "two_pass": False}


def _config(kernel: str, d: int, device: torch.device) -> tuple[int, int, int, int]:
    if kernel in _CONFIG_OVERRIDE:
        return _CONFIG_OVERRIDE[kernel]
    if device.type != "cuda":
        return _INTERPRETER_CONFIG[kernel]
    if d <= 64:
        return {"fwd": (128, 64, 4, 3), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dkdv_split": (64, 64, 4, 2)}[kernel]
    if d <= 128:
        # dkdv with 128-key tiles: 134 ms vs 172 ms fwd+bwd at 128K on the H100 (docs/kernels_cca.md)
        return {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (64, 128, 8, 2), "dkdv_split": (64, 128, 8, 2)}[kernel]
    return {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 1), "dkdv": (32, 32, 8, 1), "dkdv_split": (32, 32, 8, 1)}[kernel]


def _rows_per_block(block_m: int, g: int) -> int:
    """Packed rows must hold at least one position of every head of the group."""
    return max(block_m, triton.next_power_of_2(g))


class PackedRows:
    """Packed documents as kernel rows: empty documents dropped, one small int32 table on the device.

    ``tok[r]``, ``length[r]``, ``core[r]``: first token, length and first core (in the packed core
    axis, ``length // group`` cores per document) of row ``r``. Built from the host copy of
    ``cu_seqlens`` (grids are sized by the longest document).
    """

    def __init__(self, bounds: list[int], group: int, device: torch.device):
        tok, length, core = [], [], []
        n_core = 0
        for a, e in zip(bounds, bounds[1:], strict=False):
            if e > a:
                tok.append(a)
                length.append(e - a)
                core.append(n_core)
            n_core += (e - a) // group
        table = torch.tensor([tok, length, core], dtype=torch.int32).to(device)
        self.tok, self.length, self.core = table[0], table[1], table[2]
        self.rows = len(tok)
        self.total = bounds[-1]
        self.total_cores = n_core
        self.max_len = max(length, default=0)
        self.max_cores = self.max_len // group


def _layout_args(q, k, k_core, seq, offs, packed: PackedRows | None):
    """Kernel arguments describing the rows: ``(batch rows, Lq for the grid, SEQ, OFF, TOK, CST,
    has_seq, has_off, batch strides of q, k, cores)``. Packed: the batch strides are 0 and the
    documents' own starts and lengths address the tokens (``_row_layout``)."""
    b, lq = q.shape[0], q.shape[2]
    if packed is None:
        return (b, lq, seq, offs, None, None, seq is not None, offs is not None,
                q.stride(0), k.stride(0), k_core.stride(0))
    return (packed.rows, packed.max_len, packed.length, None, packed.tok, packed.core, True, False, 0, 0, 0)


class _CCAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_core, v_core, group, window, scale, seqlens, q_offsets, packed):
        b, h, lq, d = q.shape
        hkv, lk, n = k.shape[1], k.shape[2], k_core.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        k_core, v_core = k_core.contiguous(), v_core.contiguous()
        seq = None if seqlens is None else seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        offs = None if q_offsets is None else q_offsets.to(device=q.device, dtype=torch.int32).contiguous()
        o = torch.empty_like(q)
        lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
        g = h // hkv
        dp = max(16, triton.next_power_of_2(d))
        bm, bn, warps, stages = _config("fwd", d, q.device)
        bm = _rows_per_block(bm, g)
        rows, lq_grid, seq_a, off_a, tok_a, cst_a, has_seq, has_off, sqb, skb, scb = _layout_args(
            q, k, k_core, seq, offs, packed)
        if lq_grid > 0 and rows * hkv > 0:
            grid = (triton.cdiv(lq_grid, bm // g), rows * hkv)
            _fwd_kernel[grid](
                q, k, v, k_core, v_core, o, lse, *(t if t is not None else lse for t in (seq_a, off_a, tok_a, cst_a)),
                sqb, q.stride(1), q.stride(2), skb, k.stride(1), k.stride(2),
                scb, k_core.stride(1), k_core.stride(2),
                lq, lk, n, group, window, scale * _LOG2E,
                H=h, HKV=hkv, G=g, D=d, DP=dp, BLOCK_M=bm, BLOCK_N=bn,
                HAS_SEQ=has_seq, HAS_OFF=has_off, PACKED=packed is not None, num_warps=warps, num_stages=stages,
                **dot_options(q.dtype),
            )
        ctx.save_for_backward(q, k, v, k_core, v_core, o, lse, seq, offs)
        ctx.group, ctx.window, ctx.scale, ctx.packed = group, window, scale, packed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, k_core, v_core, o, lse, seq, offs = ctx.saved_tensors
        group, window, scale, packed = ctx.group, ctx.window, ctx.scale, ctx.packed
        b, h, lq, d = q.shape
        hkv, lk, n = k.shape[1], k.shape[2], k_core.shape[2]
        g = h // hkv
        dp = max(16, triton.next_power_of_2(d))
        do = do.contiguous()
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dkc = torch.empty_like(k_core)
        dvc = torch.empty_like(v_core)
        delta = torch.empty_like(lse)
        rows, lq_grid, seq_a, off_a, tok_a, cst_a, has_seq, has_off, sqb, skb, scb = _layout_args(
            q, k, k_core, seq, offs, packed)
        common = dict(H=h, HKV=hkv, G=g, D=d, DP=dp, HAS_SEQ=has_seq, HAS_OFF=has_off, PACKED=packed is not None)
        layout = tuple(t if t is not None else lse for t in (seq_a, off_a, tok_a, cst_a))
        grads = (dq, dk, dv, dkc, dvc, None, None, None, None, None, None)
        if lq_grid > 0 and rows * hkv > 0:
            bm, bn, warps, stages = _config("dq", d, q.device)
            bm = _rows_per_block(bm, g)
            _dq_kernel[(triton.cdiv(lq_grid, bm // g), rows * hkv)](
                q, k, v, k_core, v_core, o, do, dq, lse, delta, *layout,
                sqb, q.stride(1), q.stride(2), skb, k.stride(1), k.stride(2),
                scb, k_core.stride(1), k_core.stride(2),
                lq, lk, n, group, window, scale * _LOG2E, scale,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common, **dot_options(q.dtype),
            )
            if DKDV_IMPL == "split":
                _split_backward(q, k, v, k_core, v_core, do, lse, delta, dk, dv, dkc, dvc, seq, offs, group, window,
                                scale, packed)
                return grads
            if DKDV_IMPL != "tiles":
                raise ValueError(f"DKDV_IMPL must be 'split' or 'tiles', got {DKDV_IMPL!r}")
            bm, bn, warps, stages = _config("dkdv", d, q.device)
            bm = _rows_per_block(bm, g)
            n_grid = n if packed is None else packed.max_cores
            lk_grid = lk if packed is None else packed.max_len
            for kk, vv, dkk, dvv, nk, nk_grid, is_core in (
                (k_core, v_core, dkc, dvc, n, n_grid, True), (k, v, dk, dv, lk, lk_grid, False)
            ):
                if nk_grid == 0:
                    continue
                _dkdv_kernel[(triton.cdiv(nk_grid, bn), rows * hkv)](
                    q, kk, vv, do, lse, delta, dkk, dvv, *layout,
                    sqb, q.stride(1), q.stride(2), scb if is_core else skb, kk.stride(1), kk.stride(2),
                    lq, lk, nk, group, window, scale * _LOG2E, scale,
                    BLOCK_M=bm, BLOCK_N=bn, IS_CORE=is_core, num_warps=warps, num_stages=stages, **common,
                    **dot_options(q.dtype),
                )
        else:
            for t in (dq, dk, dv, dkc, dvc):
                t.zero_()
        return grads


def _split_backward(q, k, v, k_core, v_core, do, lse, delta, dk, dv, dkc, dvc, seq, offs, group, window, scale,
                    packed=None):
    from .cca_triton_backward import choose_nsplit, dkdv_split

    b, h, lq, d = q.shape
    hkv, lk, n = k.shape[1], k.shape[2], k_core.shape[2]
    g = h // hkv
    bm, bn, warps, stages = _config("dkdv_split", d, q.device)
    bm = _rows_per_block(bm, g)
    nsplit = SPLIT_OPTIONS.get("nsplit")
    if nsplit is None:
        slots = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 4
        if packed is None:
            nsplit = choose_nsplit(lq, n, lk, group, window, bm // g, bn, b * hkv, slots)
        else:  # estimate from the longest document (choose_nsplit only cuts work)
            nsplit = choose_nsplit(packed.max_len, packed.max_cores, packed.max_len, group, window, bm // g, bn,
                                   packed.rows * hkv, slots)
    dkdv_split(
        q, k, v, k_core, v_core, do, lse, delta, dk, dv, dkc, dvc, seq, offs, group, window, scale, _LOG2E,
        bm, bn, warps, stages, int(nsplit), two_pass=bool(SPLIT_OPTIONS.get("two_pass", False)),
        fuse=bool(SPLIT_OPTIONS.get("fuse", True)), packed=packed,
    )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, window: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,H,Lq,d] and k, v [B,Hkv,Lk,d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} (H must be a multiple of Hkv)")
    if group < 1 or window < 1:
        raise ValueError(f"group and window must be >= 1, got group={group}, window={window}")


def cca_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_core: torch.Tensor,
    v_core: torch.Tensor,
    group: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
    q_offsets: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`sparsek.kernels.cca_reference.cca_attention_reference` (same contract).

    Packed documents (``cu_seqlens``) run natively: every kernel addresses a document's tokens and
    cores through its start offsets, no padded copy of anything with a ``d`` dimension is made.
    """
    _check(q, k, v, group, window)
    if len({q.dtype, k.dtype, v.dtype, k_core.dtype, v_core.dtype}) > 1:
        raise ValueError(f"q, k, v, k_core and v_core must share one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}, {k_core.dtype}, {v_core.dtype}")
    if k_core.shape[:2] != k.shape[:2] or k_core.shape[3] != k.shape[3] or v_core.shape != k_core.shape:
        raise ValueError(f"k_core/v_core must be [B,Hkv,N,d] like k; got {tuple(k_core.shape)}, {tuple(v_core.shape)}")
    packed = None
    if cu_seqlens is not None:
        bounds = packed_bounds(cu_seqlens, q, k, seqlens, q_offsets)
        packed = PackedRows(bounds, group, q.device)
        check_packed_cores(k, k_core, v_core, packed.total_cores)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    return _CCAAttention.apply(q, k, v, k_core, v_core, group, window, scale, seqlens, q_offsets, packed)


def cca_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`sparsek.kernels.cca_reference.cca_prefill_reference`: pool, then attend."""
    from .cca_triton_pool import cca_pool_triton

    _check(q, k, v, group, window)
    if q.shape[2] != k.shape[2]:
        raise ValueError("cca_prefill needs queries aligned with keys (Lq == Lk)")
    if cu_seqlens is not None:
        packed_bounds(cu_seqlens, q, k, seqlens)
    k_core, v_core = cca_pool_triton(cca_core_queries(q, group, cu_seqlens), k, v, group, scale, cu_seqlens)
    return cca_attention_triton(q, k, v, k_core, v_core, group, window, scale, seqlens, cu_seqlens=cu_seqlens)
