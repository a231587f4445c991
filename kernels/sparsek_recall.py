"""Selection recall of SparseK (SPEC 1.6), plain PyTorch, chunked over queries.

``r_i = sum_{j in S_i} a_dense[i, j] / sum_{j in C_i} a_dense[i, j]`` per KV head, with the dense
causal attention probabilities summed over the G query heads of the group: the share of the
dense attention on old keys that the top-k keeps. Queries with at most ``k`` candidates keep
everything (``r = 1``) and are flagged as not informative.
"""

from __future__ import annotations

import torch

from .sparsek_reference import key_lengths, query_positions, topk_mask

_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def sparsek_selection_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    scores: torch.Tensor,
    topk: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall per query and KV head.

    Args:
        q: ``[B, H, L, d]``; k: ``[B, Hkv, L, d]`` (queries aligned with keys); scores ``[B, Hkv, L]``.

    Returns:
        ``recall [B, Hkv, L]`` (float32) and ``informative [B, Hkv, L]`` (bool: the query has more
        than ``k`` candidates and non-zero dense mass on them).
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    q_pos = query_positions(b, lq, lk, None, q.device)
    kv_len = key_lengths(b, lk, seqlens, q.device)
    j = torch.arange(lk, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * lk))
    recalls, flags = [], []
    for c0 in range(0, lq, chunk):
        qp = q_pos[:, c0 : c0 + chunk, None]
        causal = (j <= qp) & (j < kv_len[:, None, None]) & (qp < kv_len[:, None, None])  # [B, C, Lk]
        cand = causal & (j <= qp - window)
        qc = q[:, :, c0 : c0 + chunk].float().view(b, hkv, g, -1, d)
        logits = torch.einsum("bhgcd,bhjd->bhgcj", qc, k.float()) * scale
        logits = logits.masked_fill(~causal[:, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)  # [B, Hkv, C, Lk]
        candm = cand[:, None].expand_as(probs)
        z = scores.float()[:, :, None, :].expand_as(probs)
        sel = topk_mask(z, candm, topk)
        mass_c = (probs * candm).sum(-1)
        mass_s = (probs * sel).sum(-1)
        informative = (candm.sum(-1) > topk) & (mass_c > 0)
        recalls.append(torch.where(informative, mass_s / mass_c.clamp(min=1e-30), torch.ones_like(mass_c)))
        flags.append(informative)
    return torch.cat(recalls, dim=2), torch.cat(flags, dim=2)
