"""Watch a dense forward pass layer by layer: hidden states, positions, q and k after RoPE.

``validate`` (selection recall) and ``adapt`` (the scorer loss of SPEC 1.6) need, for every
layer, what the dense model attends to and what the scorer sees. Instead of storing every
layer's tensors, a callback runs per layer while the forward pass goes on, and the tensors are
dropped right after.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .dense_switch import set_attention

CAPTURE_NAME = "sparsek_capture"
LayerCallback = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@contextmanager
def capture_dense_layers(model, on_layer: LayerCallback):
    """Inside the block, forward passes of ``model`` run dense (SDPA) and call
    ``on_layer(attention_module, hidden_states, positions, q, k)`` once per layer.

    ``hidden_states`` is the attention block's input ``[B, L, hidden]``, ``positions`` ``[B, L]``,
    ``q`` ``[B, H, L, d]`` and ``k`` ``[B, Hkv, L, d]`` are after RoPE, as the dense model uses them.
    """
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        hidden, positions = pending.pop(id(module))
        on_layer(module, hidden, positions, query, key)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    def pre_hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        pending[id(module)] = (hidden, positions.expand(hidden.shape[0], -1))

    AttentionInterface.register(CAPTURE_NAME, attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    handles = [
        layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in model.model.layers
    ]
    set_attention(model, CAPTURE_NAME)
    try:
        yield
    finally:
        set_attention(model, previous)
        for handle in handles:
            handle.remove()
        pending.clear()
