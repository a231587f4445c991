"""SparseK attention in Triton: one autograd function, same signature as the reference.

Pipeline (all GPU work, no Python loops over tokens):

1. :func:`sparsek_selection` -> per query ``tau`` (SPARSEK threshold), ``theta`` (top-k
   boundary with ties toward newer keys) and ``|F|`` (fractional candidates): exact at a few
   anchor queries, then band levels in between (linear in practice, see its module);
2. :func:`sparsek_block_lists` -> per query block the compacted ``S_{i0}``, filtered from the last
   band level's interval lists;
3. forward kernel over list + window; backward kernel for dq, dk, dv and the gate part of
   d(scores);
4. the SPARSEK mean term of d(scores) (SPEC 1.3): ``dz_j -= sum_i [j in F_i] m_i`` with
   ``m_i = sum_{F_i cap S_i} dp / |F_i|``. Because ``tau_i`` is monotone in ``i``, the queries for
   which ``j`` is fractional (``tau_i < u_j < tau_i + 1``) form one contiguous range, found with a
   binary search, and the sum is a difference of prefix sums: O(L log L), no L x L work.

Packed documents (``cu_seqlens``): the kernels address each document through its first token
(:class:`PackedDocs`), per-token side arrays are ``[Hkv or H, T]`` and per-block arrays cover
only the documents' own blocks; nothing with a ``d`` dimension is padded or copied. The
searches of step 4 run on keys ordered by (document, value), so they never cross a document.
"""

from __future__ import annotations

import os

import torch
import triton

from .sparsek_reference import _check_shapes, packed_bounds
from .sparsek_triton_attn import _sparsek_fwd_kernel
from .sparsek_triton_bwd import _delta_kernel, _sparsek_bwd_dkdv_kernel, _sparsek_bwd_dq_kernel
from .sparsek_triton_select import PackedDocs, segment_key, sparsek_block_lists, sparsek_selection
from .triton_options import dot_options

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(g: int, d: int, dtype: torch.dtype) -> dict:
    """Block shapes. Tiny blocks under the interpreter (tests), tensor-core sized on the GPU."""
    if _INTERPRET:
        bm = 16 if g <= 8 else 32
        return {"BM": bm, "BN": 16, "SEL_BQ": 64, "SEL_BN": 32, "LIST_BN": 32, "warps": 1, "stages": 1,
                "dkdv_BM": bm, "dkdv_BN": 16, "NSUB": 2, "dkdv_warps": 1, "dkdv_stages": 1,
                "sel": {"anchor_block_q": 4, "anchor_block_n": 32, "build_block_n": 32, "band_block_q": 16,
                        "band_block_e": 16}}
    bm = 128 if d <= 128 else 64
    bn = 64 if d <= 128 else 32
    # Forward/dQ: 3 stages measured 2-3% faster than 2 at 32K and 128K (H100, d=128); d=256 keeps 2.
    return {"BM": bm, "BN": bn, "SEL_BQ": 32, "SEL_BN": 256, "LIST_BN": 1024, "warps": 8,
            "stages": 3 if d <= 128 else 2,
            # dK/dV: 32 rows x 128 keys, 8 warps, 2 stages: fastest of six shapes measured at 128K
            "dkdv_BM": 32, "dkdv_BN": 128 if d <= 128 else 32, "NSUB": 32, "dkdv_warps": 8, "dkdv_stages": 2,
            # anchors: one query per program, 16 warps over 4096-key chunks (128K selection, H100:
            # 17.3 -> 11.3 ms content-driven, 29.2 -> 23.3 recency; the anchor kernel is the critical path);
            # band edges walked 32 at a time: 11.5 -> 10.1 ms content-driven, 23.2 -> 19.0 recency
            "sel": {"anchor_block_q": 1, "anchor_block_n": 4096, "anchor_warps": 16, "build_block_n": 1024,
                    "band_block_q": 32, "band_block_e": 32}}


