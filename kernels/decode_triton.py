"""Triton decode attention against a bounded cache: split across the key dimension.

Same signature and semantics as :func:`decode_reference.gated_decode_attention_reference`.

Why split-K (flash-decoding): a decode step has one query per row, so one program per (row, KV
head) would give batch 1 of an 8-KV-head model only 8 programs on a GPU with 132 SMs. The slots
of each (row, KV head) are cut into ``S`` contiguous splits; every program computes a partial
softmax (running max ``m``, normaliser ``l`` and the gated, unnormalised value sum) for the G query
heads that share the KV head, and a second small kernel merges the splits. ``S`` depends only on
the shapes, so the launch is static and can be captured in a CUDA graph.

Gates multiply the values but not the softmax normaliser (SPEC 1.4: one softmax over window and
selection, gates applied to the values). Math in float32; inputs fp32/fp16/bf16 (in the Triton
interpreter bf16 is wrong, so tests use fp32/fp16 on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(
    Q, K, V, GATES, VALID, M_OUT, L_OUT, ACC_OUT,
    scale,
    n_slots, slots_per_split,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_gb, stride_gh, stride_gm,
    stride_vlb, stride_vlh, stride_vlm,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_GATES: tl.constexpr, N_SPLITS: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + (hk * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    start = pid_s * slots_per_split
    end = tl.minimum(start + slots_per_split, n_slots)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        vl = tl.load(VALID + b * stride_vlb + hk * stride_vlh + offs_n * stride_vlm, mask=n_ok, other=0)
        ok = n_ok & (vl != 0)
        k = tl.load(
            K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_km + offs_d[None, :] * stride_kd,
            mask=ok[:, None] & d_ok[None, :], other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [G_PAD, BLOCK_N], fp32 accumulate
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        p = tl.where(ok[None, :], p, 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_GATES:
            gt = tl.load(GATES + b * stride_gb + hk * stride_gh + offs_n * stride_gm, mask=ok, other=0.0)
            p = p * gt[None, :]
        v = tl.load(
            V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vm + offs_d[None, :] * stride_vd,
            mask=ok[:, None] & d_ok[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    row = (pid_bh * N_SPLITS + pid_s) * G_PAD + offs_g
    tl.store(M_OUT + row, m_i)
    tl.store(L_OUT + row, l_i)
    tl.store(ACC_OUT + row[:, None] * D_PAD + offs_d[None, :], acc)


@triton.jit
def _decode_combine_kernel(
    M_IN, L_IN, ACC_IN, OUT,
    stride_ob, stride_oh, stride_od,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    N_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    gi = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < N_SPLITS
    rows = (pid_bh * N_SPLITS + offs_s) * G_PAD + gi
    m = tl.load(M_IN + rows, mask=s_ok, other=float("-inf"))
    lsum = tl.load(L_IN + rows, mask=s_ok, other=0.0)
    acc = tl.load(ACC_IN + rows[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_ok & (m > float("-inf")), tl.exp(m - m_safe), 0.0)
    den = tl.sum(lsum * w, axis=0)
    num = tl.sum(acc * w[:, None], axis=0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    o_ptrs = OUT + b * stride_ob + (hk * G + gi) * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_d < D)


def _num_splits(rows: int, n_slots: int, block_n: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    want = max(1, (2 * sms + rows - 1) // rows)
    return max(1, min(want, triton.cdiv(n_slots, block_n), 64))


def gated_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor | None,
    valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Split-K decode attention; see :func:`gated_decode_attention_reference`."""
    b, h, lq, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    if h % hkv or v.shape != k.shape or valid.shape != k.shape[:3]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, valid {tuple(valid.shape)}")
    if lq != 1:  # every query sees the same slots: fold the queries into the head dimension
        qf = q.permute(0, 2, 1, 3).reshape(b * lq, h, 1, d)

        def rep(t):
            return None if t is None else t.repeat_interleave(lq, dim=0)

        out = gated_decode_attention_triton(qf, rep(k), rep(v), rep(gates), rep(valid), scale)
        return out.reshape(b, lq, h, d).permute(0, 2, 1, 3)
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    g_pad = max(16, triton.next_power_of_2(g))
    d_pad = max(16, triton.next_power_of_2(d))
    block_n = 64
    splits = _num_splits(b * hkv, m, block_n, q.device)
    per_split = triton.cdiv(triton.cdiv(max(m, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(max(m, 1), per_split))
    valid_u8 = valid.view(torch.uint8) if valid.dtype == torch.bool else valid.to(torch.uint8)
    m_buf = torch.empty(b * hkv * splits * g_pad, device=q.device, dtype=torch.float32)
    l_buf = torch.empty_like(m_buf)
    acc_buf = torch.empty(b * hkv * splits * g_pad, d_pad, device=q.device, dtype=torch.float32)
    out = torch.empty(b, h, 1, d, device=q.device, dtype=q.dtype)
    gt = gates if gates is not None else m_buf  # dummy pointer when gates are absent
    gstr = (gates.stride(0), gates.stride(1), gates.stride(2)) if gates is not None else (0, 0, 0)
    _decode_split_kernel[(b * hkv, splits)](
        q, k, v, gt, valid_u8, m_buf, l_buf, acc_buf,
        float(scale), m, per_split,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        *gstr,
        valid_u8.stride(0), valid_u8.stride(1), valid_u8.stride(2),
        HKV=hkv, G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, BLOCK_N=block_n,
        HAS_GATES=gates is not None, N_SPLITS=splits,
        PREC="ieee" if k.dtype == torch.float32 else None,  # bf16/fp16: native tensor-core dot
    )
    _decode_combine_kernel[(b * hkv, g)](
        m_buf, l_buf, acc_buf, out,
        out.stride(0), out.stride(1), out.stride(3),
        HKV=hkv, G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, N_SPLITS=splits,
        S_PAD=max(2, triton.next_power_of_2(splits)),
    )
    return out
