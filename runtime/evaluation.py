"""How good is a sparse model compared with its dense self: the measuring functions.

A small API shared by ``validate`` and ``adapt`` (which reports the same numbers before and after
training):

* :func:`perplexity` - perplexity and loss by position of one model on token batches;
* :func:`sparse_vs_dense` - the same weights run sparse and dense (or a separate dense model) on
  the same tokens: both perplexities, the relative increase, mean KL(dense || sparse) of the
  next-token distributions and top-1 agreement;
* :func:`selection_recall` - SparseK selection recall per layer (SPEC 1.6);
* :func:`prefill_decode_consistency` - largest logit difference between a full forward pass and
  token-by-token decode;
* :func:`measure_speed` - prefill / decode tokens per second and the bytes held by the KV cache.

Logits are never materialised for a whole sequence at once (a 4K x 50K-vocab float32 tensor is
800 MB): the decoder's last hidden states are kept and the LM head runs over position chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .dense_switch import dense_attention
from .transformers_compat import with_cache

LOGIT_CHUNK = 512
Progress = Callable[[int], None] | None


# --- shared helpers ---------------------------------------------------------------------------


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def last_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states ``[B, L, hidden]``; no logits."""
    out = _decoder(model)(input_ids=input_ids.to(_device(model)), use_cache=False)
    return out.last_hidden_state


def _log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)


@dataclass
class PerplexityResult:
    """Perplexity over ``tokens`` predicted tokens; ``loss_by_position[t]`` predicts token ``t+1``."""

    nll_sum: float
    tokens: int
    loss_by_position: list[float]

    @property
    def loss(self) -> float:
        return self.nll_sum / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


class _LossAccumulator:
    def __init__(self):
        self.nll_sum = 0.0
        self.tokens = 0
        self.by_position: torch.Tensor | None = None
        self.rows = 0

    def add(self, nll: torch.Tensor, start: int, length: int) -> None:
        """``nll [B, C]`` for predictions at positions ``start .. start+C-1`` of sequences of ``length``."""
        if self.by_position is None:
            self.by_position = torch.zeros(length - 1, dtype=torch.float64)
        self.nll_sum += float(nll.double().sum())
        self.tokens += nll.numel()
        self.by_position[start : start + nll.shape[1]] += nll.double().sum(0).cpu()

    def result(self) -> PerplexityResult:
        rows = max(1, self.rows)
        by_pos = [] if self.by_position is None else (self.by_position / rows).tolist()
        return PerplexityResult(self.nll_sum, self.tokens, by_pos)


def _check_same_length(batches: Sequence[torch.Tensor]) -> int:
    lengths = {b.shape[1] for b in batches}
    if len(lengths) != 1:
        raise ValueError(f"all token batches must have one sequence length, got {sorted(lengths)}")
    return lengths.pop()


# --- perplexity and sparse vs dense ------------------------------------------------------------


@torch.no_grad()
def perplexity(model, token_batches: Sequence[torch.Tensor], progress: Progress = None) -> PerplexityResult:
    """Perplexity of ``model`` (as it is set up: sparse or dense) on ``[B, L]`` token batches."""
    length = _check_same_length(token_batches)
    acc = _LossAccumulator()
    for ids in token_batches:
        ids = ids.to(_device(model))
        hidden = last_hidden(model, ids)
        acc.rows += ids.shape[0]
        for c0 in range(0, length - 1, LOGIT_CHUNK):
            c1 = min(length - 1, c0 + LOGIT_CHUNK)
            lp = _log_probs(model, hidden[:, c0:c1])
            nll = -lp.gather(-1, ids[:, c0 + 1 : c1 + 1, None]).squeeze(-1)
            acc.add(nll, c0, length)
        if progress:
            progress(1)
    return acc.result()


@dataclass
class Comparison:
    """Sparse and dense on the same tokens (see :func:`sparse_vs_dense`)."""

    seq_len: int
    sequences: int
    sparse: PerplexityResult
    dense: PerplexityResult
    kl_sum: float
    agree: int

    @property
    def ppl_increase(self) -> float:
        """Relative perplexity increase of sparse over dense (0.05 = 5% worse)."""
        return self.sparse.perplexity / self.dense.perplexity - 1.0

    @property
    def mean_kl(self) -> float:
        """Mean KL(dense || sparse) of the next-token distributions, in nats per token."""
        return self.kl_sum / max(1, self.sparse.tokens)

    @property
    def top1_agreement(self) -> float:
        return self.agree / max(1, self.sparse.tokens)

    def as_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "sequences": self.sequences,
            "tokens": self.sparse.tokens,
            "ppl_sparse": self.sparse.perplexity,
            "ppl_dense": self.dense.perplexity,
            "ppl_increase": self.ppl_increase,
            "mean_kl": self.mean_kl,
            "top1_agreement": self.top1_agreement,
        }


