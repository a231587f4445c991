"""SparseK attention in plain PyTorch (SPEC 1.2-1.4): the reference every kernel must match.

Layout (kernel-shaped, tensors in and out):

* ``q``: ``[B, H, Lq, d]``; ``k``, ``v``: ``[B, Hkv, Lk, d]``; ``scores``: ``[B, Hkv, Lk]`` (the
  scorer's ``u``, float32);
* keys of row ``b`` are valid for ``j < seqlens[b]`` (right padding; ``None``: all valid);
* query ``i`` of row ``b`` sits at position ``q_offsets[b] + i`` (``None``: ``Lk - Lq``, i.e. the
  queries are the last ``Lq`` keys). A query whose position is outside ``[0, seqlens[b])`` sees
  nothing and outputs zeros;
* packed documents (``cu_seqlens``, int ``[N + 1]``, cumulative lengths as in flash-attention's
  varlen API): ``q`` ``[1, H, T, d]``, ``k``, ``v`` ``[1, Hkv, T, d]``, ``scores`` ``[1, Hkv, T]``;
  document ``n`` holds tokens ``[cu[n], cu[n + 1])`` and behaves exactly like a batch row of its
  own (queries == keys, causal); nothing crosses a document boundary. Excludes ``seqlens`` and
  ``q_offsets``. The reference simply runs each document alone.

Queries are processed in chunks, so memory is ``O(chunk x Lk)`` rather than ``O(Lq x Lk)``; when
gradients are needed each chunk is recomputed in the backward pass (activation checkpointing), so
training memory is bounded the same way.

Pure PyTorch on purpose: this file is also shipped inside converted checkpoints.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .sparsek_projection import sparsek_project

# Elements of one [B, H, chunk, Lk] block of logits; sets the query chunk size.
_CHUNK_ELEMENTS = 1 << 24


def query_positions(
    batch: int, lq: int, lk: int, q_offsets: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Absolute position of every query, ``[B, Lq]`` (see the module docstring)."""
    base = torch.arange(lq, device=device)
    if q_offsets is None:
        return (base + (lk - lq)).expand(batch, lq)
    return q_offsets.to(device=device, dtype=torch.long)[:, None] + base


