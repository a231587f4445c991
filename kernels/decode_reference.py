"""Attention against a bounded generation cache, in plain PyTorch (SPEC 1.5, 2.4).

Three ops that know no model:

* ``gated_decode_attention_reference``: the decode step. Every query of a row attends to the
  same list of cache *slots* (``M`` per KV head), each with a gate (SparseK: 1 on the window, the
  SPARSEK ``p`` on the top-k; CCA: all 1) and a validity bit. One softmax over the valid slots,
  gates applied to the values (SPEC 1.4). The Triton kernel in ``decode_triton.py`` has the same
  signature.
* ``sparsek_chunk_attention_reference`` / ``cca_chunk_attention_reference``: a chunk of new
  queries against the cache plus the chunk itself, with *explicit* key positions (the cache holds
  keys from scattered positions, so "index = position" no longer holds). Used to continue a
  non-empty cache with more than one token (chunked prefill, a chat turn); memory is bounded by
  the chunk, not by the context.
* ``capped_simplex_threshold``: the SPARSEK threshold ``tau`` by sorting, with static shapes and
  no host synchronisation, so the cache update can be captured in a CUDA graph.

Pure PyTorch: kernels never import the runtime.
"""

from __future__ import annotations

import torch

from .sparsek_projection import sparsek_project
from .sparsek_reference import topk_mask

