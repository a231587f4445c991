"""Bounded caches (SPEC 1.5, 2.4): prefill and decode agree at every position, the bound holds.

Tiny random models of every supported architecture, both methods, lengths crossing the window,
k and group boundaries, left-padded batches, chunked continuation.
"""

import pytest
import torch

from sparsek.runtime.cache_cca import CCACache, make_cache
from sparsek.runtime.cache_sparsek import SparseKCache
from sparsek.runtime.configuration_sparsek import CONFIG_CLASSES
from sparsek.runtime.modeling_sparsek import MODEL_CLASSES

W, K, GROUP, S = 4, 5, 3, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(arch: str, method: str, layers: int = 2, seed: int = 0, **over):
    torch.manual_seed(seed)
    fields = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers,
        intermediate_size=96, vocab_size=97, head_dim=16, max_position_embeddings=512,
        sparse_method=method, sparsek_topk=K, sparsek_window=W, cca_group=GROUP, cca_window=S,
    )
    fields.update(over)
    model = MODEL_CLASSES[arch](CONFIG_CLASSES[arch](**fields)).eval()
    for mod in model.modules():  # non-trivial selection: random scorers
        if hasattr(mod, "scorer"):
            torch.nn.init.normal_(mod.scorer.weight, std=0.5)
            torch.nn.init.normal_(mod.scorer.bias, std=0.5)
    return model


def decode_all(model, ids, mask=None, first=1, chunk=1):
    """Prefill ``first`` columns, then feed the rest ``chunk`` columns at a time."""
    cache = make_cache(model)
    if mask is None:
        mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = []
    with torch.no_grad():
        for c0 in [0, *range(first, ids.shape[1], chunk)]:
            c1 = first if c0 == 0 else min(ids.shape[1], c0 + chunk)
            out = model(ids[:, c0:c1], attention_mask=mask[:, :c1], position_ids=pos[:, c0:c1], past_key_values=cache)
            outs.append(out.logits)
    return torch.cat(outs, 1), cache


CASES = [(arch, method) for arch in ("llama", "mistral", "qwen2", "qwen3") for method in ("sparsek", "cca")]


@pytest.mark.parametrize("arch,method", CASES)
def test_token_by_token_decode_equals_prefill(arch, method):
    model = tiny_model(arch, method)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    dec, cache = decode_all(model, ids)
    assert torch.allclose(dec, full, atol=1e-4), (dec - full).abs().max()
    assert isinstance(cache, CCACache if method == "cca" else SparseKCache)


@pytest.mark.parametrize("method", ["sparsek", "cca"])
@pytest.mark.parametrize("first,chunk", [(9, 1), (1, 6), (13, 4), (2, 30)])
def test_chunked_prefill_equals_prefill(method, first, chunk):
    model = tiny_model("llama", method)
    ids = torch.randint(0, 97, (2, 31), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
    dec, _ = decode_all(model, ids, first=first, chunk=chunk)
    assert torch.allclose(dec, full, atol=1e-4), (dec - full).abs().max()


@pytest.mark.parametrize("arch,method", [("qwen2", "sparsek"), ("llama", "cca"), ("mistral", "sparsek"), ("qwen3", "cca")])
def test_left_padded_batch(arch, method):
    """Each row of a left-padded batch gives the logits of that row alone, in prefill and decode."""
    model = tiny_model(arch, method)
    g = torch.Generator().manual_seed(3)
    lengths = [26, 17, 9]
    total = max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = []
    for i, n in enumerate(lengths):
        row = torch.randint(1, 97, (n,), generator=g)
        rows.append(row)
        ids[i, total - n :] = row
        mask[i, total - n :] = 1
    dec, _ = decode_all(model, ids, mask, first=12, chunk=1)
    chunked, _ = decode_all(model, ids, mask, first=5, chunk=7)
    with torch.no_grad():
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            n = lengths[i]
            assert torch.allclose(dec[i, total - n :], alone, atol=1e-4), (i, (dec[i, total - n :] - alone).abs().max())
            assert torch.allclose(chunked[i, total - n :], alone, atol=1e-4)


@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_cache_bound_at_long_length(method):
    """At lengths >> w + k the cache holds w + k (SparseK) / s + g raw + one core per group (CCA)."""
    model = tiny_model("llama", method, layers=1, vocab_size=31)
    length = 160
    ids = torch.randint(0, 31, (1, length), generator=torch.Generator().manual_seed(4))
    cache = make_cache(model)
    logits = []
    with torch.no_grad():
        logits.append(model(ids[:, :40], past_key_values=cache).logits)
        for t in range(40, length):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]])).logits)
            held = cache.stored_kv_entries()
            layer = cache.layers[0]
            if method == "sparsek":
                assert int(held.max()) == W + K  # exactly full once t >= w + k
                assert layer.kbuf.shape[2] == W + K  # allocated slots never grow
                assert int(layer.extra_valid.sum(-1).max()) <= layer.extra.shape[-1]
            else:
                p = max(0, (t + 1 - S) // GROUP)
                raw = int((layer.raw_pos >= 0).sum())
                assert raw <= S + GROUP and int(layer.ncores[0]) == p
                assert int(layer.valid[0, 0, : S + GROUP].sum()) == t + 1 - p * GROUP  # visible raw keys
        full = model(ids).logits
    assert torch.allclose(torch.cat(logits, 1), full, atol=1e-4)
    assert cache.get_seq_length() == length
    assert cache.kv_bytes() > 0


def test_sparsek_cache_selection_matches_reference_state():
    """The cached top-k keys are exactly the reference selection of the last query."""
    from sparsek.kernels import sparsek_select

    model = tiny_model("llama", "sparsek", layers=1)
    attn = model.model.layers[0].self_attn
    seen = {}

    def hook(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, cache = decode_all(model, ids, first=20)
        model(ids)
    handle.remove()
    scores = attn.scorer(seen["x"], torch.arange(37)[None])
    last = torch.tensor([[36]])
    _, selected, gates = sparsek_select(scores, last, torch.tensor([37]), K, W)
    layer = cache.layers[0]
    for h in range(2):
        want = set(torch.nonzero(selected[0, h, 0]).flatten().tolist())
        got = set(layer.pos[0, h, W:][layer.valid[0, h, W:]].tolist())
        assert got == want
        ref_g = gates[0, h, 0, sorted(want)]
        order = torch.argsort(layer.pos[0, h, W:][layer.valid[0, h, W:]])
        assert torch.allclose(layer.gates[0, h, W:][layer.valid[0, h, W:]][order], ref_g, atol=1e-5)


def test_generate_accepts_bounded_cache_and_beam_reorder():
    model = tiny_model("llama", "sparsek")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(6))
    cache = make_cache(model)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False, num_beams=1)
    assert out.shape == (2, 16)
    assert cache.get_seq_length() == 15
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.layers[0].count.tolist() == [15, 15]