@torch.no_grad()
def sparse_vs_dense(
    model,
    token_batches: Sequence[torch.Tensor],
    dense_model=None,
    progress: Progress = None,
) -> Comparison:
    """Run ``model`` sparse and dense on the same tokens and compare the next-token predictions.

    The dense reference is the same weights with ``attn_implementation="sdpa"`` (no second model
    in memory), unless ``dense_model`` is given (for instance the unconverted base model).
    """
    length = _check_same_length(token_batches)
    sparse_acc, dense_acc = _LossAccumulator(), _LossAccumulator()
    kl_sum, agree = 0.0, 0
    for ids in token_batches:
        ids = ids.to(_device(model))
        h_sparse = last_hidden(model, ids)
        if dense_model is None:
            with dense_attention(model):
                h_dense = last_hidden(model, ids)
            dense_head = model
        else:
            h_dense = last_hidden(dense_model, ids.to(_device(dense_model))).to(h_sparse.device)
            dense_head = dense_model
        sparse_acc.rows += ids.shape[0]
        dense_acc.rows += ids.shape[0]
        for c0 in range(0, length - 1, LOGIT_CHUNK):
            c1 = min(length - 1, c0 + LOGIT_CHUNK)
            target = ids[:, c0 + 1 : c1 + 1, None]
            lp_s = _log_probs(model, h_sparse[:, c0:c1])
            lp_d = _log_probs(dense_head, h_dense[:, c0:c1].to(_device(dense_head))).to(lp_s.device)
            sparse_acc.add(-lp_s.gather(-1, target).squeeze(-1), c0, length)
            dense_acc.add(-lp_d.gather(-1, target).squeeze(-1), c0, length)
            kl_sum += float((lp_d.exp() * (lp_d - lp_s)).sum(-1).clamp(min=0).double().sum())
            agree += int((lp_d.argmax(-1) == lp_s.argmax(-1)).sum())
        if progress:
            progress(1)
    return Comparison(length, sparse_acc.rows, sparse_acc.result(), dense_acc.result(), kl_sum, agree)


# --- selection recall (SparseK, SPEC 1.6) -------------------------------------------------------


@dataclass
class RecallResult:
    """Mean recall per layer over informative queries (more than ``k`` candidates)."""

    per_layer: list[float | None]
    informative_fraction: list[float]

    @property
    def mean(self) -> float | None:
        values = [r for r in self.per_layer if r is not None]
        return sum(values) / len(values) if values else None

    def as_dict(self) -> dict:
        return {"per_layer": self.per_layer, "mean": self.mean, "informative_fraction": self.informative_fraction}


@torch.no_grad()
def selection_recall(model, token_batches: Iterable[torch.Tensor], progress: Progress = None) -> RecallResult | None:
    """SparseK selection recall per layer (SPEC 1.6) on the dense attention of the same weights.

    Returns ``None`` for models that are not SparseK (CCA has no selection). A layer where no
    query has more than ``k`` candidates (sequences too short) reports ``None``.
    """
    from sparsek.kernels.sparsek_recall import sparsek_selection_recall

    from .capture import capture_dense_layers

    settings = getattr(model, "sparse_settings", None)
    if settings is None or settings.method != "sparsek":
        return None
    layers = _decoder(model).layers
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    totals = [0] * len(layers)

    def on_layer(module, hidden, positions, q, k):
        scores = module.scorer(hidden, positions)
        recall, informative = sparsek_selection_recall(
            q, k, scores, settings.topk, settings.window, scale=getattr(module, "scaling", None)
        )
        i = module.layer_idx
        sums[i] += float(recall[informative].double().sum())
        counts[i] += int(informative.sum())
        totals[i] += informative.numel()

    with capture_dense_layers(model, on_layer):
        for ids in token_batches:
            _decoder(model)(input_ids=ids.to(_device(model)), use_cache=False)
            if progress:
                progress(1)
    return RecallResult(
        per_layer=[s / c if c else None for s, c in zip(sums, counts, strict=True)],
        informative_fraction=[c / t if t else 0.0 for c, t in zip(counts, totals, strict=True)],
    )


# --- decoding: one switch point for the cache used --------------------------------------------


