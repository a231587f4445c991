"""Configuration classes of converted (sparse-attention) models.

A converted config is the base architecture's own config (every base field unchanged) plus a
few sparse fields, under a ``model_type`` of its own (``sparsek_llama``, ...). The sparse fields
are plain extra attributes rather than declared dataclass fields: that keeps one definition
working across transformers 5.x releases, whose config classes changed shape.

This file is shipped inside every converted checkpoint (remote code): it imports only
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

METHODS = ("sparsek", "cca")

# SPEC 1.7 / 2.5 defaults.
DEFAULT_SPARSEK_TOPK = 2048
DEFAULT_SPARSEK_WINDOW = 512
DEFAULT_SPARSEK_ALPHA = 1.0 / 16
DEFAULT_CCA_GROUP = 16
DEFAULT_CCA_WINDOW = 1024
LONG_CONTEXT = 32768


@dataclass(frozen=True)
class SparseSettings:
    """The hyper-parameters of a converted model, resolved with their defaults."""

    method: str
    topk: int
    window: int
    alpha: float
    group: int
    cca_window: int

    def describe(self) -> str:
        if self.method == "sparsek":
            return f"SparseK (k={self.topk}, window={self.window}, alpha={self.alpha:g})"
        return f"CCA (group={self.group}, window={self.cca_window})"


def default_sparse_fields(method: str, max_positions: int | None) -> dict:
    """Defaults of SPEC 1.7: long-context models get k=2048/w=512, short ones k=256/w=256."""
    long_context = (max_positions or 0) >= LONG_CONTEXT
    return {
        "sparse_method": method,
        "sparsek_topk": DEFAULT_SPARSEK_TOPK if long_context else 256,
        "sparsek_window": DEFAULT_SPARSEK_WINDOW if long_context else 256,
        "sparsek_alpha": DEFAULT_SPARSEK_ALPHA,
        "cca_group": DEFAULT_CCA_GROUP,
        "cca_window": DEFAULT_CCA_WINDOW,
    }


def sparse_settings(config) -> SparseSettings:
    """Read (and check) the sparse fields of a converted config."""
    defaults = default_sparse_fields(
        getattr(config, "sparse_method", "sparsek"), getattr(config, "max_position_embeddings", None)
    )

    def get(name):
        value = getattr(config, name, None)
        return defaults[name] if value is None else value

    settings = SparseSettings(
        method=str(get("sparse_method")),
        topk=int(get("sparsek_topk")),
        window=int(get("sparsek_window")),
        alpha=float(get("sparsek_alpha")),
        group=int(get("cca_group")),
        cca_window=int(get("cca_window")),
    )
    validate_settings(settings)
    return settings


def validate_settings(s: SparseSettings) -> None:
    if s.method not in METHODS:
        raise ValueError(f"sparse_method must be one of {', '.join(METHODS)}, got {s.method!r}")
    for name in ("topk", "window", "group", "cca_window"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {s.alpha}")


class SparseKLlamaConfig(LlamaConfig):
    model_type = "sparsek_llama"


class SparseKMistralConfig(MistralConfig):
    model_type = "sparsek_mistral"


class SparseKQwen2Config(Qwen2Config):
    model_type = "sparsek_qwen2"


class SparseKQwen3Config(Qwen3Config):
    model_type = "sparsek_qwen3"


CONFIG_CLASSES = {
    "llama": SparseKLlamaConfig,
    "mistral": SparseKMistralConfig,
    "qwen2": SparseKQwen2Config,
    "qwen3": SparseKQwen3Config,
}
SUPPORTED_ARCHITECTURES = tuple(CONFIG_CLASSES)
