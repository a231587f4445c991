"""FLOPs each attention variant actually needs (matrix products only, 2 FLOPs per multiply-add).

Forward: two products (Q K^T and P V) over the visible (query, key) pairs: ``4 * d * pairs`` per
head. Backward: five products, i.e. 2.5x the forward (the FlashAttention convention; recomputing
P is counted as needed work, as FlashAttention does).
"""

from __future__ import annotations


def causal_pairs(length: int) -> int:
    """Visible pairs of dense causal attention over ``length`` tokens."""
    return length * (length + 1) // 2


def banded_pairs(length: int, span: int) -> int:
    """Pairs when every query sees at most ``span`` keys (itself included): SparseK (span = w + k)."""
    full = min(length, span)
    return causal_pairs(full) + (length - full) * span


def cca_pairs(length: int, group: int, window: int) -> int:
    """Pairs of CCA (SPEC 2.2): P(i) cores plus raw keys P(i)*g .. i, plus the pooling pass."""
    total = 0
    for i in range(length):
        p = (i + 1 - window) // group if i + 1 > window else 0
        total += p + (i - p * group + 1)
    return total + (length // group) * group  # pooling: one query per group over its g keys


def attention_flops(pairs: int, heads: int, head_dim: int, batch: int = 1, backward: bool = False) -> float:
    fwd = 4.0 * head_dim * pairs * heads * batch
    return fwd * 3.5 if backward else fwd
