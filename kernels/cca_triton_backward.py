"""CCA attention backward, dK/dV part: one launch, heaviest work first, long core ranges split.

Why this exists. In the first backward (``_dkdv_kernel`` in ``cca_triton_attention``) a program
owns a tile of keys and walks every query block that sees it. Raw keys are seen by about
``s + g`` positions, but core ``n`` is seen by *every* position from ``(n + 1) g + s - 1`` on, so
core programs are long and of unequal length (triangular), and they were launched as a
``(tiles, heads)`` grid, i.e. heaviest-to-lightest once *per head*: a saw-tooth, so the last
wave holds long programs next to idle SMs. Then a second launch ran the raw tiles.

Here one 1-D launch holds, in this order:

1. core work items, tile-major over ``(tile, batch*head, piece)``: every head's tile 0 first
   (the longest), then tile 1, ...; each core tile's query range is cut into ``NSPLIT`` pieces of
   (almost) equal length, whole query blocks each, the last one shorter or empty, so no single
   program is longer than ``1/NSPLIT`` of the longest range;
2. raw key tiles (all of similar, short length), which fill the SMs freed by the core tail.

With ``NSPLIT > 1`` each piece writes its partial float32 dK/dV to a workspace
``[NSPLIT, B*Hkv, N, d]`` and ``_reduce_kernel`` adds the pieces in a fixed order (piece 0, 1,
...), scales dK and casts: no atomics, bit-identical results run to run. With ``NSPLIT == 1``
core programs write their result directly.

The per-tile arithmetic is that of ``_dkdv_kernel`` (the same masks, the same float32
accumulation, probabilities rounded to the input dtype before the products); the only
difference with ``NSPLIT > 1`` is the summation order of the core gradients (fixed, pieces in
order). ``TWO_PASS`` walks the queries twice (dV,
then dK: one float32 accumulator live instead of two, at the price of a fifth product); ``PART``
picks one launch for all work or two (cores, then raw keys; each compiles one branch only).

Register pressure (sm_90 compile, no GPU needed; 64 rows x 128 keys, 8 warps, d = 128): the
committed ``_dkdv_kernel`` uses 255 registers and a 976-byte spill stack; this kernel 1136 bytes
fused (both branches in one program), 728 core-only, 832 raw-only; two-pass core-only 736.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cca_triton_attention import _n_cores, _row_layout
from .triton_options import dot_options


@triton.jit
def _probs_t(k, q, lse, cols, n0, pa, pos, group, window, qk_scale,
             QPB: tl.constexpr, BLOCK_N: tl.constexpr, IS_CORE: tl.constexpr):
    """Probabilities ``[keys, rows]`` of one tile, zero where a row does not see a key; the
    element-wise mask only on tiles that the block's first/last position says are partial."""
    p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
    if IS_CORE:
        if _n_cores(pa, window, group) < n0 + BLOCK_N:
            p_t = tl.where(cols[:, None] < _n_cores(pos, window, group)[None, :], p_t, 0.0)
    else:
        if (pa < n0 + BLOCK_N - 1) | (_n_cores(pa + QPB - 1, window, group) * group > n0):
            vis = (cols[:, None] >= (_n_cores(pos, window, group) * group)[None, :]) & (cols[:, None] <= pos[None, :])
            p_t = tl.where(vis, p_t, 0.0)
    return p_t


