"""The code files a converted checkpoint carries, so plain transformers can load it.

``modeling_sparsek.py`` imports its siblings relatively; the kernels' PyTorch references are
copied flat beside it. Only pure-PyTorch files are shipped: the Triton kernels are used when the
``sparsek`` package is installed.
"""

from __future__ import annotations

from pathlib import Path

_RUNTIME = Path(__file__).resolve().parent
_KERNELS = _RUNTIME.parent / "kernels"
if not _KERNELS.is_dir():  # installed (non-editable) layout: sparsek/runtime beside sparsek/kernels
    import sparsek.kernels as _k

    _KERNELS = Path(_k.__file__).resolve().parent

REMOTE_CODE_FILES = (
    _RUNTIME / "configuration_sparsek.py",
    _RUNTIME / "modeling_sparsek.py",
    _KERNELS / "sparsek_projection.py",
    _KERNELS / "sparsek_reference.py",
    _KERNELS / "cca_reference.py",
)


def auto_map(base_model_type: str) -> dict[str, str]:
    """The ``auto_map`` entry of a converted config.json."""
    suffix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[base_model_type]
    return {
        "AutoConfig": f"configuration_sparsek.SparseK{suffix}Config",
        "AutoModelForCausalLM": f"modeling_sparsek.SparseK{suffix}ForCausalLM",
    }
