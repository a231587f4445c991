"""One public function per op: CUDA tensors go to the Triton kernels, everything else to the
PyTorch reference with the same signature.

Set ``SPARSEK_FORCE_REFERENCE=1`` to run the reference everywhere (debugging, A/B checks).
"""

from __future__ import annotations

import os

import torch

from .cca_reference import cca_attention_reference, cca_pool_reference, cca_prefill_reference
from .sparsek_reference import sparsek_attention_reference


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("SPARSEK_FORCE_REFERENCE", "0") != "1"


def sparsek_attention(
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
    """SparseK attention (SPEC 1.4); see :func:`sparsek_attention_reference` for the layout
    (padded rows with ``seqlens``/``q_offsets``, or packed documents with ``cu_seqlens``)."""
    if _use_triton(q):
        from .sparsek_triton import sparsek_attention_triton

        return sparsek_attention_triton(q, k, v, scores, topk, window, scale, seqlens, q_offsets, cu_seqlens)
    return sparsek_attention_reference(q, k, v, scores, topk, window, scale, seqlens, q_offsets, cu_seqlens)


def cca_pool(
    q_last: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CCA core tokens (SPEC 2.1); see :func:`cca_pool_reference`."""
    if _use_triton(k):
        from .cca_triton_pool import cca_pool_triton

        return cca_pool_triton(q_last, k, v, group, scale, cu_seqlens)
    return cca_pool_reference(q_last, k, v, group, scale, cu_seqlens)


def cca_attention(
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
    """CCA attention over cores plus the raw window (SPEC 2.2-2.3); see :func:`cca_attention_reference`."""
    if _use_triton(q):
        from .cca_triton_attention import cca_attention_triton

        return cca_attention_triton(q, k, v, k_core, v_core, group, window, scale, seqlens, q_offsets, cu_seqlens)
    return cca_attention_reference(q, k, v, k_core, v_core, group, window, scale, seqlens, q_offsets, cu_seqlens)


def cca_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    window: int,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooling plus attention for a whole sequence; see :func:`cca_prefill_reference`."""
    if _use_triton(q):
        from .cca_triton_attention import cca_prefill_triton

        return cca_prefill_triton(q, k, v, group, window, scale, seqlens, cu_seqlens)
    return cca_prefill_reference(q, k, v, group, window, scale, seqlens, cu_seqlens)


def gated_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor | None,
    valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention against bounded-cache slots (SPEC 1.5, 2.4): split-K Triton kernel on CUDA.

    See :func:`sparsek.kernels.decode_reference.gated_decode_attention_reference` for the layout.
    """
    if _use_triton(q):
        from .decode_triton import gated_decode_attention_triton

        return gated_decode_attention_triton(q, k, v, gates, valid, scale)
    from .decode_reference import gated_decode_attention_reference

    return gated_decode_attention_reference(q, k, v, gates, valid, scale)
