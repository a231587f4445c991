"""CCA core-token pooling (SPEC 2.1) as Triton kernels, forward and backward.

One program owns ``BLOCK_G`` complete groups of one KV head. It loads the groups' keys once as a
``[BLOCK_G, GP, DP]`` tile (``GP``/``DP``: ``group``/``d`` rounded up to a power of two, masked),
runs the softmax of each of the ``G`` query heads of the KV group over it and averages the
weights, so K/V are read once per KV head rather than once per query head. Pooling is
memory-bound (a few FLOPs per loaded element), so the products are elementwise
multiply-and-reduce rather than ``tl.dot``: no tensor-core minimum of 16 on ``G`` or ``group``,
and no padding of ``G`` beyond the next power of two of ``group``.

The backward recomputes the weights (nothing but the cores is kept) and owns the same groups, so
every key row gets its gradient from exactly one program: no atomics, deterministic.
Everything is computed in float32; inputs are upcast on load and outputs downcast on store.

Packed documents (``cu_seqlens``): a row is a document; its groups start at its first token and
its cores at its first core in the packed core axis (``PACKED``, start tables of
``cca_triton_attention.PackedRows``), so nothing is copied or padded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparsek_reference import packed_bounds

_LOG2E = 1.4426950408889634


@triton.jit
def _group_softmax(QL, q_base, sqh, sqn, n, offs_d, nmask, dmask, jmask, k3, h, qk_scale):
    """Softmax weights ``[BLOCK_G, GP]`` of query head ``h`` of the KV group, and its query."""
    q_ptrs = QL + q_base + h * sqh + n[:, None] * sqn + offs_d[None, :]
    qh = tl.load(q_ptrs, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    s = tl.sum(qh[:, None, :] * k3, axis=2) * qk_scale
    s = tl.where(jmask[None, :], s, float("-inf"))
    e = tl.exp2(s - tl.max(s, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None], qh


@triton.jit
def _pool_rows(b, N, group, TOK, LEN, CST, PACKED: tl.constexpr):
    """``(first token, first core, cores)`` of row ``b``: a batch row, or a packed document."""
    if PACKED:
        t0 = tl.load(TOK + b)
        c0 = tl.load(CST + b)
        n_row = tl.load(LEN + b) // group
    else:
        t0 = 0
        c0 = 0
        n_row = N
    return t0, c0, n_row


@triton.jit
def _pool_fwd_kernel(
    QL, K, V, KC, VC, TOK, LEN, CST,
    sqb, sqh, sqn, skb, skh, skm, scb, sch, scn,
    N, group, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    GP: tl.constexpr, BLOCK_G: tl.constexpr, PACKED: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    t0, c0, n_row = _pool_rows(b, N, group, TOK, LEN, CST, PACKED)
    n = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    nmask = n < n_row
    jmask = j < group
    dmask = offs_d < D
    rows = t0 + n[:, None] * group + j[None, :]
    m3 = (nmask[:, None] & jmask[None, :])[:, :, None] & dmask[None, None, :]
    kv_off = b * skb + hk * skh + rows[:, :, None] * skm + offs_d[None, None, :]
    k3 = tl.load(K + kv_off, mask=m3, other=0.0).to(tl.float32)
    q_base = b * sqb + (hk * G).to(tl.int64) * sqh
    w = tl.zeros([BLOCK_G, GP], dtype=tl.float32)
    for h in tl.static_range(G):
        p, _ = _group_softmax(QL, q_base, sqh, sqn, c0 + n, offs_d, nmask, dmask, jmask, k3, h, qk_scale)
        w += p
    w = w / G
    kc = tl.sum(w[:, :, None] * k3, axis=1)
    v3 = tl.load(V + kv_off, mask=m3, other=0.0).to(tl.float32)
    vc = tl.sum(w[:, :, None] * v3, axis=1)
    c_off = b * scb + hk * sch + (c0 + n[:, None]) * scn + offs_d[None, :]
    cmask = nmask[:, None] & dmask[None, :]
    tl.store(KC + c_off, kc.to(KC.dtype.element_ty), mask=cmask)
    tl.store(VC + c_off, vc.to(VC.dtype.element_ty), mask=cmask)


@triton.jit
def _pool_bwd_kernel(
    QL, K, V, DKC, DVC, DQL, DK, DV, TOK, LEN, CST,
    sqb, sqh, sqn, skb, skh, skm, scb, sch, scn, sdqb, sdqh, sdqn,
    N, group, qk_scale, sm_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    GP: tl.constexpr, BLOCK_G: tl.constexpr, PACKED: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    t0, c0, n_row = _pool_rows(b, N, group, TOK, LEN, CST, PACKED)
    n = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    nmask = n < n_row
    jmask = j < group
    dmask = offs_d < D
    rows = t0 + n[:, None] * group + j[None, :]
    m3 = (nmask[:, None] & jmask[None, :])[:, :, None] & dmask[None, None, :]
    kv_off = b * skb + hk * skh + rows[:, :, None] * skm + offs_d[None, None, :]
    k3 = tl.load(K + kv_off, mask=m3, other=0.0).to(tl.float32)
    v3 = tl.load(V + kv_off, mask=m3, other=0.0).to(tl.float32)
    c_off = b * scb + hk * sch + (c0 + n[:, None]) * scn + offs_d[None, :]
    cmask = nmask[:, None] & dmask[None, :]
    dkc = tl.load(DKC + c_off, mask=cmask, other=0.0).to(tl.float32)
    dvc = tl.load(DVC + c_off, mask=cmask, other=0.0).to(tl.float32)
    q_base = b * sqb + (hk * G).to(tl.int64) * sqh
    w = tl.zeros([BLOCK_G, GP], dtype=tl.float32)
    for h in tl.static_range(G):
        p, _ = _group_softmax(QL, q_base, sqh, sqn, c0 + n, offs_d, nmask, dmask, jmask, k3, h, qk_scale)
        w += p
    w = w / G
    # d(loss)/d(weight) of each member, shared by the G heads (the mean spreads it 1/G each).
    dw = (tl.sum(dkc[:, None, :] * k3, axis=2) + tl.sum(dvc[:, None, :] * v3, axis=2)) / G
    dk3 = w[:, :, None] * dkc[:, None, :]
    dv3 = w[:, :, None] * dvc[:, None, :]
    dq_base = b * sdqb + (hk * G).to(tl.int64) * sdqh
    for h in tl.static_range(G):
        p, qh = _group_softmax(QL, q_base, sqh, sqn, c0 + n, offs_d, nmask, dmask, jmask, k3, h, qk_scale)
        ds = p * (dw - tl.sum(p * dw, axis=1)[:, None]) * sm_scale
        dq = tl.sum(ds[:, :, None] * k3, axis=1)
        dq_ptrs = DQL + dq_base + h * sdqh + (c0 + n[:, None]) * sdqn + offs_d[None, :]
        tl.store(dq_ptrs, dq.to(DQL.dtype.element_ty), mask=cmask)
        dk3 += ds[:, :, None] * qh[:, None, :]
    tl.store(DK + kv_off, dk3.to(DK.dtype.element_ty), mask=m3)
    tl.store(DV + kv_off, dv3.to(DV.dtype.element_ty), mask=m3)


def _pool_blocks(group: int, d: int) -> tuple[int, int, int]:
    """(GP, DP, BLOCK_G): about 4K float32 elements per [BLOCK_G, GP, DP] tile."""
    gp = triton.next_power_of_2(group)
    dp = max(16, triton.next_power_of_2(d))
    block_g = max(1, min(16, 4096 // (gp * dp)))
    return gp, dp, block_g


def _rows_args(packed, *tensors):
    """``(rows, grid cores, TOK, LEN, CST, batch strides of tensors)``; packed: the batch strides
    are 0 and the start tables address each document."""
    if packed is None:
        return (tensors[0].shape[0], tensors[0].shape[2], None, None, None, *(t.stride(0) for t in tensors))
    return (packed.rows, packed.max_cores, packed.tok, packed.length, packed.core, *(0 for _ in tensors))


class _CCAPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_last, k, v, group, scale, packed):
        b, h, n, d = q_last.shape
        hkv = k.shape[1]
        k = k.contiguous()
        v = v.contiguous()
        if q_last.stride(-1) != 1:
            q_last = q_last.contiguous()
        k_core = torch.empty((b, hkv, n, d), device=k.device, dtype=k.dtype)
        v_core = torch.empty((b, hkv, n, d), device=v.device, dtype=v.dtype)
        gp, dp, block_g = _pool_blocks(group, d)
        rows, n_grid, tok, length, cst, sqb, skb, scb = _rows_args(packed, q_last, k, k_core)
        if n_grid > 0 and rows * hkv > 0:
            grid = (triton.cdiv(n_grid, block_g), rows * hkv)
            _pool_fwd_kernel[grid](
                q_last, k, v, k_core, v_core, *(t if t is not None else k_core for t in (tok, length, cst)),
                sqb, q_last.stride(1), q_last.stride(2),
                skb, k.stride(1), k.stride(2),
                scb, k_core.stride(1), k_core.stride(2),
                n, group, scale * _LOG2E,
                HKV=hkv, G=h // hkv, D=d, DP=dp, GP=gp, BLOCK_G=block_g, PACKED=packed is not None, num_warps=4,
            )
        ctx.save_for_backward(q_last, k, v)
        ctx.group, ctx.scale, ctx.packed = group, scale, packed
        return k_core, v_core

    @staticmethod
    def backward(ctx, dk_core, dv_core):
        q_last, k, v = ctx.saved_tensors
        group, scale, packed = ctx.group, ctx.scale, ctx.packed
        b, h, n, d = q_last.shape
        hkv = k.shape[1]
        shape = (b, hkv, n, d)
        dk_core = torch.zeros(shape, device=k.device, dtype=k.dtype) if dk_core is None else dk_core.contiguous()
        dv_core = torch.zeros(shape, device=v.device, dtype=v.dtype) if dv_core is None else dv_core.contiguous()
        dq = torch.empty((b, h, n, d), device=q_last.device, dtype=q_last.dtype)
        dk = torch.zeros_like(k)  # keys past the last complete group get no gradient
        dv = torch.zeros_like(v)
        gp, dp, block_g = _pool_blocks(group, d)
        rows, n_grid, tok, length, cst, sqb, skb, scb, sdqb = _rows_args(packed, q_last, k, dk_core, dq)
        if n_grid > 0 and rows * hkv > 0:
            grid = (triton.cdiv(n_grid, block_g), rows * hkv)
            _pool_bwd_kernel[grid](
                q_last, k, v, dk_core, dv_core, dq, dk, dv, *(t if t is not None else dk for t in (tok, length, cst)),
                sqb, q_last.stride(1), q_last.stride(2),
                skb, k.stride(1), k.stride(2),
                scb, dk_core.stride(1), dk_core.stride(2),
                sdqb, dq.stride(1), dq.stride(2),
                n, group, scale * _LOG2E, scale,
                HKV=hkv, G=h // hkv, D=d, DP=dp, GP=gp, BLOCK_G=block_g, PACKED=packed is not None, num_warps=4,
            )
        return dq, dk, dv, None, None, None


def cca_pool_triton(
    q_last: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`sparsek.kernels.cca_reference.cca_pool_reference` (same contract)."""
    b, h, n, d = q_last.shape
    hkv = k.shape[1]
    if k.dim() != 4 or v.shape != k.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"expected q_last [B,H,N,d] and k, v [B,Hkv,Lk,d]; got {tuple(q_last.shape)}, {tuple(k.shape)}")
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({hkv})")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if k.shape[2] < n * group:
        raise ValueError(f"{n} groups of {group} need {n * group} keys, got {k.shape[2]}")
    packed = None
    if cu_seqlens is not None:
        from .cca_triton_attention import PackedRows

        packed = PackedRows(packed_bounds(cu_seqlens, k, k), group, k.device)
        if b != 1 or n != packed.total_cores:
            raise ValueError(f"packed pooling needs q_last [1, H, {packed.total_cores}, d] (one query per core), "
                             f"got {tuple(q_last.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    return _CCAPool.apply(q_last, k, v, group, scale, packed)