class _Plan:
    """Everything the forward computes once and the backward reuses."""

    def __init__(self, q, k, scores, topk, window, seqlens, q_offsets, strides=None, packed=None):
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        self.b, self.h, self.hkv, self.g, self.lq, self.lk, self.d = b, h, hkv, h // hkv, lq, lk, d
        dev = q.device
        self.packed: PackedDocs | None = packed
        if packed is not None:  # rows are documents; lq = lk = T is the token stride of the side arrays
            self.off, self.kvlen = packed.off, packed.length
        else:
            self.off = (
                torch.full((b,), lk - lq, dtype=torch.int32, device=dev)
                if q_offsets is None else q_offsets.to(device=dev, dtype=torch.int32).contiguous()
            )
            self.kvlen = (
                torch.full((b,), lk, dtype=torch.int32, device=dev)
                if seqlens is None else seqlens.to(device=dev, dtype=torch.int32).contiguous()
            )
        self.cfg = _config(self.g, d, q.dtype)
        self.bq = max(1, self.cfg["BM"] // self.g)
        self.topk, self.window = topk, window
        self.u = scores.detach().to(torch.float32).reshape(b * hkv, lk).contiguous()
        self.strides = strides

    def select(self):
        c = self.cfg
        strides = self.strides if self.strides is not None else c.get("strides")
        sel = sparsek_selection(self.u, self.off, self.kvlen, self.lq, self.topk, self.window, self.hkv,
                                strides, c["SEL_BQ"], c["SEL_BN"], **c["sel"], packed=self.packed)
        self.tau, self.thu, self.thj, self.nfrac = sel.tau, sel.thu, sel.thj, sel.nfrac
        self.lists = sel.lists
        self.idx, self.cnt = sparsek_block_lists(
            self.u, self.off, self.kvlen, self.thu, self.thj, self.lq, self.topk, self.window, self.hkv,
            self.bq, c["LIST_BN"], sel.lists, packed=self.packed)
        self.nblocks = self.idx.shape[1]
        self.cap = self.idx.shape[2]

    def rows(self, block_q: int) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor]:
        """Grid and row tables of a kernel over query blocks of ``block_q``: padded ``(blocks, B*Hkv)``,
        packed ``(blocks of all documents, Hkv)`` with the ``(document, block)`` table."""
        if self.packed is None:
            return (triton.cdiv(self.lq, block_q), self.b * self.hkv), self.off, self.off
        table, n = self.packed.blocks(block_q)
        return (n, self.hkv), table, self.packed.tok

    def batch_stride(self, t: torch.Tensor) -> int:
        """Batch stride for the kernels: 0 for packed documents (their first token addresses them)."""
        return 0 if self.packed is not None else t.stride(0)


def _forward(plan: _Plan, q, k, v, scale):
    c = plan.cfg
    o = torch.empty_like(q)
    lse = torch.empty((plan.b, plan.h, plan.lq), device=q.device, dtype=torch.float32)
    upcast = q.dtype == torch.float32 or _INTERPRET
    grid, btab, tok = plan.rows(plan.bq)
    _sparsek_fwd_kernel[grid](
        q, k, v, plan.u, plan.tau, plan.thu, plan.thj, plan.idx, plan.cnt, plan.off, plan.kvlen, o, lse, btab, tok,
        plan.batch_stride(q), q.stride(1), q.stride(2), plan.batch_stride(k), k.stride(1), k.stride(2),
        plan.batch_stride(o), o.stride(1), o.stride(2),
        plan.lq, plan.lk, plan.window, scale, plan.nblocks, plan.cap,
        HKV=plan.hkv, G=plan.g, BQ=plan.bq, BM=c["BM"], BN=c["BN"], D=plan.d, BD=triton.next_power_of_2(plan.d),
        UPCAST=upcast, PACKED=plan.packed is not None, num_warps=c["warps"], num_stages=c["stages"],
        **dot_options(q.dtype),
    )
    return o, lse


