"""The scorer loss of SPEC 1.6, plain PyTorch, chunked over queries.

Why it exists: the SPARSEK gates (SPEC 1.3) give the scorer a gradient only through candidates in
the fractional band around ``tau_i``. A key far below the band gets none, however much attention
the dense model gives it, so the language-model loss alone teaches the scorer slowly. This loss
is a direct signal: for sampled queries ``i`` (per KV head),

* the labels are the dense top-k: the ``k`` candidates ``j in C_i`` (``j <= i - w``) with the
  largest dense attention mass, summed over the G query heads of the group (SPEC 1.6);
* ``theta_i`` is the current ``k``-th largest score ``u`` among the candidates, detached;
* the loss is logistic on ``u_j - theta_i``: positives are pushed above ``theta_i``, negatives
  below it. Positives and negatives are averaged separately (balanced), because a query has
  ``k`` positives but may have many more negatives, which would otherwise dominate.
* positives are weighted by their share of the positives' dense mass, not uniformly. Recall
  (SPEC 1.6) is a mass-weighted quantity: a few keys (the attention sink at position 0 above
  all) hold most of the old-key mass, while most of the dense top-k are low-mass keys that differ
  from query to query, which a query-independent scorer cannot fit. With uniform weights that
  noise dominates the gradient: on SmolLM2-135M (k=256, w=256, 2048 tokens, scorer-only fit of
  the captured dense q/k, 40 AdamW steps) recall stayed at 0.16-0.17 and the sink was kept for
  at most 8% of the queries; with mass weights it rose to 0.83-0.90 (scorer lr 1e-1, or alpha
  1/256), sink kept for 75-95% (docs/adapt.md has the table).

Queries with at most ``k`` candidates select everything and contribute nothing. The dense
probabilities are computed without gradient (``q`` and ``k`` are only read), the gradient
flows into ``scores`` only. Memory is one ``[B, H, chunk, Lk]`` block: never ``L x L`` for long L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparsek_reference import key_lengths, topk_mask

_CHUNK_ELEMENTS = 1 << 24


def sparsek_scorer_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    scores: torch.Tensor,
    topk: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Balanced logistic loss of the scores against the dense top-k (positives weighted by their
    dense mass), and the number of queries used.

    Args:
        q: ``[B, H, L, d]`` and k: ``[B, Hkv, L, d]``, the dense model's projections after RoPE
            (queries aligned with keys; right padding through ``seqlens``).
        scores: ``[B, Hkv, L]``, the scorer's ``u`` (float32, carries the gradient).
        query_index: positions of the sampled queries, ``[Q]`` (shared by the batch rows);
            ``None`` uses every query.

    Returns:
        ``(loss, n)``: the mean over informative (row, KV head, query) triples of the balanced
        loss, a scalar that is 0 (still attached to ``scores``) when ``n == 0``.
    """
    if q.dim() != 4 or k.dim() != 4 or scores.shape != k.shape[:3]:
        raise ValueError(f"expected q [B,H,L,d], k [B,Hkv,L,d], scores [B,Hkv,L]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(scores.shape)}")
    if topk < 1 or window < 1:
        raise ValueError(f"topk and window must be >= 1, got topk={topk}, window={window}")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if lq != lk or h % hkv:
        raise ValueError(f"queries must align with keys and H must be a multiple of Hkv: {tuple(q.shape)} vs {tuple(k.shape)}")
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    device = q.device
    if query_index is None:
        query_index = torch.arange(lq, device=device)
    query_index = query_index.to(device=device, dtype=torch.long)
    kv_len = key_lengths(b, lk, seqlens, device)
    j = torch.arange(lk, device=device)
    u = scores.float()
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * lk))
    total = u.sum() * 0.0
    count = 0
    kf = k.detach().float()
    for c0 in range(0, query_index.numel(), chunk):
        qi = query_index[c0 : c0 + chunk]  # [C]
        qp = qi[None, :, None]  # [1, C, 1]
        valid_q = qi[None, :] < kv_len[:, None]  # [B, C]
        causal = (j <= qp) & (j < kv_len[:, None, None]) & valid_q[:, :, None]  # [B, C, Lk]
        cand = causal & (j <= qp - window)
        with torch.no_grad():
            qc = q[:, :, qi].detach().float().view(b, hkv, g, -1, d)
            logits = torch.einsum("bhgcd,bhjd->bhgcj", qc, kf) * scale
            logits = logits.masked_fill(~causal[:, None, None], float("-inf"))
            mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)  # [B, Hkv, C, Lk]
            candm = cand[:, None].expand_as(mass)
            informative = candm.sum(-1) > topk  # [B, Hkv, C]
            labels = topk_mask(mass, candm, topk)
            zc = u.detach()[:, :, None, :].expand_as(mass)
            theta = torch.topk(zc.masked_fill(~candm, float("-inf")), min(topk, lk), dim=-1).values[..., -1:]
            theta = torch.where(informative[..., None], theta, torch.zeros_like(theta))
            pos = (labels & candm & informative[..., None]) * mass
            pos = pos / pos.sum(-1, keepdim=True).clamp(min=1e-30)  # mass-weighted positives
            neg = (~labels & candm & informative[..., None]).float()
        margin = u[:, :, None, :] - theta  # [B, Hkv, C, Lk], grad to u only
        pos_loss = (F.softplus(-margin) * pos).sum(-1)
        neg_loss = (F.softplus(margin) * neg).sum(-1) / neg.sum(-1).clamp(min=1)
        per_query = 0.5 * (pos_loss + neg_loss) * informative
        total = total + per_query.sum()
        count += int(informative.sum())
    return total / max(count, 1), count


def sample_queries(length: int, n: int, topk: int, window: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` query positions drawn uniformly among those with more than ``k`` candidates.

    A query at position ``i`` has ``i - w + 1`` candidates, so only ``i >= k + w`` can carry a
    label; drawing elsewhere would waste the budget. Sorted, without repeats; empty when the
    sequence is too short.
    """
    first = topk + window
    if length <= first or n < 1:
        return torch.zeros(0, dtype=torch.long, device=device)
    span = length - first
    if n >= span:
        return torch.arange(first, length, device=device)
    pick = torch.randperm(span, generator=generator)[:n].sort().values + first
    return pick.to(device)
