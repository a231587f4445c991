"""Model classes of converted checkpoints: the base architecture with sparse attention.

How the sparse path hangs into transformers:

* every attention module of the base model becomes a subclass that, when the model runs with
  ``attn_implementation="sparsek"``, computes the SparseK scores from the block's input hidden
  states (the tensor that feeds ``W_K``, SPEC 1.1) and hands them, with the cache object, to the
  registered attention function;
* the attention function (``sparse_attention_forward``) and its mask function are registered with
  transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` under the name ``"sparsek"``;
  the mask function returns the 2D padding mask (or ``None``), like the flash-attention one;
* with ``attn_implementation="sdpa"`` (or ``"eager"``) the same weights run dense, unchanged;
* packed sequences (several documents in one row, as ``DataCollatorWithFlattening`` makes them):
  when transformers passes flash-attention's ``cu_seq_lens_q``/``cu_seq_lens_k``, or position ids
  that restart inside a row, the ops get ``cu_seqlens`` and no document sees another.

Loaded without an explicit ``attn_implementation``, a converted model runs sparse.

Decoding through transformers' own caches works by keeping the extra per-token state that the
sparse methods need (SparseK scores, CCA pooling queries) beside the cache object. That state is
not reordered by beam search; the bounded caches of ``sparsek.runtime`` are the efficient path.

This file is shipped inside every converted checkpoint (remote code), so it needs only torch and
transformers; when the ``sparsek`` package is installed its ops (Triton kernels on CUDA) are used.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from .configuration_sparsek import (
    SparseKLlamaConfig,
    SparseKMistralConfig,
    SparseKQwen2Config,
    SparseKQwen3Config,
    sparse_settings,
)

try:  # the installed package: Triton kernels on CUDA, references elsewhere
    from sparsek.kernels import cca_attention, cca_pool, sparsek_attention
    from sparsek.kernels.cca_reference import cca_core_queries
except ImportError:  # a converted folder loaded with plain transformers
    from .cca_reference import cca_attention_reference as cca_attention
    from .cca_reference import cca_core_queries
    from .cca_reference import cca_pool_reference as cca_pool
    from .sparsek_reference import sparsek_attention_reference as sparsek_attention

ATTENTION_NAME = "sparsek"
DENSE_IMPLEMENTATIONS = ("sdpa", "eager")


class SparseKScorer(nn.Module):
    """``u[j, h] = x_j . W_score[h] + b_score[h] + alpha * j`` in float32 (SPEC 1.1)."""

    def __init__(self, hidden_size: int, num_kv_heads: int, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_kv_heads, hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, dtype=torch.float32))
        self.alpha = alpha

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, L, hidden]``, ``positions [B, L]`` -> scores ``[B, Hkv, L]`` (float32)."""
        # Scores stay float32 even under autocast: positions reach 10^6 (SPEC 1.1).
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            u = nn.functional.linear(hidden_states.float(), self.weight.float(), self.bias.float())
            u = u + self.alpha * positions.to(u.device, torch.float32)[..., None]
        return u.transpose(1, 2)


# --- extra per-token state kept beside transformers' caches -------------------------------------


def _append_state(cache, layer_idx: int, name: str, new: torch.Tensor, seq_dim: int) -> torch.Tensor:
    if cache is None:
        return new
    store = cache.__dict__.setdefault("_sparsek_state", {})
    key = (layer_idx, name)
    old = store.get(key)
    full = new if old is None else torch.cat([old, new.to(old.dtype)], dim=seq_dim)
    store[key] = full.detach()
    return full


def _past_length(cache, layer_idx: int) -> int:
    if cache is None:
        return 0
    store = cache.__dict__.get("_sparsek_state", {})
    for (idx, _), tensor in store.items():
        if idx == layer_idx:
            return tensor.shape[2]
    return 0


# --- padding: bring every row's valid tokens to the front ---------------------------------------