def _score_mean_term(plan: _Plan, mrow: torch.Tensor) -> torch.Tensor:
    """``sum_i [0 < u_j - tau_i < 1][j candidate of i] m_i`` for every key, ``[B*Hkv, Lk]``."""
    if plan.packed is not None:
        return _score_mean_term_packed(plan, mrow)
    bh = plan.b * plan.hkv
    m = mrow.view(plan.b, plan.hkv, plan.g, plan.lq).sum(2).reshape(bh, plan.lq).double()
    m = m / plan.nfrac.clamp(min=1).double()
    cum = torch.cat([m.new_zeros(bh, 1), m.cumsum(1)], dim=1)
    u = plan.u
    tau = plan.tau.contiguous()
    first = torch.searchsorted(tau, (u - 1.0).contiguous(), right=True)  # first i with tau_i > u - 1
    last = torch.searchsorted(tau, u.contiguous(), right=False)  # first i with tau_i >= u
    j = torch.arange(plan.lk, device=u.device)
    off = plan.off.long().repeat_interleave(plan.hkv)[:, None]
    imin = (j[None, :] + plan.window - off).clamp(0, plan.lq)
    lo = torch.maximum(first, imin)
    hi = torch.maximum(last, lo)
    kvlen = plan.kvlen.long().repeat_interleave(plan.hkv)[:, None]
    t2 = cum.gather(1, hi) - cum.gather(1, lo)
    return torch.where(j[None, :] < kvlen, t2, torch.zeros_like(t2)).float()


def _score_mean_term_packed(plan: _Plan, mrow: torch.Tensor) -> torch.Tensor:
    """:func:`_score_mean_term` for packed documents, ``[Hkv, T]``: the searches run on keys ordered
    by (document, value), so each key's query range stays inside its own document."""
    hkv, t = plan.hkv, plan.lk
    m = mrow.view(hkv, plan.g, t).sum(1).double() / plan.nfrac.clamp(min=1).double()
    cum = torch.cat([m.new_zeros(hkv, 1), m.cumsum(1)], dim=1)
    seg = plan.packed.token_doc()
    u = plan.u
    tau_key = segment_key(plan.tau, seg)  # ascending along each row: tau is monotone per document
    first = torch.searchsorted(tau_key, segment_key(u - 1.0, seg), right=True)  # first i with tau_i > u - 1
    last = torch.searchsorted(tau_key, segment_key(u, seg), right=False)  # first i with tau_i >= u
    j = torch.arange(t, device=u.device)
    end = (plan.packed.tok.long() + plan.packed.length.long())[seg]
    imin = torch.minimum(j + plan.window, end)[None, :]  # first query of the document that has j as candidate
    lo = torch.maximum(first, imin)
    hi = torch.maximum(last, lo)
    return (cum.gather(1, hi) - cum.gather(1, lo)).float()


