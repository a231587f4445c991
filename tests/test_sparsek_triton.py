"""SparseK Triton kernels against the PyTorch reference (SPEC 1.2-1.4).

CPU: run under TRITON_INTERPRET=1 (tests/conftest.py), fp32/fp16, tiny shapes, tiny blocks.
GPU (@pytest.mark.gpu): bf16 at larger shapes with flash-attention's rule (kernel error at most
2x the reference's own error at the same dtype, both against a float64 reference).
"""

from __future__ import annotations

import pytest
import torch

from sparsek.kernels.sparsek_projection import sparsek_threshold
from sparsek.kernels.sparsek_reference import sparsek_attention_reference, topk_mask
from sparsek.kernels.sparsek_triton import sparsek_attention_triton
from sparsek.kernels.sparsek_triton_select import sparsek_thresholds


def _inputs(b, h, hkv, lq, lk, d, dtype, device="cpu", score_scale=0.5, ties=False, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(device=device, dtype=dtype)
    u = torch.randn(b, hkv, lk, generator=gen) * score_scale
    if ties:
        u = u.round()
    do = torch.randn(b, h, lq, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, u.to(device), do


def _run(fn, q, k, v, u, do, topk, window, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, u)]
    out = fn(*leaves, topk, window, **kw)
    grads = torch.autograd.grad(out, leaves, do)
    return (out.detach(), *grads)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _check_fp32(b, h, hkv, lq, lk, d, topk, window, ties=False, **kw):
    q, k, v, u, do = _inputs(b, h, hkv, lq, lk, d, torch.float32, ties=ties)
    got = _run(sparsek_attention_triton, q, k, v, u, do, topk, window, **kw)
    ref = _run(sparsek_attention_reference, q, k, v, u, do, topk, window, **kw)
    for name, a, r in zip(("out", "dq", "dk", "dv", "dscores"), got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert torch.allclose(a, r, atol=2e-5, rtol=1e-4), (name, (a - r).abs().max().item())
    return got, ref


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("ties", [False, True])
def test_thresholds_and_topk_boundary_match_reference(ties):
    """tau equals the reference SPARSEK threshold; theta encodes exactly topk_mask (ties -> newer)."""
    torch.manual_seed(1)
    b, hkv, lk, topk, window = 2, 2, 45, 5, 4
    u = torch.randn(b, hkv, lk)
    if ties:
        u = u.round()
    off = torch.zeros(b, dtype=torch.int32)
    kvlen = torch.tensor([45, 30], dtype=torch.int32)
    tau, thu, thj, _ = sparsek_thresholds(u.view(b * hkv, lk), off, kvlen, lk, topk, window, hkv, 64, 16)
    tau, thu, thj = (t.view(b, hkv, lk) for t in (tau, thu, thj))
    j = torch.arange(lk)
    for bi in range(b):
        for i in range(lk):
            n = max(0, min(i - window + 1, int(kvlen[bi])))
            valid = (j < n).expand(hkv, lk)
            want_tau = sparsek_threshold(u[bi], topk, valid)
            want_sel = topk_mask(u[bi], valid, topk)
            t_u, t_j = thu[bi, :, i, None], thj[bi, :, i, None]
            got_sel = valid & ((u[bi] > t_u) | ((u[bi] == t_u) & (j >= t_j)))
            assert torch.equal(got_sel, want_sel), (bi, i)
            if n <= topk:
                assert torch.isinf(tau[bi, :, i]).all()
            else:
                assert torch.allclose(tau[bi, :, i], want_tau, atol=1e-5), (bi, i)


# ---------------------------------------------------------------- attention, CPU (interpreter)


def test_mha_odd_length_fp32():
    got, _ = _check_fp32(1, 2, 2, 37, 37, 16, topk=5, window=4)
    assert got[4].abs().sum() > 0, "scores must receive a gradient through the fractional gates"


def test_gqa3_ties_fp32():
    _check_fp32(1, 6, 2, 40, 40, 16, topk=6, window=3, ties=True)


def test_gqa4_batch_head_dim_24_fp32():
    """head_dim not a power of two (masked lanes), two batch rows, G = 4."""
    _check_fp32(2, 4, 1, 29, 29, 24, topk=4, window=5)


def test_gqa8_right_padded_fp32():
    _check_fp32(2, 8, 1, 30, 30, 16, topk=4, window=5, seqlens=torch.tensor([30, 17]))


def test_decode_like_q_offsets_fp32():
    """Lq < Lk, per-row offsets, one row padded; a negative offset makes early queries see nothing."""
    got, _ = _check_fp32(3, 3, 1, 9, 40, 16, topk=5, window=4,
                         q_offsets=torch.tensor([31, 20, -3]), seqlens=torch.tensor([40, 29, 40]))
    assert (got[0][2, :, :3] == 0).all()


def test_fewer_candidates_than_k_fp32():
    """k larger than most prefixes: those rows select every candidate with gate 1."""
    _check_fp32(1, 2, 1, 33, 33, 16, topk=20, window=3)


def test_window_plus_k_covers_everything_is_dense_causal():
    b, h, hkv, length, d = 1, 4, 2, 27, 16
    q, k, v, u, do = _inputs(b, h, hkv, length, length, d, torch.float32)
    got = _run(sparsek_attention_triton, q, k, v, u, do, 20, 8)
    kk = k.repeat_interleave(h // hkv, 1)
    vv = v.repeat_interleave(h // hkv, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    assert torch.allclose(got[0], dense, atol=2e-5)
    assert (got[4] == 0).all(), "all gates are 1: no gradient to the scores"


def test_fp16_flash_rule():
    b, h, hkv, length, d, topk, window = 1, 4, 1, 35, 32, 6, 5
    q, k, v, u, do = _inputs(b, h, hkv, length, length, d, torch.float16)
    got = _run(sparsek_attention_triton, q, k, v, u, do, topk, window)
    ref16 = _run(sparsek_attention_reference, q, k, v, u, do, topk, window)
    ref64 = _run(sparsek_attention_reference, *(t.double() for t in (q, k, v)), u.double(), do.double(),
                 topk, window)
    for name, a, r, r64 in zip(("out", "dq", "dk", "dv", "dscores"), got, ref16, ref64, strict=True):
        assert a.dtype == r.dtype, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, r64) <= 2 * _rel(r, r64) + 1e-6, (name, _rel(a, r64), _rel(r, r64))


# ---------------------------------------------------------------- GPU (device tool)

gpu = pytest.mark.gpu


def _flash_rule(b, h, hkv, length, d, topk, window, seed, **kw):
    q, k, v, u, do = _inputs(b, h, hkv, length, length, d, torch.bfloat16, device="cuda", seed=seed,
                             score_scale=1.0)
    got = _run(sparsek_attention_triton, q, k, v, u, do, topk, window, **kw)
    refb = _run(sparsek_attention_reference, q, k, v, u, do, topk, window, **kw)
    ref64 = _run(sparsek_attention_reference, *(t.double() for t in (q, k, v)), u.double(), do.double(),
                 topk, window, **kw)
    for name, a, r, r64 in zip(("out", "dq", "dk", "dv", "dscores"), got, refb, ref64, strict=True):
        assert torch.isfinite(a).all(), name
        ek, er = _rel(a, r64), _rel(r, r64)
        print(f"{name}: kernel {ek:.2e} reference-bf16 {er:.2e}")
        assert ek <= 2 * er + 1e-6, (name, ek, er)


@gpu
@pytest.mark.parametrize("g,d", [(1, 64), (3, 128), (4, 128), (8, 96), (16, 64)])
def test_gpu_bf16_flash_rule(g, d):
    _flash_rule(2, 2 * g, 2, 1100, d, 128, 64, seed=g + d, seqlens=torch.tensor([1100, 777], device="cuda"))


@gpu
def test_gpu_bf16_head_dim_256():
    _flash_rule(1, 4, 1, 600, 256, 64, 32, seed=3)


@gpu
def test_gpu_forward_deterministic():
    q, k, v, u, _ = _inputs(1, 8, 2, 3000, 3000, 128, torch.bfloat16, device="cuda", seed=7)
    a = sparsek_attention_triton(q, k, v, u, 256, 128)
    b = sparsek_attention_triton(q, k, v, u, 256, 128)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