_CHUNK_ELEMENTS = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gated_decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor | None,
    valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One softmax over the valid cache slots, gates on the values.

    Args:
        q: ``[B, H, Lq, d]`` (``Lq`` is 1 when decoding; every query sees the same slots).
        k, v: ``[B, Hkv, M, d]`` cache slots.
        gates: ``[B, Hkv, M]`` float32, or ``None`` for all-ones (CCA).
        valid: ``[B, Hkv, M]`` bool; invalid slots take no part. A row with no valid slot outputs 0.

    Returns:
        ``[B, H, Lq, d]`` in ``q``'s dtype (math in float32, float64 for float64 input).
    """
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    if h % hkv or v.shape != k.shape or valid.shape != k.shape[:3]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, valid {tuple(valid.shape)}")
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    qg = q.to(acc).reshape(b, hkv, g, lq, d)
    logits = torch.einsum("bhgqd,bhmd->bhgqm", qg, k.to(acc)) * scale
    vis = valid[:, :, None, None, :]
    logits = logits.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)
    logits = torch.where(any_vis, logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, dim=-1) * vis
    if gates is not None:
        probs = probs * gates[:, :, None, None, :].to(acc)
    out = torch.einsum("bhgqm,bhmd->bhgqd", probs, v.to(acc))
    return out.reshape(b, h, lq, d).to(q.dtype)


@torch.no_grad()
def capped_simplex_threshold(z: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """``tau`` of ``SPARSEK(z, k)`` over the valid entries of the last dimension, exactly.

    ``f(t) = sum_j clip(z_j - t, 0, 1)`` is piecewise linear with breakpoints ``z_j`` and
    ``z_j - 1``. Evaluating it at every breakpoint (sorted values, prefix sums, searchsorted)
    finds the segment where it crosses ``k``; on that segment it is linear, so ``tau`` follows in
    closed form. Values are shifted by the row maximum and summed in float64, because scores carry
    ``alpha * position`` and reach 10^5 (float32 prefix sums would lose the fractional part).
    Static shapes, no ``.item()``: safe inside CUDA-graph capture.

    Returns ``tau`` ``[...]`` in float64; ``-inf`` where at most ``k`` entries are valid.
    """
    if z.shape[-1] == 0:
        return torch.full(z.shape[:-1], float("-inf"), dtype=torch.float64, device=z.device)
    n = z.shape[-1]
    zd = z.to(torch.float64)
    neg = torch.full((), float("-inf"), dtype=torch.float64, device=z.device)  # no host copy: capturable
    zm = torch.where(valid, zd, neg)
    top = zm.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    zs = zm - shift  # valid entries <= 0, invalid -inf
    desc = torch.sort(zs, dim=-1, descending=True).values
    asc = desc.flip(-1).contiguous()
    csum = torch.cat([torch.zeros_like(desc[..., :1]), torch.where(torch.isfinite(desc), desc, 0).cumsum(-1)], -1)

    def count_ge(x: torch.Tensor) -> torch.Tensor:  # number of entries >= x
        return n - torch.searchsorted(asc, x.contiguous(), right=False)

    def count_gt(x: torch.Tensor) -> torch.Tensor:  # number of entries > x
        return n - torch.searchsorted(asc, x.contiguous(), right=True)

    def f_at(t: torch.Tensor, a: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
        sums = csum.gather(-1, bb) - csum.gather(-1, a)
        return a.to(torch.float64) + sums - (bb - a).to(torch.float64) * t

    breaks = torch.cat([desc, desc - 1], dim=-1)
    finite = torch.isfinite(breaks)
    bpts = torch.where(finite, breaks, torch.zeros_like(breaks))
    fb = f_at(bpts, count_ge(bpts + 1), count_gt(bpts))
    ok = finite & (fb >= k)
    t_lo = torch.where(ok, bpts, neg).amax(-1, keepdim=True)
    t_lo_f = torch.where(torch.isfinite(t_lo), t_lo, torch.zeros_like(t_lo))
    pos_inf = torch.full((), float("inf"), dtype=torch.float64, device=z.device)
    t_hi = torch.where(finite & (fb < k) & (bpts > t_lo_f), bpts, pos_inf).amin(-1, keepdim=True)
    t_hi = torch.where(torch.isfinite(t_hi), t_hi, t_lo_f + 1)
    # which entries are 1 / fractional on (t_lo, t_hi): decided at the midpoint, so that
    # rounding in "breakpoint + 1" cannot move an entry across the segment's ends
    mid = 0.5 * (t_lo_f + t_hi)
    a = count_ge(mid + 1)
    bb = count_gt(mid)
    nf = (bb - a).to(torch.float64)
    sums = csum.gather(-1, bb) - csum.gather(-1, a)
    tau = torch.where(nf > 0, (a.to(torch.float64) + sums - k) / nf.clamp(min=1), t_lo_f)
    tau = (tau + shift).squeeze(-1)
    count = valid.sum(-1)
    return torch.where(count > k, tau, torch.full_like(tau, float("-inf")))


def sort_by_position(pos: torch.Tensor, valid: torch.Tensor, *tensors: torch.Tensor):
    """Sort keys by position (invalid last) so that index order is position order."""
    big = torch.iinfo(torch.long).max
    order = torch.argsort(torch.where(valid, pos, torch.full_like(pos, big)), dim=-1, stable=True)
    out = []
    for t in tensors:
        idx = order
        while idx.dim() < t.dim():
            idx = idx[..., None]
        out.append(torch.gather(t, order.dim() - 1, idx.expand(*order.shape, *t.shape[order.dim():])))
    return (torch.gather(pos, -1, order), torch.gather(valid, -1, order), *out)


def sparsek_chunk_attention_reference(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scores: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    topk: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """SparseK attention of a chunk of queries over keys with explicit positions (SPEC 1.2-1.4).

    Args:
        q: ``[B, H, C, d]``; ``q_pos`` ``[B, C]`` (long, negative: a padding query, outputs 0).
        k, v: ``[B, Hkv, N, d]``; ``scores`` ``[B, Hkv, N]``; ``k_pos`` ``[B, Hkv, N]`` (long);
            ``k_valid`` ``[B, Hkv, N]``. Score-only entries (candidates that can never be
            selected again but still count for ``tau``) may carry any K/V.

    Query at position ``p`` sees window keys ``p - w < pos <= p`` (gate 1) and the top-k of the
    candidates ``pos <= p - w`` (ties toward the newer key), gated by SPARSEK over all candidates.
    """
    b, h, c, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    k_pos, k_valid, k, v, scores = sort_by_position(k_pos, k_valid, k, v, scores)
    z_all = scores.float() if scores.dtype not in (torch.float32, torch.float64) else scores
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * max(n, 1)))
    outs = []
    for c0 in range(0, c, chunk):
        qp = q_pos[:, c0 : c0 + chunk]  # [B, c]
        cc = qp.shape[1]
        qpe = qp[:, None, :, None]  # [B, 1, c, 1]
        kp = k_pos[:, :, None, :]  # [B, Hkv, 1, N]
        kv_ok = k_valid[:, :, None, :] & (qpe >= 0)
        in_window = kv_ok & (kp <= qpe) & (kp > qpe - window)
        cand = kv_ok & (kp <= qpe - window)
        z = z_all[:, :, None, :].expand(-1, -1, cc, -1)
        p = sparsek_project(z.detach(), topk, cand)
        selected = topk_mask(z.detach(), cand, topk)
        gates = torch.where(in_window, torch.ones_like(p), torch.where(selected, p, torch.zeros_like(p)))
        visible = (in_window | selected)[:, :, None]  # [B, Hkv, 1, c, N]
        qg = q[:, :, c0 : c0 + chunk].to(acc).reshape(b, hkv, g, cc, d)
        logits = torch.einsum("bhgcd,bhnd->bhgcn", qg, k.to(acc)) * scale
        logits = logits.masked_fill(~visible, float("-inf"))
        any_vis = visible.any(-1, keepdim=True)
        logits = torch.where(any_vis, logits, torch.zeros_like(logits))
        probs = torch.softmax(logits, dim=-1) * visible * gates[:, :, None].to(acc)
        out = torch.einsum("bhgcn,bhnd->bhgcd", probs, v.to(acc))
        outs.append(out.reshape(b, h, cc, d).to(q.dtype))
    return torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, d)


def cca_visible_cores(pos: torch.Tensor, group: int, window: int) -> torch.Tensor:
    """``P(i) = floor((i + 1 - s) / g)`` when ``i + 1 > s``, else 0 (SPEC 2.2)."""
    return torch.div(pos + 1 - window, group, rounding_mode="floor").clamp(min=0)


def cca_chunk_attention_reference(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_core: torch.Tensor,
    v_core: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    group: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """CCA attention of a chunk of queries over cores plus raw keys with explicit positions.

    Args:
        q: ``[B, H, C, d]``; ``q_pos`` ``[B, C]`` (negative: padding query, outputs 0).
        k_core, v_core: ``[B, Hkv, Nc, d]``, core ``n`` is group ``n``; the caller must have
            pooled every core a query needs (``n < P(max q_pos)``).
        k, v: ``[B, Hkv, N, d]`` raw keys; ``k_pos``/``k_valid`` ``[B, N]``.

    Query at ``p`` sees cores ``n < P(p)`` and raw keys with ``P(p) * g <= pos <= p`` (SPEC 2.2).
    """
    b, h, c, d = q.shape
    hkv, nc = k.shape[1], k_core.shape[2]
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    keys = torch.cat([k_core, k], dim=2).to(acc)
    values = torch.cat([v_core, v], dim=2).to(acc)
    width = keys.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * max(width, 1)))
    core_idx = torch.arange(nc, device=q.device)
    outs = []
    for c0 in range(0, c, chunk):
        qp = q_pos[:, c0 : c0 + chunk]
        cc = qp.shape[1]
        pc = cca_visible_cores(qp, group, window)[:, :, None]  # [B, c, 1]
        q_ok = (qp >= 0)[:, :, None]
        core_vis = (core_idx < pc) & q_ok
        kp = k_pos[:, None, :]
        raw_vis = k_valid[:, None, :] & (kp >= pc * group) & (kp <= qp[:, :, None]) & q_ok
        visible = torch.cat([core_vis, raw_vis], dim=-1)[:, None, None]  # [B, 1, 1, c, Nc + N]
        qg = q[:, :, c0 : c0 + chunk].to(acc).reshape(b, hkv, g, cc, d)
        logits = torch.einsum("bhgcd,bhnd->bhgcn", qg, keys) * scale
        logits = logits.masked_fill(~visible, float("-inf"))
        any_vis = visible.any(-1, keepdim=True)
        logits = torch.where(any_vis, logits, torch.zeros_like(logits))
        probs = torch.softmax(logits, dim=-1) * visible
        out = torch.einsum("bhgcn,bhnd->bhgcd", probs, values)
        outs.append(out.reshape(b, h, cc, d).to(q.dtype))
    return torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, d)
