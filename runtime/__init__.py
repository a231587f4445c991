"""Loading and running converted models: config and model classes, caches, generation."""

from .configuration_sparsek import (
    CONFIG_CLASSES,
    SUPPORTED_ARCHITECTURES,
    SparseSettings,
    default_sparse_fields,
    sparse_settings,
)
from .modeling_sparsek import ATTENTION_NAME, MODEL_CLASSES, SparseKScorer
from .registry import register_auto_classes

register_auto_classes()

__all__ = [
    "ATTENTION_NAME",
    "CONFIG_CLASSES",
    "MODEL_CLASSES",
    "SUPPORTED_ARCHITECTURES",
    "SparseKScorer",
    "SparseSettings",
    "default_sparse_fields",
    "register_auto_classes",
    "sparse_settings",
]
