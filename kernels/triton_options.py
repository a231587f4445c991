"""Launch options shared by the Triton kernels."""

from __future__ import annotations

import torch


def dot_options(dtype: torch.dtype) -> dict:
    """Float32 inputs get exact (IEEE) dot products instead of Triton's TF32 default.

    TF32 keeps ~10 mantissa bits: a float32 model would then differ between prefill (Triton) and
    decode or the reference by ~1e-2 in the logits. bf16/fp16 inputs use the tensor cores natively.
    """
    return {"default_dot_input_precision": "ieee"} if dtype == torch.float32 else {}
