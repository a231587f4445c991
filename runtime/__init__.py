"""Loading and running converted models: config and model classes, caches, generation.

Attributes are imported on first use (PEP 562), so light modules such as
``sparsek.runtime.errors`` do not pull in transformers: ``sparsek --help`` stays fast.
Importing the model classes registers them with transformers' Auto classes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _keep_hub_kernels_importable() -> None:
    """Let ``import kernels`` mean the installed Hub-kernels package, not a sparsek checkout's folder.

    transformers >= 5.25 depends on the ``kernels`` distribution and imports it. Where a sparsek
    checkout's root is on ``sys.path`` (``python -m sparsek.cli`` or pytest run from the checkout),
    its top-level ``kernels/`` folder (installed as ``sparsek.kernels``) would shadow that package and
    break ``import transformers``. Import the installed one once with such a root left out of the
    path; ``sys.modules`` then keeps it. Nothing happens where no checkout root is on the path.
    """
    root = Path(__file__).resolve().parents[1]  # a checkout's root when run from one

    def is_root(entry: str) -> bool:
        return Path(entry or ".").resolve() == root

    if "kernels" in sys.modules or not any(map(is_root, sys.path)):
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not is_root(p)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules.pop("kernels", None)  # not installed: transformers then skips it as well
    finally:
        sys.path[:] = saved


_keep_hub_kernels_importable()

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