def key_lengths(batch: int, lk: int, seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if seqlens is None:
        return torch.full((batch,), lk, dtype=torch.long, device=device)
    return seqlens.to(device=device, dtype=torch.long)


def packed_bounds(
    cu_seqlens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    seqlens: torch.Tensor | None = None,
    q_offsets: torch.Tensor | None = None,
) -> list[int]:
    """Check a packed batch (see the module docstring) and return ``cu_seqlens`` as Python ints.

    One host copy of ``N + 1`` integers: the kernels size their grids from it.
    """
    if seqlens is not None or q_offsets is not None:
        raise ValueError("cu_seqlens excludes seqlens and q_offsets: packed documents carry their own lengths")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be a 1D integer tensor [N + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if q.shape[0] != 1 or k.shape[0] != 1 or q.shape[2] != k.shape[2]:
        raise ValueError(f"packed documents need q [1, H, T, d] and k [1, Hkv, T, d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != q.shape[2] or any(b < a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cu_seqlens must rise from 0 to the {q.shape[2]} packed tokens, got {bounds}")
    return bounds


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` candidates with the largest score, ties broken toward the larger index.

    ``scores`` ``[..., n]`` and ``candidates`` (bool, same shape); rows with at most ``k``
    candidates select all of them.
    """
    n = scores.shape[-1]
    count = candidates.sum(-1, keepdim=True)
    if n == 0:
        return candidates.clone()
    masked = scores.masked_fill(~candidates, float("-inf"))
    kk = min(k, n)
    theta = torch.topk(masked, kk, dim=-1).values[..., kk - 1 : kk]
    above = candidates & (masked > theta)
    tied = candidates & (masked == theta)
    need = k - above.sum(-1, keepdim=True)
    # Number of tied entries at this index or later: keep the `need` newest ones.
    from_right = tied.flip(-1).cumsum(-1).flip(-1)
    chosen = above | (tied & (from_right <= need))
    return torch.where(count <= k, candidates, chosen)


def sparsek_select(
    scores: torch.Tensor,
    q_pos: torch.Tensor,
    kv_len: torch.Tensor,
    topk: int,
    window: int,
    differentiable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window, selection and gates for a block of queries (SPEC 1.2-1.3).

    Args:
        scores: ``[B, Hkv, Lk]`` float scores ``u``.
        q_pos: ``[B, C]`` query positions.
        kv_len: ``[B]`` number of valid keys per row.

    Returns:
        ``window_mask [B, 1, C, Lk]``, ``selected [B, Hkv, C, Lk]`` (bool) and the gates
        ``[B, Hkv, C, Lk]`` (1 on the window, the SPARSEK ``p`` on the selection, 0 elsewhere).
    """
    lk = scores.shape[-1]
    j = torch.arange(lk, device=scores.device)
    qp = q_pos[:, :, None]
    q_ok = (q_pos >= 0) & (q_pos < kv_len[:, None])
    causal = (j <= qp) & (j < kv_len[:, None, None]) & q_ok[:, :, None]
    in_window = causal & (j > qp - window)
    candidate = causal & (j <= qp - window)

    z = scores.float() if scores.dtype not in (torch.float32, torch.float64) else scores
    z = z[:, :, None, :].expand(-1, -1, q_pos.shape[1], -1)
    cand = candidate[:, None].expand_as(z)
    if not differentiable:
        z = z.detach()
    p = sparsek_project(z, topk, cand)
    selected = topk_mask(z.detach(), cand, topk)
    gates = torch.where(in_window[:, None], torch.ones_like(p), torch.where(selected, p, torch.zeros_like(p)))
    return in_window[:, None], selected, gates


def _attend_chunk(q, k, v, scores, q_pos, kv_len, topk, window, scale):
    b, h, c, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    in_window, selected, gates = sparsek_select(scores, q_pos, kv_len, topk, window)
    visible = (in_window | selected)[:, :, None]  # [B, Hkv, 1, C, Lk]
    qg = q.to(acc).view(b, hkv, g, c, d)
    logits = torch.einsum("bhgcd,bhjd->bhgcj", qg, k.to(acc)) * scale
    logits = logits.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(-1, keepdim=True)
    logits = torch.where(any_visible, logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, dim=-1) * visible
    weights = probs * gates[:, :, None].to(acc)
    out = torch.einsum("bhgcj,bhjd->bhgcd", weights, v.to(acc))
    return out.reshape(b, h, c, d).to(q.dtype)


def sparsek_attention_reference(
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
    """SparseK attention (SPEC 1.4): one softmax over window and top-k, gates on the values.

    Returns ``[B, H, Lq, d]`` in ``q``'s dtype; math runs in float32 (float64 for float64 input).
    With ``cu_seqlens`` every packed document is run alone (obviously correct, not fast).
    """
    _check_shapes(q, k, v)
    if scores.shape != k.shape[:3]:
        raise ValueError(f"scores must be [B, Hkv, Lk] = {tuple(k.shape[:3])}, got {tuple(scores.shape)}")
    if topk < 1 or window < 1:
        raise ValueError(f"topk and window must be >= 1, got topk={topk}, window={window}")
    if cu_seqlens is not None:
        bounds = packed_bounds(cu_seqlens, q, k, seqlens, q_offsets)
        docs = [
            sparsek_attention_reference(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], scores[:, :, a:e], topk, window, scale)
            for a, e in zip(bounds, bounds[1:], strict=False)
        ]
        return torch.cat(docs, dim=2)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q_pos = query_positions(b, lq, lk, q_offsets, q.device)
    kv_len = key_lengths(b, lk, seqlens, q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * max(lk, 1)))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, scores))
    outs = []
    for c0 in range(0, lq, chunk):
        args = (q[:, :, c0 : c0 + chunk], k, v, scores, q_pos[:, c0 : c0 + chunk], kv_len, topk, window, scale)
        if needs_grad and lq > chunk:
            outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
        else:
            outs.append(_attend_chunk(*args))
    return torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, d)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,H,Lq,d] and k, v [B,Hkv,Lk,d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} (H must be a multiple of Hkv)")