@triton.jit
def _tile_dkdv(
    Q, DO, LSE, DELTA, k, v, cols, n0, iq_lo, iq_hi, off, head_off, lse_base, pl, rmask_rows,
    offs_d, dmask, sqm, group, window, qk_scale,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CORE: tl.constexpr, TWO_PASS: tl.constexpr,
):
    """Unscaled float32 ``(dK, dV)`` of one key tile from the query rows ``[iq_lo, iq_hi)``."""
    QPB: tl.constexpr = BLOCK_M // G
    dk = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    if TWO_PASS:
        # dV first, then dK: one float32 accumulator live at a time (5 products instead of 4)
        for iq0 in range(iq_lo, iq_hi, QPB):
            iq = iq0 + pl
            rmask = rmask_rows & (iq < iq_hi)
            row_ptr = head_off + iq * sqm
            ld_mask = rmask[:, None] & dmask[None, :]
            q = tl.load(Q + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
            do = tl.load(DO + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
            lse = tl.load(LSE + lse_base + iq, mask=rmask, other=float("inf"))
            p_t = _probs_t(k, q, lse, cols, n0, off + iq0, off + iq, group, window, qk_scale, QPB, BLOCK_N, IS_CORE)
            dv += tl.dot(p_t.to(do.dtype), do)
        for iq0 in range(iq_lo, iq_hi, QPB):
            iq = iq0 + pl
            rmask = rmask_rows & (iq < iq_hi)
            row_ptr = head_off + iq * sqm
            ld_mask = rmask[:, None] & dmask[None, :]
            q = tl.load(Q + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
            do = tl.load(DO + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
            lse = tl.load(LSE + lse_base + iq, mask=rmask, other=float("inf"))
            delta = tl.load(DELTA + lse_base + iq, mask=rmask, other=0.0)
            p_t = _probs_t(k, q, lse, cols, n0, off + iq0, off + iq, group, window, qk_scale, QPB, BLOCK_N, IS_CORE)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
        return dk, dv
    for iq0 in range(iq_lo, iq_hi, QPB):
        iq = iq0 + pl
        rmask = rmask_rows & (iq < iq_hi)
        row_ptr = head_off + iq * sqm
        ld_mask = rmask[:, None] & dmask[None, :]
        q = tl.load(Q + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
        do = tl.load(DO + row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
        lse = tl.load(LSE + lse_base + iq, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + lse_base + iq, mask=rmask, other=0.0)
        p_t = _probs_t(k, q, lse, cols, n0, off + iq0, off + iq, group, window, qk_scale, QPB, BLOCK_N, IS_CORE)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkdv_split_kernel(
    Q, K, V, KC, VC, DO, LSE, DELTA, DK, DV, DKC, DVC, PDK, PDV, SEQ, OFF, TOK, CST,
    sqb, sqh, sqm, skb, skh, skm, scb, sch, scm,
    Lq, Lk, N, n_core_tiles, pid_base, group, window, qk_scale, sm_scale,
    H: tl.constexpr, HKV: tl.constexpr, BH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_OFF: tl.constexpr, TWO_PASS: tl.constexpr,
    PART: tl.constexpr, PACKED: tl.constexpr,
):
    """``PART``: 0 = core items then raw tiles in one grid; 1 = core items only; 2 = raw tiles
    only (grid numbered from ``pid_base``). 1 and 2 compile one branch each (fewer registers).
    ``PACKED``: rows are packed documents (``_row_layout``); the partial workspace is then
    ``[NSPLIT, Hkv, total cores, d]``, like the packed cores."""
    QPB: tl.constexpr = BLOCK_M // G
    pid = tl.program_id(0) + pid_base
    n_core_items = n_core_tiles * BH * NSPLIT
    if PART == 0:
        is_core = pid < n_core_items
    else:
        is_core = PART == 1
    if is_core:
        tile = pid // (BH * NSPLIT)
        rem = pid % (BH * NSPLIT)
        bh = rem // NSPLIT
        piece = rem % NSPLIT
    else:
        rid = pid - n_core_items
        tile = rid // BH
        bh = rid % BH
        piece = 0
    b = bh // HKV
    hk = bh % HKV
    if HAS_SEQ:
        kv_len = tl.load(SEQ + b)
    else:
        kv_len = Lk
    if HAS_OFF:
        off = tl.load(OFF + b)
    else:
        off = Lk - Lq
    t0, c0, lq, lk, n_cores, sb = _row_layout(b, kv_len, TOK, CST, Lq, Lk, N, group, PACKED)
    n0 = tile * BLOCK_N
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    cols = n0 + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_M)
    pl = r // G
    hd = r % G
    rmask_rows = pl < QPB
    head_off = b.to(tl.int64) * sqb + (hk * G + hd).to(tl.int64) * sqh + t0 * sqm
    lse_base = (sb * H + hk * G + hd).to(tl.int64) * Lq + t0
    if is_core:
        kv_mask = (cols < n_cores)[:, None] & dmask[None, :]
        kv_off = b.to(tl.int64) * scb + hk * sch + (c0 + cols[:, None]) * scm + offs_d[None, :]
        k = tl.load(KC + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(VC + kv_off, mask=kv_mask, other=0.0)
        # positions that see some core of the tile: from (n0 + 1) g + s - 1 to the end
        iq_lo = tl.maximum((n0 + 1) * group + window - 1 - off, 0)
        iq_hi = tl.minimum(kv_len - off, lq)
        n_blk = tl.maximum(tl.cdiv(iq_hi - iq_lo, QPB), 0)
        per = tl.cdiv(n_blk, NSPLIT) * QPB
        lo = iq_lo + piece * per
        hi = tl.minimum(lo + per, iq_hi)
        dk, dv = _tile_dkdv(
            Q, DO, LSE, DELTA, k, v, cols, n0, lo, hi, off, head_off, lse_base, pl, rmask_rows,
            offs_d, dmask, sqm, group, window, qk_scale,
            G=G, D=D, DP=DP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_CORE=True, TWO_PASS=TWO_PASS,
        )
        if NSPLIT == 1:
            tl.store(DKC + kv_off, (dk * sm_scale).to(DKC.dtype.element_ty), mask=kv_mask)
            tl.store(DVC + kv_off, dv.to(DVC.dtype.element_ty), mask=kv_mask)
        else:
            if PACKED:
                p_off = ((piece * HKV + hk).to(tl.int64) * N + c0 + cols[:, None]) * D + offs_d[None, :]
            else:
                p_off = ((piece * BH + bh).to(tl.int64) * N + cols[:, None]) * D + offs_d[None, :]
            tl.store(PDK + p_off, dk, mask=kv_mask)
            tl.store(PDV + p_off, dv, mask=kv_mask)
    else:
        kv_mask = (cols < lk)[:, None] & dmask[None, :]
        kv_off = b.to(tl.int64) * skb + hk * skh + (t0 + cols[:, None]) * skm + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        j_last = tl.maximum(tl.minimum(n0 + BLOCK_N, kv_len) - 1, 0)
        pos_last = tl.minimum((j_last // group + 1) * group + window - 2, kv_len - 1)
        iq_lo = tl.maximum(n0 - off, 0)
        iq_hi = tl.minimum(pos_last - off + 1, lq)
        dk, dv = _tile_dkdv(
            Q, DO, LSE, DELTA, k, v, cols, n0, iq_lo, iq_hi, off, head_off, lse_base, pl, rmask_rows,
            offs_d, dmask, sqm, group, window, qk_scale,
            G=G, D=D, DP=DP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_CORE=False, TWO_PASS=TWO_PASS,
        )
        tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _reduce_kernel(
    PDK, PDV, DKC, DVC, scb, sch, scm, N, sm_scale,
    HKV: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_R: tl.constexpr, NSPLIT: tl.constexpr,
):
    """``dK_core = scale * sum_p PDK[p]``, ``dV_core = sum_p PDV[p]``, pieces added in order."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    offs_d = tl.arange(0, DP)
    mask = (rows < N)[:, None] & (offs_d < D)[None, :]
    dk = tl.zeros([BLOCK_R, DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_R, DP], dtype=tl.float32)
    for piece in range(NSPLIT):
        p_off = ((piece * BH + bh).to(tl.int64) * N + rows[:, None]) * D + offs_d[None, :]
        dk += tl.load(PDK + p_off, mask=mask, other=0.0)
        dv += tl.load(PDV + p_off, mask=mask, other=0.0)
    out = b.to(tl.int64) * scb + hk * sch + rows[:, None] * scm + offs_d[None, :]
    tl.store(DKC + out, (dk * sm_scale).to(DKC.dtype.element_ty), mask=mask)
    tl.store(DVC + out, dv.to(DVC.dtype.element_ty), mask=mask)


def choose_nsplit(lq: int, n: int, lk: int, group: int, window: int, block_m_pos: int, block_n: int,
                  bh: int, slots: int, max_split: int = 8) -> int:
    """Pieces per core tile so that the longest core piece is at most half of the average load
    of a program slot (``slots``: SMs x programs per SM). Lengths are counted in query blocks
    with ``q_offsets``/``seqlens`` ignored (full-length rows): an estimate, used only to cut work."""
    n_core_tiles = triton.cdiv(n, block_n)
    if n_core_tiles == 0 or lq == 0:
        return 1
    core = [max(0, lq - ((t * block_n + 1) * group + window - 1)) for t in range(n_core_tiles)]
    raw = triton.cdiv(lk, block_n) * (block_n + window + group)
    total = bh * (sum(core) + raw)
    longest = core[0]
    if longest == 0:
        return 1
    need = triton.cdiv(2 * longest * slots, max(total, 1))
    return int(min(max(need, 1), max_split))


def dkdv_split(
    q, k, v, k_core, v_core, do, lse, delta, dk, dv, dkc, dvc, seq, offs,
    group: int, window: int, scale: float, log2e: float,
    block_m: int, block_n: int, num_warps: int, num_stages: int, nsplit: int,
    two_pass: bool = False, fuse: bool = True, packed=None,
) -> None:
    """Fill ``dk, dv`` (raw) and ``dkc, dvc`` (cores); ``delta`` must already hold rowsum(O dO).

    ``packed``: a ``cca_triton_attention.PackedRows`` (rows = documents) or ``None``."""
    b, h, lq, d = q.shape
    hkv, lk, n = k.shape[1], k.shape[2], k_core.shape[2]
    g = h // hkv
    dp = max(16, triton.next_power_of_2(d))
    if packed is None:
        rows, n_grid, lk_grid = b, n, lk
        seq_arg = seq if seq is not None else lse
        off_arg = offs if offs is not None else lse
        tok_arg = cst_arg = lse
        sqb, skb, scb = q.stride(0), k.stride(0), k_core.stride(0)
    else:
        rows, n_grid, lk_grid = packed.rows, packed.max_cores, packed.max_len
        seq_arg, off_arg, tok_arg, cst_arg = packed.length, lse, packed.tok, packed.core
        sqb = skb = scb = 0
    bh = rows * hkv
    n_core_tiles = triton.cdiv(n_grid, block_n)
    if n_core_tiles == 0:
        nsplit = 1
    if nsplit > 1:  # packed: [NSPLIT, Hkv, total cores, d], the layout of the packed cores
        pdk = torch.empty((nsplit, b * hkv, n, d), device=q.device, dtype=torch.float32)
        pdv = torch.empty_like(pdk)
    else:
        pdk = pdv = lse  # unused
    n_core_items = n_core_tiles * bh * nsplit
    n_raw_items = triton.cdiv(lk_grid, block_n) * bh
    if fuse:
        launches = [(0, 0, n_core_items + n_raw_items)]
    else:
        launches = [(1, 0, n_core_items), (2, n_core_items, n_raw_items)]
    for part, pid_base, n_items in launches:
        if n_items == 0:
            continue
        _dkdv_split_kernel[(n_items,)](
            q, k, v, k_core, v_core, do, lse, delta, dk, dv, dkc, dvc, pdk, pdv, seq_arg, off_arg, tok_arg, cst_arg,
            sqb, q.stride(1), q.stride(2), skb, k.stride(1), k.stride(2),
            scb, k_core.stride(1), k_core.stride(2),
            lq, lk, n, n_core_tiles, pid_base, group, window, scale * log2e, scale,
            H=h, HKV=hkv, BH=bh, G=g, D=d, DP=dp, BLOCK_M=block_m, BLOCK_N=block_n, NSPLIT=nsplit,
            HAS_SEQ=packed is not None or seq is not None, HAS_OFF=packed is None and offs is not None,
            TWO_PASS=two_pass, PART=part, PACKED=packed is not None, num_warps=num_warps, num_stages=num_stages,
            **dot_options(q.dtype),
        )
    if nsplit > 1:  # packed cores are [1, Hkv, total, d]: the same reduction over b * Hkv = Hkv rows
        block_r = 16 if q.device.type != "cuda" else 64
        _reduce_kernel[(triton.cdiv(n, block_r), b * hkv)](
            pdk, pdv, dkc, dvc, dkc.stride(0), dkc.stride(1), dkc.stride(2), n, scale,
            HKV=hkv, BH=b * hkv, D=d, DP=dp, BLOCK_R=block_r, NSPLIT=nsplit, num_warps=4,
        )
