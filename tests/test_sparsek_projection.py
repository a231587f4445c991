"""SPARSEK operator (SPEC 1.3): exact threshold, sum of gates, gradient, monotone tau."""

import pytest
import torch

from sparsek.kernels import sparsek_project, sparsek_threshold

from .spec_oracle import sparsek_exact


@pytest.mark.parametrize("n,k", [(1, 1), (5, 1), (5, 5), (9, 4), (40, 7), (300, 64)])
def test_matches_exact_projection(n, k):
    torch.manual_seed(n * 31 + k)
    z = torch.randn(3, n, dtype=torch.float64) * 3
    p = sparsek_project(z, k)
    for row in range(3):
        expected = torch.tensor(sparsek_exact(z[row].tolist(), k), dtype=torch.float64)
        torch.testing.assert_close(p[row], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_gates_sum_to_k_and_lie_in_unit_interval(dtype, tol):
    torch.manual_seed(0)
    z = torch.randn(64, 500, dtype=dtype) * 5 + torch.arange(500, dtype=dtype) / 16
    for k in (1, 17, 256):
        p = sparsek_project(z, k)
        assert torch.allclose(p.sum(-1), torch.full((64,), float(k), dtype=dtype), atol=tol * k)
        assert p.min() >= 0 and p.max() <= 1


def test_large_positions_float32():
    # Scores of keys at positions near 10^6 with alpha = 1/16: tau must still give sum p = k.
    torch.manual_seed(1)
    z = torch.randn(4, 2000) + (10**6 + torch.arange(2000)) / 16
    p = sparsek_project(z, 100)
    assert torch.allclose(p.sum(-1), torch.full((4,), 100.0), atol=0.05)


def test_rows_with_at_most_k_valid_entries_are_all_ones():
    z = torch.randn(2, 10, dtype=torch.float64)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    valid[0, :3] = True  # 3 <= k
    valid[1, :] = False  # empty row
    p = sparsek_project(z, 4, valid)
    assert p[0, :3].eq(1).all() and p[0, 3:].eq(0).all()
    assert p[1].eq(0).all()
    assert torch.isinf(sparsek_threshold(z, 4, valid)).all()


def test_invalid_entries_take_no_part():
    torch.manual_seed(2)
    z = torch.randn(30, dtype=torch.float64)
    valid = torch.rand(30) > 0.3
    p = sparsek_project(z[None], 5, valid[None])[0]
    expected = torch.tensor(sparsek_exact(z[valid].tolist(), 5), dtype=torch.float64)
    torch.testing.assert_close(p[valid], expected, atol=1e-12, rtol=0)
    assert p[~valid].eq(0).all()


def test_gradcheck_float64():
    torch.manual_seed(3)
    z = (torch.randn(4, 23, dtype=torch.float64) * 0.7).requires_grad_()
    valid = torch.rand(4, 23) > 0.2
    assert torch.autograd.gradcheck(lambda x: sparsek_project(x, 6, valid), (z,))


def test_gradient_formula():
    torch.manual_seed(4)
    z = (torch.randn(50, dtype=torch.float64) * 0.5).requires_grad_()
    p = sparsek_project(z, 10)
    dp = torch.randn(50, dtype=torch.float64)
    (p * dp).sum().backward()
    frac = (p > 0) & (p < 1)
    expected = torch.where(frac, dp - dp[frac].mean(), torch.zeros_like(dp))
    torch.testing.assert_close(z.grad, expected)
    assert frac.any() and z.grad[~frac].eq(0).all()


def test_tau_is_monotone_along_a_sequence():
    # tau_i over the prefix C_i = {j <= i - w}: candidates are only added, so tau never decreases.
    torch.manual_seed(5)
    u = torch.randn(400) + torch.arange(400) / 16
    prefix = torch.arange(400)[None] <= torch.arange(400)[:, None]
    tau = sparsek_threshold(u.expand(400, -1), 32, prefix)
    finite = tau[torch.isfinite(tau)]
    assert finite.numel() > 300
    assert (finite[1:] >= finite[:-1] - 1e-5).all()
    assert torch.isinf(tau[:32]).all()


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be >= 1"):
        sparsek_threshold(torch.randn(3, 4), 0)
