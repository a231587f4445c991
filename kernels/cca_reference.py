"""CCA attention in plain PyTorch (SPEC 2.1-2.3): the reference every kernel must match.

Two ops, kernel-shaped:

* ``cca_pool_reference(q_last, k, v, group)``: one core token per complete group of ``group``
  keys, pooled with the softmax weights of the group's last query, averaged over the query heads
  of each KV head (so cores have ``Hkv`` heads, SPEC 2.1).
* ``cca_attention_reference(q, k, v, k_core, v_core, group, window)``: one softmax over the
  visible cores plus the raw window (SPEC 2.2, floor semantics, 0-based).

``cca_prefill_reference`` composes the two for a full sequence (queries aligned with keys).
Padding and query positions follow the SparseK reference: keys valid for ``j < seqlens[b]``,
query ``i`` at position ``q_offsets[b] + i`` (default ``Lk - Lq``).

Packed documents (``cu_seqlens``, as in the SparseK reference): tokens ``[1, *, T, d]``, document
``n`` holds tokens ``[cu[n], cu[n + 1])`` and has ``(cu[n + 1] - cu[n]) // group`` cores, packed
the same way (``[1, Hkv, sum of those, d]``, document order); :func:`cca_core_queries` picks the
matching pooling queries. Each document behaves exactly like a batch row of its own.

Pure PyTorch on purpose: this file is also shipped inside converted checkpoints.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .sparsek_reference import _check_shapes, key_lengths, packed_bounds, query_positions

_CHUNK_ELEMENTS = 1 << 24


def visible_cores(q_pos: torch.Tensor, group: int, window: int) -> torch.Tensor:
    """``P(i) = floor((i + 1 - s) / g)`` when ``i + 1 > s``, else 0 (true floor division)."""
    return torch.div(q_pos + 1 - window, group, rounding_mode="floor").clamp(min=0)


def packed_core_bounds(bounds: list[int], group: int) -> list[int]:
    """Cumulative core counts of packed documents (document ``n`` has ``length // group`` cores)."""
    out = [0]
    for a, e in zip(bounds, bounds[1:], strict=False):
        out.append(out[-1] + (e - a) // group)
    return out


def cca_core_queries(q: torch.Tensor, group: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The pooling query of every complete group: position ``(n + 1) * group - 1`` of each row, or
    of each packed document (``[1, H, total cores, d]``, document order)."""
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if cu_seqlens is None:
        n = q.shape[2] // group
        return q[:, :, group - 1 : n * group : group]
    bounds = packed_bounds(cu_seqlens, q, q)
    idx = [a + c * group - 1 for a, e in zip(bounds, bounds[1:], strict=False) for c in range(1, (e - a) // group + 1)]
    return q.index_select(2, torch.tensor(idx, dtype=torch.long, device=q.device))


def cca_pool_reference(
    q_last: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core keys and values of the first ``N`` groups (SPEC 2.1).

    Args:
        q_last: ``[B, H, N, d]``, the (RoPE'd) query at position ``(n + 1) * group - 1``.
        k, v: ``[B, Hkv, Lk, d]`` with ``Lk >= N * group``.
        cu_seqlens: packed documents (module docstring): ``q_last`` holds every document's cores
            in order (:func:`cca_core_queries`), ``k``, ``v`` the packed tokens.

    Returns:
        ``(k_core, v_core)``, each ``[B, Hkv, N, d]`` in ``k``'s dtype.
    """
    if cu_seqlens is not None:
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        bounds = packed_bounds(cu_seqlens, k, k)
        cores = packed_core_bounds(bounds, group)
        if q_last.shape[0] != 1 or q_last.shape[2] != cores[-1]:
            raise ValueError(f"packed pooling needs q_last [1, H, {cores[-1]}, d] (one query per core), got {tuple(q_last.shape)}")
        parts = [
            cca_pool_reference(q_last[:, :, c : c + (e - a) // group], k[:, :, a:e], v[:, :, a:e], group, scale)
            for a, e, c in zip(bounds, bounds[1:], cores, strict=False)
        ]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
    b, h, n, d = q_last.shape
    hkv = k.shape[1]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({hkv})")
    if k.shape[2] < n * group:
        raise ValueError(f"{n} groups of {group} need {n * group} keys, got {k.shape[2]}")
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    acc = torch.promote_types(q_last.dtype, torch.float32)
    kg = k[:, :, : n * group].to(acc).reshape(b, hkv, n, group, d)
    vg = v[:, :, : n * group].to(acc).reshape(b, hkv, n, group, d)
    qg = q_last.to(acc).view(b, hkv, g, n, d)
    logits = torch.einsum("bhgnd,bhnjd->bhgnj", qg, kg) * scale
    weights = torch.softmax(logits, dim=-1).mean(dim=2)  # [B, Hkv, N, group]
    k_core = torch.einsum("bhnj,bhnjd->bhnd", weights, kg)
    v_core = torch.einsum("bhnj,bhnjd->bhnd", weights, vg)
    return k_core.to(k.dtype), v_core.to(v.dtype)


def _attend_chunk(q, k, v, k_core, v_core, q_pos, kv_len, group, window, scale):
    b, h, c, d = q.shape
    hkv, lk, n = k.shape[1], k.shape[2], k_core.shape[2]
    g = h // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qp = q_pos[:, :, None]  # [B, C, 1]
    q_ok = ((q_pos >= 0) & (q_pos < kv_len[:, None]))[:, :, None]
    p = visible_cores(q_pos, group, window)[:, :, None]
    j = torch.arange(lk, device=q.device)
    raw_vis = (j >= p * group) & (j <= qp) & (j < kv_len[:, None, None]) & q_ok
    core_vis = (torch.arange(n, device=q.device) < p) & q_ok
    visible = torch.cat([core_vis, raw_vis], dim=-1)[:, None, None]  # [B, 1, 1, C, N + Lk]
    keys = torch.cat([k_core, k], dim=2).to(acc)
    values = torch.cat([v_core, v], dim=2).to(acc)
    qg = q.to(acc).view(b, hkv, g, c, d)
    logits = torch.einsum("bhgcd,bhjd->bhgcj", qg, keys) * scale
    logits = logits.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(-1, keepdim=True)
    logits = torch.where(any_visible, logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, dim=-1) * visible
    out = torch.einsum("bhgcj,bhjd->bhgcd", probs, values)
    return out.reshape(b, h, c, d).to(q.dtype)


def cca_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_core: torch.Tensor,
    v_core: torch.Tensor,
    group: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
    q_offsets: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One softmax over ``[visible cores ; visible raw keys]`` (SPEC 2.2-2.3).

    ``k_core``/``v_core`` ``[B, Hkv, N, d]`` are the cores of groups ``0..N-1``; a query uses
    those with ``n < P(i)`` (the caller must provide at least ``max P(i)`` of them). Packed
    (``cu_seqlens``): exactly ``length // group`` cores per document, packed in document order.
    """
    _check_shapes(q, k, v)
    if group < 1 or window < 1:
        raise ValueError(f"group and window must be >= 1, got group={group}, window={window}")
    if cu_seqlens is not None:
        bounds = packed_bounds(cu_seqlens, q, k, seqlens, q_offsets)
        cores = packed_core_bounds(bounds, group)
        check_packed_cores(k, k_core, v_core, cores[-1])
        docs = [
            cca_attention_reference(
                q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], k_core[:, :, c : c + (e - a) // group],
                v_core[:, :, c : c + (e - a) // group], group, window, scale,
            )
            for a, e, c in zip(bounds, bounds[1:], cores, strict=False)
        ]
        return torch.cat(docs, dim=2)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q_pos = query_positions(b, lq, lk, q_offsets, q.device)
    kv_len = key_lengths(b, lk, seqlens, q.device)
    width = lk + k_core.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * max(width, 1)))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_core, v_core))
    outs = []
    for c0 in range(0, lq, chunk):
        args = (q[:, :, c0 : c0 + chunk], k, v, k_core, v_core, q_pos[:, c0 : c0 + chunk], kv_len, group, window, scale)
        if needs_grad and lq > chunk:
            outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
        else:
            outs.append(_attend_chunk(*args))
    return torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, d)


def check_packed_cores(k: torch.Tensor, k_core: torch.Tensor, v_core: torch.Tensor, total: int) -> None:
    if k_core.shape != (1, k.shape[1], total, k.shape[3]) or v_core.shape != k_core.shape:
        raise ValueError(
            f"packed cores must be [1, Hkv, {total}, d] (length // group per document), "
            f"got {tuple(k_core.shape)}, {tuple(v_core.shape)}"
        )


def cca_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """CCA over a whole sequence whose queries are aligned with its keys (``Lq == Lk``)."""
    if q.shape[2] != k.shape[2]:
        raise ValueError("cca_prefill needs queries aligned with keys (Lq == Lk)")
    if group < 1 or window < 1:
        raise ValueError(f"group and window must be >= 1, got group={group}, window={window}")
    q_last = cca_core_queries(q, group, cu_seqlens)
    k_core, v_core = cca_pool_reference(q_last, k, v, group, scale, cu_seqlens)
    return cca_attention_reference(q, k, v, k_core, v_core, group, window, scale, seqlens, cu_seqlens=cu_seqlens)
