"""The SPARSEK operator (SPEC 1.3): Euclidean projection onto the capped simplex.

``SPARSEK(z, k)`` projects ``z`` onto ``{p : 0 <= p <= 1, sum p = k}``; the answer is
``p = clip(z - tau, 0, 1)`` for the unique threshold ``tau`` with ``sum p = k``.

The threshold is found by bisection on the piecewise-linear, non-increasing function
``f(tau) = sum clip(z - tau, 0, 1)`` and then made exact by one closed-form step: once the
bracket has identified which entries are clipped to 1 (set ``U``) and which are fractional
(set ``F``), ``k = |U| + sum_F (z - tau)`` gives ``tau = (|U| + sum_F z - k) / |F|``.

Pure PyTorch on purpose: this file is also shipped inside converted checkpoints, where only
torch and transformers are installed.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def _bisection_steps(dtype: torch.dtype) -> int:
    # Enough halvings to shrink any bracket met in practice (width < 2^20) below the dtype's
    # resolution; the closed-form step afterwards removes the remaining error.
    return 64 if dtype == torch.float64 else 44


@torch.no_grad()
def _threshold_shifted(
    z: torch.Tensor, k: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(shift, tau - shift, big)`` per row, with ``shift`` the row's largest valid score.

    Working relative to the row maximum matters in float32: scores carry ``alpha * j`` with
    positions up to 10^6, and near the maximum ``z - shift`` is exact (Sterbenz), so the
    fractional gates keep full precision instead of the ~4e-3 resolution of the raw scores.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if valid is None:
        valid = torch.ones_like(z, dtype=torch.bool)
    n = z.shape[-1]
    count = valid.sum(-1)
    big = count > k
    if n == 0 or not bool(big.any()):
        zeros = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        return zeros, torch.full_like(zeros, _NEG_INF), big

    kk = min(k, n)
    top = torch.topk(z.masked_fill(~valid, _NEG_INF), kk, dim=-1).values
    shift = torch.where(big, top[..., 0], torch.zeros_like(top[..., 0]))
    zr = (z - shift[..., None]).masked_fill(~valid, 0)
    z_k = top[..., kk - 1] - shift
    # f(z_k - 1) >= k (the k largest each contribute 1) and f(0) = 0 < k.
    lo = torch.where(big, z_k - 1, torch.zeros_like(z_k))
    hi = torch.zeros_like(lo)
    validf = valid.to(z.dtype)
    for _ in range(_bisection_steps(z.dtype)):
        mid = 0.5 * (lo + hi)
        f = ((zr - mid[..., None]).clamp(0, 1) * validf).sum(-1)
        ge = f >= k
        lo = torch.where(ge, mid, lo)
        hi = torch.where(ge, hi, mid)
    tau = 0.5 * (lo + hi)

    # Closed-form refinement on the sets the bracket identified.
    diff = zr - tau[..., None]
    ones = valid & (diff >= 1)
    frac = valid & (diff > 0) & (diff < 1)
    n_frac = frac.sum(-1)
    exact = (ones.sum(-1).to(z.dtype) + (zr * frac).sum(-1) - k) / n_frac.clamp(min=1).to(z.dtype)
    tau = torch.where(n_frac > 0, exact, tau)
    return shift, torch.where(big, tau, torch.full_like(tau, _NEG_INF)), big


def sparsek_threshold(z: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Threshold ``tau`` of SPARSEK over the last dimension of ``z``.

    Args:
        z: scores ``[..., n]`` (float32 or float64).
        k: the budget, ``k >= 1``.
        valid: optional bool mask ``[..., n]``; invalid entries take no part and get ``p = 0``.

    Returns:
        ``tau`` of shape ``[...]``; ``-inf`` for rows with at most ``k`` valid entries (every
        valid ``p`` is then 1).
    """
    shift, tau, _ = _threshold_shifted(z, k, valid)
    return tau + shift


class _SparsekProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, k: int, valid: torch.Tensor | None) -> torch.Tensor:
        shift, tau, _ = _threshold_shifted(z.detach(), k, valid)
        p = ((z - shift[..., None]) - tau[..., None]).clamp(0, 1)
        if valid is not None:
            p = p.masked_fill(~valid, 0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp: torch.Tensor):
        (p,) = ctx.saved_tensors
        frac = ((p > 0) & (p < 1)).to(dp.dtype)
        n_frac = frac.sum(-1, keepdim=True)
        mean = (dp * frac).sum(-1, keepdim=True) / n_frac.clamp(min=1)
        return frac * (dp - mean), None, None


def sparsek_project(z: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``SPARSEK(z, k)`` over the last dimension, differentiable (SPEC 1.3).

    Gradient: with ``F`` the fractional entries (``0 < p < 1``),
    ``dz_j = [j in F] * (dp_j - mean_{l in F} dp_l)``; clipped and invalid entries get none.
    """
    return _SparsekProject.apply(z, k, valid)
