"""The split-K decode kernel against its PyTorch reference (TRITON_INTERPRET=1 on CPU), and the
exact SPARSEK threshold used by the caches against the bisection one."""

import pytest
import torch

from sparsek.kernels import gated_decode_attention, sparsek_threshold
from sparsek.kernels.decode_reference import capped_simplex_threshold, gated_decode_attention_reference
from sparsek.kernels.decode_triton import gated_decode_attention_triton

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(b, h, hkv, m, d, dtype, seed=0, gates=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, m, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, m, d, generator=g).to(dtype)
    gt = torch.rand(b, hkv, m, generator=g) if gates else None
    valid = torch.rand(b, hkv, m, generator=g) > 0.3
    return q, k, v, gt, valid


SHAPES = [  # (B, H, Hkv, M, d): odd slot counts, GQA groups 1..8, non power-of-two head dims
    (1, 4, 2, 37, 16),
    (2, 8, 1, 130, 24),
    (3, 3, 3, 5, 8),
    (1, 16, 2, 200, 64),
    (2, 8, 8, 67, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, dtype):
    q, k, v, gt, valid = _case(*shape, dtype)
    valid[0, 0] = False  # a (row, head) with no valid slot outputs zeros
    exact = gated_decode_attention_reference(q.double(), k.double(), v.double(), None if gt is None else gt.double(), valid)
    out = gated_decode_attention_triton(q, k, v, gt, valid)
    torch_same_dtype = gated_decode_attention_reference(q, k, v, gt, valid)
    err_kernel = (out.double() - exact).abs().max().item()
    err_torch = (torch_same_dtype.double() - exact).abs().max().item()
    g = shape[1] // shape[2]
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.all(out[0, :g] == 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert err_kernel <= max(2 * err_torch, tol), (err_kernel, err_torch)


def test_kernel_without_gates_and_several_queries():
    q, k, v, _, valid = _case(2, 4, 2, 45, 16, torch.float32, seed=3, gates=False)
    q = torch.randn(2, 4, 3, 16)
    out = gated_decode_attention_triton(q, k, v, None, valid)
    ref = gated_decode_attention_reference(q, k, v, None, valid)
    assert torch.allclose(out, ref, atol=1e-5)


def test_reference_equals_dense_softmax_when_all_valid_and_gates_one():
    q, k, v, _, _ = _case(1, 4, 2, 19, 8, torch.float64)
    valid = torch.ones(1, 2, 19, dtype=torch.bool)
    out = gated_decode_attention_reference(q, k, v, torch.ones(1, 2, 19, dtype=torch.float64), valid)
    kk = k.repeat_interleave(2, dim=1)
    vv = v.repeat_interleave(2, dim=1)
    dense = torch.softmax(q @ kk.transpose(-1, -2) / 8**0.5, -1) @ vv
    assert torch.allclose(out, dense, atol=1e-12)


def test_dispatch_uses_reference_on_cpu():
    q, k, v, gt, valid = _case(1, 2, 1, 9, 8, torch.float32)
    assert torch.equal(gated_decode_attention(q, k, v, gt, valid), gated_decode_attention_reference(q, k, v, gt, valid))


@pytest.mark.parametrize("n,k", [(10, 3), (57, 8), (5, 8), (300, 16), (9, 9)])
def test_exact_threshold_matches_bisection(n, k):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(3, 4, n, generator=g, dtype=torch.float64) * 2 + torch.arange(n) / 16
    valid = torch.rand(3, 4, n, generator=g) > 0.2
    a = sparsek_threshold(z, k, valid)
    b = capped_simplex_threshold(z, valid, k)
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b))
    # tau is not unique where f is flat at k; the projection p is
    pa = (z - a[..., None]).clamp(0, 1) * valid
    p = (z - b[..., None]).clamp(0, 1) * valid
    assert torch.allclose(pa[fin], p[fin], atol=1e-9)
    assert torch.allclose(p.sum(-1)[fin], torch.full_like(p.sum(-1)[fin], float(k)), atol=1e-9)


def test_exact_threshold_keeps_precision_at_large_positions():
    # scores carry alpha * position: at 10^6 positions float32 prefix sums would lose the band
    z = (1_000_000 + torch.arange(5000, dtype=torch.float32)) / 16
    valid = torch.ones_like(z, dtype=torch.bool)
    tau = capped_simplex_threshold(z, valid, 64)
    p = (z.double() - tau).clamp(0, 1)
    assert abs(p.sum().item() - 64) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_on_gpu(dtype):
    q, k, v, gt, valid = (t.cuda() if t is not None else None for t in _case(1, 32, 8, 2560, 128, dtype))
    exact = gated_decode_attention_reference(q.double(), k.double(), v.double(), gt.double(), valid)
    out = gated_decode_attention_triton(q, k, v, gt, valid)
    ref = gated_decode_attention_reference(q, k, v, gt, valid)
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-3