def _backward_kernels(plan: _Plan, q, k, v, do, lse, delta, dq, dk, dv, du, mrow, scale, upcast) -> None:
    """dQ + mrow query-major, then dK/dV/d(scores) key-major per super-block (sparsek_triton_bwd.py)."""
    c = plan.cfg
    bd = triton.next_power_of_2(plan.d)
    packed = plan.packed is not None
    strides = (plan.batch_stride(q), q.stride(1), q.stride(2), plan.batch_stride(k), k.stride(1), k.stride(2),
               plan.batch_stride(do), do.stride(1), do.stride(2))
    grid, btab, tok = plan.rows(plan.bq)
    _sparsek_bwd_dq_kernel[grid](
        q, k, v, plan.u, plan.tau, plan.thu, plan.thj, plan.idx, plan.cnt, plan.off, plan.kvlen,
        do, lse, delta, dq, mrow, btab, tok, *strides,
        plan.lq, plan.lk, plan.window, scale, plan.nblocks, plan.cap,
        HKV=plan.hkv, G=plan.g, BQ=plan.bq, BM=c["BM"], BN=c.get("dq_BN", c["BN"]), D=plan.d, BD=bd,
        UPCAST=upcast, PACKED=packed, num_warps=c.get("dq_warps", c["warps"]),
        num_stages=c.get("dq_stages", c["stages"]), **dot_options(q.dtype),
    )
    bq = max(1, c["dkdv_BM"] // plan.g)
    bm = triton.next_power_of_2(plan.g * bq)
    qb = bq * c["NSUB"]
    sidx, scnt = sparsek_block_lists(
        plan.u, plan.off, plan.kvlen, plan.thu, plan.thj, plan.lq, plan.topk, plan.window, plan.hkv,
        qb, c["LIST_BN"], plan.lists, packed=plan.packed)
    nsb, cap = sidx.shape[1], sidx.shape[2]
    bn = c["dkdv_BN"]
    ntiles_a = triton.cdiv(cap, bn)
    ntiles_b = triton.cdiv(plan.window + qb, bn)
    (_, rows), stab, tok = plan.rows(qb)
    _sparsek_bwd_dkdv_kernel[(ntiles_a + ntiles_b, nsb, rows)](
        q, k, v, plan.u, plan.tau, plan.thu, plan.thj, sidx, scnt, plan.off, plan.kvlen,
        do, lse, delta, dk, dv, du, stab, tok, *strides,
        plan.lq, plan.lk, plan.window, scale, nsb, cap, ntiles_a,
        HKV=plan.hkv, G=plan.g, BQ=bq, NSUB=c["NSUB"], BM=bm, BN=bn, D=plan.d, BD=bd,
        UPCAST=upcast, PACKED=packed, num_warps=c["dkdv_warps"], num_stages=c["dkdv_stages"], **dot_options(q.dtype),
    )


def _row_dot(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """``(do.float() * o.float()).sum(-1)`` without the float32 copies (one Triton pass)."""
    if not (o.is_contiguous() and do.is_contiguous() and o.shape == do.shape):
        return (do.float() * o.float()).sum(-1)
    d = o.shape[-1]
    delta = torch.empty(o.shape[:-1], device=o.device, dtype=torch.float32)
    rows = delta.numel()
    if rows:
        br = 16 if _INTERPRET else 64
        _delta_kernel[(triton.cdiv(rows, br),)](o, do, delta, rows, D=d, BR=br, BD=triton.next_power_of_2(d))
    return delta


class _SparsekAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scores, topk, window, scale, seqlens, q_offsets, packed):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        plan = _Plan(q, k, scores, topk, window, seqlens, q_offsets, packed=packed)
        plan.select()
        o, lse = _forward(plan, q, k, v, scale)
        ctx.plan = plan
        ctx.scale = scale
        ctx.scores_dtype = scores.dtype
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        do = do.contiguous()
        delta = _row_dot(o, do)
        dq = torch.empty_like(q)
        dk = torch.zeros((plan.b, plan.hkv, plan.lk, plan.d), device=q.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
        du = torch.zeros((plan.b * plan.hkv, plan.lk), device=q.device, dtype=torch.float32)
        mrow = torch.empty((plan.b, plan.h, plan.lq), device=q.device, dtype=torch.float32)
        upcast = q.dtype == torch.float32 or _INTERPRET
        _backward_kernels(plan, q, k, v, do, lse, delta, dq, dk, dv, du, mrow, ctx.scale, upcast)
        du = du - _score_mean_term(plan, mrow)
        dscores = du.view(plan.b, plan.hkv, plan.lk).to(ctx.scores_dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dscores, None, None, None, None, None, None


def sparsek_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scores: torch.Tensor,
    topk: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
    q_offsets: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseK attention (SPEC 1.4) in Triton; same layout and semantics as the reference
    (padded rows, or packed documents with ``cu_seqlens``, run natively)."""
    _check_shapes(q, k, v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if scores.shape != k.shape[:3]:
        raise ValueError(f"scores must be [B, Hkv, Lk] = {tuple(k.shape[:3])}, got {tuple(scores.shape)}")
    if topk < 1 or window < 1:
        raise ValueError(f"topk and window must be >= 1, got topk={topk}, window={window}")
    g = q.shape[1] // k.shape[1]
    if g > 16:
        raise ValueError(f"GQA group size {g} > 16 is not supported by the Triton kernel")
    packed = None
    if cu_seqlens is not None:
        packed = PackedDocs(packed_bounds(cu_seqlens, q, k, seqlens, q_offsets), q.device)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _SparsekAttention.apply(q, k, v, scores, topk, window, scale, seqlens, q_offsets, packed)
