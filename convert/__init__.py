"""sparsek.convert: dense Hugging Face checkpoints in, converted sparse-attention folders out."""

from .convert_model import ConvertOptions, ConvertSummary, convert

__all__ = ["ConvertOptions", "ConvertSummary", "convert"]