def _left_align(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row start and valid count of a 2D padding mask whose valid tokens are contiguous."""
    mask = mask.bool()
    count = mask.sum(-1)
    start = mask.int().argmax(-1)
    last = mask.shape[-1] - 1 - mask.flip(-1).int().argmax(-1)
    contiguous = (count == 0) | (last - start + 1 == count)
    if not bool(contiguous.all()):
        raise ValueError("sparse attention needs each row's valid tokens to be contiguous (left or right padding)")
    return torch.where(count > 0, start, torch.zeros_like(start)), count


def common_attention_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the attention math runs in, as SDPA would pick it.

    Under autocast, transformers' rotary embedding multiplies bf16 projections by float32 cos/sin,
    so queries and keys arrive in float32 while values stay bf16. SDPA is on autocast's list and
    runs in the autocast dtype; our ops take the same decision (without it the Triton kernels
    would run upcast to float32 or meet mixed operands). Outside autocast: the promoted dtype.
    """
    dev = tensors[0].device.type
    try:
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except TypeError:  # torch < 2.4: no per-device autocast queries
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _roll_seq(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per row ``b``: ``out[b, :, i] = t[b, :, (i + shift[b]) % L]`` along dim 2."""
    length = t.shape[2]
    idx = (torch.arange(length, device=t.device)[None] + shift[:, None]) % length  # [B, L]
    view = [t.shape[0], 1, length] + [1] * (t.dim() - 3)
    return torch.gather(t, 2, idx.view(view).expand_as(t))


# --- packed sequences: several documents in one row ---------------------------------------------


def _packed_documents(kwargs: dict, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    """``cu_seqlens`` over the flattened ``[batch * length]`` tokens, or ``None`` when nothing is packed.

    From flash-attention's ``cu_seq_lens_q``/``cu_seq_lens_k`` when transformers passes them, else
    from ``position_ids``: a document starts wherever the position does not follow the previous
    one by 1 (transformers' own packed-sequence rule, ``find_packed_sequence_indices``), and at
    every row start.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is not None and cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError("sparse attention needs cu_seq_lens_q == cu_seq_lens_k (queries are the keys)")
        cu = (cu_q if cu_q is not None else cu_k).to(device=device, dtype=torch.int32)
        if int(cu[-1]) != batch * length:
            raise ValueError(f"cu_seq_lens cover {int(cu[-1])} tokens, the batch holds {batch * length}")
        return None if batch == 1 and cu.numel() == 2 else cu
    pos = kwargs.get("position_ids")
    if pos is None or length < 2 or pos.shape[-1] != length:
        return None
    pos = pos.to(device).reshape(-1, length).expand(batch, length)
    restart = torch.diff(pos, dim=-1) != 1
    if not bool(restart.any()):
        return None
    starts = torch.cat([torch.ones_like(restart[:, :1]), restart], dim=-1).reshape(-1).nonzero().reshape(-1)
    return torch.cat([starts, starts.new_tensor([batch * length])]).to(torch.int32)


def _flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, ...]`` -> ``[1, H, B * L, ...]`` (one packed row)."""
    if t.shape[0] == 1:
        return t
    return t.transpose(0, 1).reshape(1, t.shape[1], t.shape[0] * t.shape[2], *t.shape[3:])


def _packed_attention(s, query, key, value, extra, scaling, cu_seqlens) -> torch.Tensor:
    """The op over packed documents; ``[B, H, L, d]`` in and out, rows flattened into one."""
    batch, length = query.shape[0], query.shape[2]
    query, key, value = (_flatten_rows(t) for t in (query, key, value))
    if s.method == "sparsek":
        scores = _flatten_rows(extra)
        out = sparsek_attention(query, key, value, scores, s.topk, s.window, scaling, cu_seqlens=cu_seqlens)
    else:
        g = s.group
        k_core, v_core = cca_pool(cca_core_queries(query, g, cu_seqlens), key, value, g, scaling, cu_seqlens)
        out = cca_attention(query, key, value, k_core, v_core, g, s.cca_window, scaling, cu_seqlens=cu_seqlens)
    if batch == 1:
        return out
    return out.reshape(out.shape[1], batch, length, out.shape[3]).transpose(0, 1)


# --- the registered attention and mask functions ------------------------------------------------


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sparse_cache=None,
    sparsek_scores: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SparseK or CCA attention for one layer; returns ``([B, Lq, H, d], None)``."""
    # A bounded cache of ``sparsek.runtime`` (cache_sparsek.py / cache_cca.py) keeps its own
    # state and computes the attention itself; duck-typed, so this file needs no import of it.
    dt = common_attention_dtype(query, key, value)
    query, key, value = (t if t.dtype == dt else t.to(dt) for t in (query, key, value))
    bounded_attend = getattr(sparse_cache, "sparse_attend", None)
    if bounded_attend is not None:
        return bounded_attend(module, query, key, value, attention_mask, scaling, sparsek_scores)
    s = module.sparse
    lq, lk = query.shape[2], key.shape[2]
    layer = module.layer_idx
    if s.method == "sparsek":
        if sparsek_scores is None:
            raise RuntimeError("SparseK attention needs the scorer's scores; call it through the attention module")
        extra = _append_state(sparse_cache, layer, "scores", sparsek_scores, seq_dim=2)[..., -lk:]
    else:
        extra = _append_state(sparse_cache, layer, "queries", query, seq_dim=2)[:, :, -lk:]
    if extra.shape[2] != lk:
        raise RuntimeError(f"sparse state covers {extra.shape[2]} tokens but the cache holds {lk}")
    if attention_mask is None and lq == lk:
        cu_seqlens = _packed_documents(kwargs, query.shape[0], lq, query.device)
        if cu_seqlens is not None:
            out = _packed_attention(s, query, key, value, extra, scaling, cu_seqlens)
            return out.transpose(1, 2).contiguous(), None

    seqlens = q_offsets = shift = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("sparse attention takes a 2D padding mask, not a prepared 4D mask")
        start, seqlens = _left_align(attention_mask[:, -lk:])
        key, value, extra = (_roll_seq(t, start) for t in (key, value, extra))
        if lq == lk:
            shift, query = start, _roll_seq(query, start)
            q_offsets = torch.zeros_like(seqlens)
        else:
            q_offsets = seqlens - lq

    if s.method == "sparsek":
        out = sparsek_attention(query, key, value, extra, s.topk, s.window, scaling, seqlens, q_offsets)
    else:
        g = s.group
        q_all = query if lq == lk else extra
        n = lk // g
        k_core, v_core = cca_pool(q_all[:, :, g - 1 : n * g : g], key, value, g, scaling)
        out = cca_attention(query, key, value, k_core, v_core, g, s.cca_window, scaling, seqlens, q_offsets)
    if shift is not None:
        out = _roll_seq(out, -shift)
    return out.transpose(1, 2).contiguous(), None


def sparse_attention_mask(batch_size: int, q_length: int = 0, kv_length: int | None = None, attention_mask=None, **kwargs):
    """The 2D padding mask (``None`` when nothing is padded), like flash attention's."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    if kv_length is not None:
        attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask.bool()


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sparse_attention_mask)


register_attention()


# --- attention modules and model classes --------------------------------------------------------


class SparseAttentionMixin:
    """Runs the scorer and passes scores and cache to the registered attention function."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        # transformers < 5.25 hands the cache over as ``past_key_values``, later releases as ``cache``;
        # it stays in ``kwargs`` under the name it came with, for the base class to consume.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self.config._attn_implementation == ATTENTION_NAME:
            kwargs["sparse_cache"] = cache
            if self.sparse.method == "sparsek":
                positions = kwargs.get("position_ids")
                if positions is None:
                    start = _past_length(cache, self.layer_idx)
                    positions = torch.arange(start, start + hidden_states.shape[1], device=hidden_states.device)
                if positions.dim() == 1:
                    positions = positions[None]
                positions = positions.expand(hidden_states.shape[0], -1)
                kwargs["sparsek_scores"] = self.scorer(hidden_states, positions)
        return super().forward(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **kwargs,
        )


_ATTENTION_CLASSES: dict[type, type] = {}


def _sparse_attention_class(base: type) -> type:
    if base not in _ATTENTION_CLASSES:
        _ATTENTION_CLASSES[base] = type(f"Sparse{base.__name__}", (SparseAttentionMixin, base), {})
    return _ATTENTION_CLASSES[base]


class SparseModelMixin:
    """Turns the base model's attention modules sparse and makes ``"sparsek"`` the default."""

    _keep_in_fp32_modules_strict = ["scorer"]

    def _sparsify(self) -> None:
        settings = sparse_settings(self.config)
        cfg = self.config
        for layer in self.model.layers:
            attn = layer.self_attn
            if not isinstance(attn, SparseAttentionMixin):
                attn.__class__ = _sparse_attention_class(type(attn))
            attn.sparse = settings
            if settings.method == "sparsek" and not hasattr(attn, "scorer"):
                param = next(attn.parameters())
                scorer = SparseKScorer(cfg.hidden_size, cfg.num_key_value_heads, settings.alpha)
                attn.scorer = scorer.to(param.device)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention in (None, ATTENTION_NAME):
            register_attention()
            return ATTENTION_NAME
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def _init_weights(self, module):
        if isinstance(module, SparseKScorer):
            with torch.no_grad():
                module.weight.zero_()
                module.bias.zero_()
            return
        super()._init_weights(module)

    @property
    def sparse_settings(self):
        return sparse_settings(self.config)


class SparseKLlamaForCausalLM(SparseModelMixin, LlamaForCausalLM):
    config_class = SparseKLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._sparsify()


class SparseKMistralForCausalLM(SparseModelMixin, MistralForCausalLM):
    config_class = SparseKMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self._sparsify()


class SparseKQwen2ForCausalLM(SparseModelMixin, Qwen2ForCausalLM):
    config_class = SparseKQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self._sparsify()


class SparseKQwen3ForCausalLM(SparseModelMixin, Qwen3ForCausalLM):
    config_class = SparseKQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self._sparsify()


MODEL_CLASSES = {
    "llama": SparseKLlamaForCausalLM,
    "mistral": SparseKMistralForCausalLM,
    "qwen2": SparseKQwen2ForCausalLM,
    "qwen3": SparseKQwen3ForCausalLM,
}