def new_decode_cache(model):
    """The cache used for decode in the consistency, passkey and speed checks: the one switch point.

    Sparse runs use the package's bounded cache for the model's method (``runtime.cache_*``,
    SPEC 1.5 / 2.4), so the consistency check tests the real decode path and the measured cache
    size is the bounded one. Dense runs (the same weights under SDPA, or a plain dense model) use
    transformers' ``DynamicCache``.
    """
    from transformers import DynamicCache

    from .modeling_sparsek import ATTENTION_NAME

    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME and hasattr(model, "sparse_settings"):
        from .cache_cca import make_cache

        return make_cache(model)
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def cache_bytes(cache) -> int:
    """Bytes of every tensor held by a cache object (K/V of each layer plus sparse extras).

    Modules it refers to (a cache may keep the model's config or layers) are not counted."""
    seen: set[int] = set()
    total = 0

    def visit(obj, depth=0):
        nonlocal total
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            for v in vars(obj).values():
                visit(v, depth + 1)

    visit(cache)
    return total


def bounded_cache_bytes(config, settings, length: int, dtype: torch.dtype) -> dict[str, int]:
    """K/V bytes per sequence at ``length`` tokens: dense, and the bounded sparse cache (formula).

    SparseK (SPEC 1.5) keeps ``min(L, w + k)`` keys/values per KV head and layer; CCA (SPEC 2.4)
    keeps up to ``s + g`` raw tokens plus one core per complete group that left the window. Scores
    and pooling queries are small and not included.
    """
    layers = config.num_hidden_layers
    hkv = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = layers * hkv * d * 2 * torch.finfo(dtype).bits // 8
    dense = per_token * length
    if settings is None:
        return {"dense": dense}
    if settings.method == "sparsek":
        kept = min(length, settings.window + settings.topk)
    else:
        raw = min(length, settings.cca_window + settings.group)
        kept = raw + max(0, (length - settings.cca_window) // settings.group)
    return {"dense": dense, "sparse": per_token * kept}


@torch.no_grad()
def _forward_step(model, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    out = model(input_ids=ids, use_cache=True, position_ids=positions, **with_cache(model, cache))
    return out.logits


@torch.no_grad()
def prefill_decode_consistency(model, input_ids: torch.Tensor, prefill: int, progress: Progress = None) -> float:
    """Largest absolute logit difference between one full forward pass over ``input_ids [1, L]``
    and prefill of the first ``prefill`` tokens followed by token-by-token decode of the rest."""
    ids = input_ids.to(_device(model))
    length = ids.shape[1]
    if not 0 < prefill < length:
        raise ValueError(f"prefill must be in 1..{length - 1}, got {prefill}")
    full = model(input_ids=ids, use_cache=False).logits.float()
    cache = new_decode_cache(model)
    worst = float((_forward_step(model, ids[:, :prefill], cache, 0).float() - full[:, :prefill]).abs().max())
    for i in range(prefill, length):
        step = _forward_step(model, ids[:, i : i + 1], cache, i).float()
        worst = max(worst, float((step[:, 0] - full[:, i]).abs().max()))
        if progress:
            progress(1)
    return worst


@dataclass
class SpeedResult:
    length: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_steps: int
    cache_bytes_measured: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "length": self.length,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_steps": self.decode_steps,
            "cache_bytes_measured": self.cache_bytes_measured,
            **self.extra,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, input_ids: torch.Tensor, decode_steps: int, dense: bool = False) -> SpeedResult:
    """Prefill ``input_ids [1, L]`` into a fresh cache, then greedy-decode ``decode_steps`` tokens.

    Wall-clock tokens per second (the device is synchronised around each phase) and the bytes the
    cache holds at the end. ``dense=True`` runs the same weights dense.
    """
    device = _device(model)
    ids = input_ids.to(device)
    ctx = dense_attention(model) if dense else nullcontext()
    with ctx:
        cache = new_decode_cache(model)
        _sync(device)
        t0 = time.perf_counter()
        logits = _forward_step(model, ids, cache, 0)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        token = logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for i in range(decode_steps):
            logits = _forward_step(model, token, cache, ids.shape[1] + i)
            token = logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s = time.perf_counter() - t0
    return SpeedResult(
        length=ids.shape[1],
        prefill_tokens_per_s=ids.shape[1] / max(prefill_s, 1e-9),
        decode_tokens_per_s=decode_steps / max(decode_s, 1e-9) if decode_steps else 0.0,
        decode_steps=decode_steps,
        cache_bytes_measured=cache_bytes(cache),
    )
