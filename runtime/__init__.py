"""Loading and running converted models: config and model classes, caches, generation.

Attributes are imported on first use (PEP 562), so light modules such as
``sparsek.runtime.errors`` do not pull in transformers: ``sparsek --help`` stays fast.
Importing the model classes registers them with transformers' Auto classes.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CONFIG_CLASSES": "configuration_sparsek",
    "SUPPORTED_ARCHITECTURES": "configuration_sparsek",
    "SparseSettings": "configuration_sparsek",
    "default_sparse_fields": "configuration_sparsek",
    "sparse_settings": "configuration_sparsek",
    "ATTENTION_NAME": "modeling_sparsek",
    "MODEL_CLASSES": "modeling_sparsek",
    "SparseKScorer": "modeling_sparsek",
    "register_auto_classes": "registry",
    "load_model": "loading",
    "load_tokenizer": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsek.runtime' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    if _EXPORTS[name] in ("modeling_sparsek", "registry"):
        importlib.import_module(".registry", __name__).register_auto_classes()
    return getattr(module, name)
