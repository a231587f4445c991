"""Converted model classes inside transformers: dense equivalence, decode, padding, scorer gradient."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sparsek.runtime import CONFIG_CLASSES, MODEL_CLASSES, sparse_settings
from sparsek.runtime.dense_switch import dense_attention
from sparsek.runtime.transformers_compat import with_cache

BASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 24}),
}
TINY = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=96, vocab_size=101, max_position_embeddings=512)


def _pair(arch, method, seed=0, **sparse):
    config_cls, model_cls, extra = BASES[arch]
    torch.manual_seed(seed)
    base = model_cls(config_cls(**TINY, **extra)).eval()
    fields = dict(sparse_method=method, sparsek_topk=5, sparsek_window=4, cca_group=3, cca_window=5)
    fields.update(sparse)
    sparse_model = MODEL_CLASSES[arch](CONFIG_CLASSES[arch](**TINY, **extra, **fields)).eval()
    sparse_model.load_state_dict(base.state_dict(), strict=False)
    if method == "sparsek":  # a trained-looking scorer, so selection is not just recency
        for layer in sparse_model.model.layers:
            torch.nn.init.normal_(layer.self_attn.scorer.weight, std=0.5)
    return base, sparse_model


def _ids(batch=2, length=23, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(BASES))
@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_large_budget_equals_the_dense_model(arch, method):
    base, model = _pair(arch, method, sparsek_topk=64, sparsek_window=64, cca_window=64)
    ids = _ids()
    assert model.config._attn_implementation == "sparsek"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", list(BASES))
@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_sparse_is_sparse_and_dense_switch_runs_the_same_weights_dense(arch, method):
    base, model = _pair(arch, method)
    ids = _ids()
    with torch.no_grad():
        sparse_logits = model(ids).logits
        with dense_attention(model):
            dense_logits = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(dense_logits, base(ids).logits, atol=2e-5, rtol=0)
    assert (sparse_logits - dense_logits).abs().max() > 1e-3
    torch.testing.assert_close(again, sparse_logits)


def test_mistral_sliding_window_still_applies_on_the_dense_path():
    base, model = _pair("mistral", "sparsek", seed=3)
    base.config.sliding_window = model.config.sliding_window = 6
    ids = _ids(length=20)
    with torch.no_grad(), dense_attention(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", list(BASES))
@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_prefill_equals_token_by_token_decode(arch, method):
    _, model = _pair(arch, method, seed=5)
    ids = _ids(length=21)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :7], **with_cache(model, cache), use_cache=True).logits]  # a chunk, then tokens
        for t in range(7, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], **with_cache(model, cache), use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_left_padded_batch_equals_unpadded_rows(arch, method):
    _, model = _pair(arch, method, seed=7)
    ids = _ids(batch=3, length=19)
    mask = torch.ones_like(ids)
    pads = [0, 5, 11]
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for row, pad in enumerate(pads):
            alone = model(ids[row : row + 1, pad:]).logits
            torch.testing.assert_close(batched[row, pad:], alone[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_left_padded_generate_matches_unpadded(method):
    _, model = _pair("llama", method, seed=9)
    ids = _ids(batch=2, length=15)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        alone = model.generate(ids[1:, 6:], **kw)
    assert batched[1, 15:].tolist() == alone[0, 9:].tolist()


def test_scorer_gets_a_gradient_at_step_zero():
    """A freshly converted model (W_score = 0, b_score = 0) still trains its scorer (SPEC 1.1)."""
    _, model = _pair("llama", "sparsek", seed=11, sparsek_topk=4, sparsek_window=4)
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.scorer.weight)
        torch.nn.init.zeros_(layer.self_attn.scorer.bias)
    ids = _ids(batch=2, length=40)
    model.train()
    model(ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        assert layer.self_attn.scorer.weight.grad.abs().sum() > 0
        assert layer.self_attn.scorer.bias.grad.abs().sum() > 0


def test_save_load_roundtrip_keeps_scorer_in_float32(tmp_path):
    _, model = _pair("qwen2", "sparsek", seed=13)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert type(loaded) is type(model)
    assert loaded.model.layers[0].self_attn.scorer.weight.dtype == torch.float32
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    loaded32 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded32(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_hyper_parameters_can_be_overridden_at_load_time(tmp_path):
    _, model = _pair("llama", "cca", seed=15)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, cca_window=9, cca_group=2)
    assert sparse_settings(loaded.config).cca_window == 9
    assert loaded.model.layers[1].self_attn.sparse.group == 2


def test_invalid_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="topk must be >= 1"):
        _pair("llama", "sparsek", sparsek_topk=0)
    with pytest.raises(ValueError, match="sparse_method must be one of"):
        _pair("llama", "bogus")


def test_scores_stay_float32_under_autocast():
    _, model = _pair("llama", "sparsek", seed=17)
    scorer = model.model.layers[0].self_attn.scorer
    x = torch.randn(1, 5, TINY["hidden_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = scorer(x, torch.arange(5)[None] + 10**6)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, scorer(x, torch.arange(5)[None] + 10**6))


@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_attention_runs_in_the_autocast_dtype(method, monkeypatch):
    """Under autocast, rotary embeddings hand the attention float32 q/k and bf16 v (cos/sin are
    float32); the sparse attention, like SDPA, must run in the autocast dtype, and train."""
    import sparsek.runtime.modeling_sparsek as modeling

    name = "sparsek_attention" if method == "sparsek" else "cca_attention"
    op, seen = getattr(modeling, name), []

    def spy(q, k, v, *args, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return op(q, k, v, *args, **kw)

    monkeypatch.setattr(modeling, name, spy)
    _, model = _pair("llama", method, seed=19)
    ids = torch.randint(0, TINY["vocab_size"], (2, 23))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_gpu_autocast_training_step(method):
    """The case that broke `adapt` with CCA on the H100: bf16 autocast, Triton kernels, backward."""
    _, model = _pair("llama", method, seed=21)
    model = model.cuda()
    ids = torch.randint(0, TINY["vocab_size"], (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
