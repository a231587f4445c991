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
from sparsek.runtime.transformers_compat import with_cache

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
            out = model(ids[:, c0:c1], attention_mask=mask[:, :c1], position_ids=pos[:, c0:c1], **with_cache(model, cache))
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
        logits.append(model(ids[:, :40], **with_cache(model, cache)).logits)
        for t in range(40, length):
            logits.append(model(ids[:, t : t + 1], **with_cache(model, cache), position_ids=torch.tensor([[t]])).logits)
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
        out = model.generate(ids, **with_cache(model, cache), max_new_tokens=5, do_sample=False, num_beams=1)
    assert out.shape == (2, 16)
    assert cache.get_seq_length() == 15
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.layers[0].count.tolist() == [15, 15]


def _sparsek_layer(w: int, k: int):
    from sparsek.runtime.cache_sparsek import SparseKLayer
    from sparsek.runtime.configuration_sparsek import SparseSettings

    return SparseKLayer(SparseSettings("sparsek", k, w, 1 / 16, 16, 1024), 0)


def _first_chunk_state(lengths, w, k, fast: bool, seed: int, ties: bool):
    """The state of an empty SparseK layer after one left-padded chunk (general or fast path)."""
    from sparsek.runtime.cache_sparsek import new_token_positions

    g = torch.Generator().manual_seed(seed)
    b, hkv, d, c = len(lengths), 3, 8, max(lengths)
    key = torch.randn(b, hkv, c, d, generator=g)
    value = torch.randn(b, hkv, c, d, generator=g)
    if ties:  # few distinct values: many ties at the k-th score and at tau's band edges
        scores = torch.randint(-3, 4, (b, hkv, c), generator=g).float() * 0.5
        if ties == "zeros":  # the k-th score is 0 and tied: -0.0 and +0.0 must be one value
            scores = (scores > 2).float()
        flip = torch.rand(b, hkv, c, generator=g) < 0.5  # -0.0 and +0.0 are one tied value
        scores = torch.where((scores == 0) & flip, torch.full_like(scores, -0.0), scores)
    else:
        scores = torch.randn(b, hkv, c, generator=g) * 0.3 + torch.arange(c) / 16
    mask = torch.zeros(b, c, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, c - n :] = True
    layer = _sparsek_layer(w, k)
    layer._init(key)
    if fast:
        layer._build_from_chunk(key, value, scores, mask)
    else:
        layer._update(key, value, scores, mask, new_token_positions(layer.count, mask), grow=True)
    return layer


@pytest.mark.parametrize("ties", [False, True, "zeros"])
@pytest.mark.parametrize(
    "w,k,lengths",
    [
        (6, 5, [4, 1, 3]),  # L < w
        (6, 5, [9, 6, 7, 2]),  # w <= L < w + k
        (4, 5, [200, 57, 130, 0]),  # L >> w + k, an all-padding row
        (3, 7, [90, 10, 11, 12]),  # candidates just above / below k
    ],
)
def test_sparsek_fast_first_chunk_equals_general_update(w, k, lengths, ties):
    """The empty-cache build gives the general update's state: same validity, positions, scores,
    gates and K/V of every valid slot, same live score-only candidates, same capacity."""
    for seed in range(3):
        ref = _first_chunk_state(lengths, w, k, fast=False, seed=seed, ties=ties)
        got = _first_chunk_state(lengths, w, k, fast=True, seed=seed, ties=ties)
        assert torch.equal(got.valid, ref.valid) and torch.equal(got.count, ref.count)
        v = ref.valid
        assert torch.equal(got.pos[v], ref.pos[v])
        assert torch.equal(got.score[v], ref.score[v])
        assert torch.equal(got.gates, ref.gates)
        assert torch.equal(got.kbuf[v], ref.kbuf[v]) and torch.equal(got.vbuf[v], ref.vbuf[v])
        assert got.extra.shape == ref.extra.shape
        assert torch.equal(got.extra_valid, ref.extra_valid)
        assert torch.equal(got.extra[ref.extra_valid], ref.extra[ref.extra_valid])
        if ties and max(lengths) > w + k:  # the case is exercised: ties at the k-th score
            assert int(ref.extra_valid.sum()) > 0 or bool((ref.gates[..., w:] < 1).any())


def test_sparsek_fast_first_chunk_then_decode_matches_general():
    """After the fast build, decode steps give the same state as after the general build."""
    w, k, lengths = 4, 5, [40, 23]
    layers = [_first_chunk_state(lengths, w, k, fast=f, seed=7, ties=True) for f in (False, True)]
    g = torch.Generator().manual_seed(8)
    for _ in range(12):
        key = torch.randn(2, 3, 1, 8, generator=g)
        u = torch.randint(-3, 4, (2, 3, 1), generator=g).float() * 0.5 + 2
        for layer in layers:
            layer.reserve(1)
            layer._decode_update(key, key, u)
    ref, got = layers
    v = ref.valid
    assert torch.equal(got.valid, v) and torch.equal(got.pos[v], ref.pos[v]) and torch.equal(got.gates, ref.gates)
    assert torch.equal(got.kbuf[v], ref.kbuf[v])
    assert torch.equal(torch.sort(got.extra.masked_fill(~got.extra_valid, -1e9), -1).values,
                      torch.sort(ref.extra.masked_fill(~ref.extra_valid, -1e9), -1).values)
