"""Run the same weights dense (SDPA) or sparse, without reloading the model.

``validate`` compares a model with its dense self and ``adapt --objective distill`` needs the
dense model's predictions: both flip the attention implementation of one loaded model.
"""

from __future__ import annotations

from contextlib import contextmanager

from .modeling_sparsek import ATTENTION_NAME


def set_attention(model, implementation: str) -> None:
    """``implementation`` is ``"sparsek"`` or a dense one (``"sdpa"``, ``"eager"``)."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = implementation


@contextmanager
def dense_attention(model, implementation: str = "sdpa"):
    previous = model.config._attn_implementation
    set_attention(model, implementation)
    try:
        yield model
    finally:
        set_attention(model, previous or ATTENTION_NAME)
