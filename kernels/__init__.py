"""Attention ops that know no model: SparseK and CCA, with PyTorch references beside the kernels."""

from .cca_reference import cca_attention_reference, cca_pool_reference, cca_prefill_reference
from .dispatch import cca_attention, cca_pool, cca_prefill, gated_decode_attention, sparsek_attention
from .sparsek_projection import sparsek_project, sparsek_threshold
from .sparsek_reference import sparsek_attention_reference, sparsek_select, topk_mask

__all__ = [
    "cca_attention",
    "cca_attention_reference",
    "cca_pool",
    "cca_pool_reference",
    "cca_prefill",
    "cca_prefill_reference",
    "gated_decode_attention",
    "sparsek_attention",
    "sparsek_attention_reference",
    "sparsek_project",
    "sparsek_select",
    "sparsek_threshold",
    "topk_mask",
]
