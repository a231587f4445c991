"""Packed documents (``cu_seqlens``) for SparseK and CCA: kernels, references and the model.

A pack of documents must behave exactly like the documents run alone (queries == keys per
document, causal, nothing crosses a boundary), for the PyTorch references and the Triton kernels,
outputs and every gradient. CPU: the kernels under the Triton interpreter (tests/conftest.py) in
float32 and float16 with tiny blocks, so documents cut through blocks, band intervals and groups.
GPU (``-m gpu``): bfloat16 at larger shapes with flash-attention's 2x rule, and the memory of a
32K-token training pack of many short documents and one long one.
"""

from __future__ import annotations

import pytest
import torch

from sparsek.kernels import (
    cca_attention_reference,
    cca_pool_reference,
    cca_prefill_reference,
    sparsek_attention_reference,
    sparsek_triton_select,
)
from sparsek.kernels.cca_reference import cca_core_queries
from sparsek.kernels.cca_triton_attention import cca_attention_triton, cca_prefill_triton
from sparsek.kernels.cca_triton_pool import cca_pool_triton
from sparsek.kernels.sparsek_triton import sparsek_attention_triton

# Lengths 1 and 0 (an empty document), shorter than the window (3 < w), shorter than w + k (fewer
# candidates than k), and not multiples of any block size used below.
LENGTHS = [1, 3, 0, 7, 23]


def _cu(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _bounds(lengths: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in lengths:
        out.append((a, a + n))
        a += n
    return out


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _per_document(fn, inputs, dout, lengths, token_dims):
    """Run ``fn`` on each document alone and concatenate outputs and gradients along the tokens."""
    parts = []
    for a, e in _bounds(lengths):
        if e == a:
            continue
        doc = [t[..., a:e, :] if dim == 2 else t[..., a:e] for t, dim in zip(inputs, token_dims, strict=True)]
        parts.append(_grads(fn, doc, dout[:, :, a:e]))
    return [torch.cat([p[i] for p in parts], dim=2) for i in range(len(parts[0]))]


def _close(got, want, names, atol=2e-5, rtol=1e-4):
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- SparseK


def _sparsek_inputs(h, hkv, lengths, d, dtype=torch.float32, device="cpu", seed=0, score_scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(1, h, t, d, generator=gen).to(device, dtype)
    k = torch.randn(1, hkv, t, d, generator=gen).to(device, dtype)
    v = torch.randn(1, hkv, t, d, generator=gen).to(device, dtype)
    u = (torch.randn(1, hkv, t, generator=gen) * score_scale).to(device)
    do = torch.randn(1, h, t, d, generator=gen).to(device, dtype)
    return [q, k, v, u], do


_SK_NAMES = ("out", "dq", "dk", "dv", "dscores")


def _boundary_keys(u: torch.Tensor, lengths: list[int], topk: int, window: int) -> torch.Tensor:
    """Keys whose gate sits at 0 or 1 within float32 precision of tau for some query, ``[1, Hkv, T]``.

    SPARSEK's score gradient is discontinuous where a gate reaches 0 or 1 (a key enters or leaves F),
    and the kernels compute tau in float32 (SPEC 1.3 allows it): for such a key the kernel and a
    float64 reference may take different sides. Tolerance: the tau tests' bound (~8 ulps of the
    scores + 1e-5).
    """
    from sparsek.kernels.sparsek_projection import sparsek_threshold

    out = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    for a, e in _bounds(lengths):
        n = e - a
        if n <= window + topk:
            continue
        for h in range(u.shape[1]):
            uu = u[0, h, a:e].double()
            pos = torch.arange(n, device=u.device)
            cand = pos[None, :] <= (pos[:, None] - window)
            tau = sparsek_threshold(uu.expand(n, -1), topk, cand)
            eps = 1e-6 * uu.abs().max().clamp(min=1) + 1e-5
            d = uu[None, :] - tau[:, None]
            near = cand & torch.isfinite(tau)[:, None] & ((d.abs() <= eps) | ((d - 1).abs() <= eps))
            out[0, h, a:e] = near.any(0)
    return out


def test_boundary_keys_flags_only_keys_at_a_gate_edge():
    """The GPU tests compare d(scores) away from keys at a gate of 0 or 1 (``_boundary_keys``):
    it must flag such a key and almost nothing else."""
    from sparsek.kernels.sparsek_projection import sparsek_threshold

    lengths, topk, window = [40, 9, 50], 6, 4
    u = torch.randn(1, 2, sum(lengths), generator=torch.Generator().manual_seed(3))
    assert _boundary_keys(u, lengths, topk, window).float().mean().item() < 0.05
    a, n, i = 49, 50, 30  # third document: move a key with gate 0 at query 30 onto tau_30 (gate still ~0)
    uu = u[0, 0, a:a + n].double()
    cand = torch.arange(n) <= i - window
    tau = sparsek_threshold(uu[None], topk, cand[None])[0]
    j = int(torch.nonzero(cand & (uu <= tau))[0])
    u[0, 0, a + j] = tau.float()
    assert _boundary_keys(u, lengths, topk, window)[0, 0, a + j]


def _check_sparsek_packed(h, hkv, lengths, d, topk, window, seed=0, alone=True):
    """Triton pack vs reference pack (= each document alone, by construction) and, with ``alone``,
    vs the Triton kernels on each document alone."""
    inputs, do = _sparsek_inputs(h, hkv, lengths, d, seed=seed)
    cu = _cu(lengths)
    packed = _grads(lambda *x: sparsek_attention_triton(*x, topk, window, cu_seqlens=cu), inputs, do)
    ref = _grads(lambda *x: sparsek_attention_reference(*x, topk, window, cu_seqlens=cu), inputs, do)
    _close(packed, ref, _SK_NAMES)
    if alone:
        docs = _per_document(lambda *x: sparsek_attention_triton(*x, topk, window), inputs, do, lengths, (2, 2, 2, 1))
        _close(packed, docs, _SK_NAMES)
    return packed


@pytest.mark.parametrize("g,hkv", [(1, 2), (3, 1), (4, 1), (8, 1)])
def test_sparsek_packed_equals_documents_alone(one_thread, g, hkv):
    """Triton pack == Triton on each document alone == reference pack, outputs and all gradients."""
    got = _check_sparsek_packed(g * hkv, hkv, LENGTHS, 16, topk=5, window=4, seed=g)
    assert got[4].abs().sum() > 0, "the scores must get a gradient through fractional gates"


def test_sparsek_packed_band_path(one_thread, monkeypatch):
    """Band selection (anchors every 8 queries, a band level for the others): intervals and
    interval lists per document, a document too short for any interval, block lists from them."""
    monkeypatch.setattr(sparsek_triton_select, "default_strides", lambda lq: (8, 1))
    _check_sparsek_packed(4, 2, [18, 1, 2, 11], 16, topk=4, window=3, seed=5, alone=False)


def test_sparsek_packed_reference_equals_documents_alone():
    """The reference with ``cu_seqlens`` is the documents run alone (and ignores nothing)."""
    inputs, do = _sparsek_inputs(6, 2, LENGTHS, 8, dtype=torch.float64)
    cu = _cu(LENGTHS)
    packed = _grads(lambda *x: sparsek_attention_reference(*x, 4, 3, cu_seqlens=cu), inputs, do)
    alone = _per_document(lambda *x: sparsek_attention_reference(*x, 4, 3), inputs, do, LENGTHS, (2, 2, 2, 1))
    _close(packed, alone, _SK_NAMES, atol=1e-12, rtol=0)
    whole = sparsek_attention_reference(*inputs, 4, 3)  # without cu_seqlens documents see each other
    assert (whole - packed[0]).abs().max() > 1e-3


def test_sparsek_packed_fp16_flash_rule(one_thread):
    h, hkv, d, topk, window = 4, 1, 32, 6, 5
    lengths = [12, 1, 20]
    inputs, do = _sparsek_inputs(h, hkv, lengths, d, dtype=torch.float16, seed=3)
    cu = _cu(lengths)
    got = _grads(lambda *x: sparsek_attention_triton(*x, topk, window, cu_seqlens=cu), inputs, do)
    ref16 = _grads(lambda *x: sparsek_attention_reference(*x, topk, window, cu_seqlens=cu), inputs, do)
    ref64 = _grads(lambda *x: sparsek_attention_reference(*x, topk, window, cu_seqlens=cu),
                   [t.double() for t in inputs], do.double())
    for name, a, r, r64 in zip(_SK_NAMES, got, ref16, ref64, strict=True):
        assert a.dtype == r.dtype and torch.isfinite(a).all(), name
        assert _rel(a, r64) <= 2 * _rel(r, r64) + 1e-6, (name, _rel(a, r64), _rel(r, r64))


def test_sparsek_selection_kernels_compile_alike_packed_and_alone():
    """On the GPU a packed document must be bit-identical to itself alone. Triton would specialise the
    selection kernels on whether the score length ``Lk`` (total packed tokens vs the document's own
    length) is a multiple of 16 and compile the score reductions differently, moving tau by ulps; the
    interpreter has no such specialisation, so CPU runs cannot see it. Guard the declaration here; the
    bitwise comparison itself is ``test_gpu_sparsek_packed_bf16``."""
    from triton.runtime.jit import JITFunction

    from sparsek.kernels import sparsek_triton_select as sel

    for kernel in (sel._anchor_kernel, sel._band_build_kernel, sel._band_select_kernel):
        if not isinstance(kernel, JITFunction):  # under the interpreter: build what the GPU would
            kernel = JITFunction(kernel.fn, **kernel.kwargs)
        params = {p.name: p for p in kernel.params}
        assert params["Lk"].do_not_specialize_on_alignment, kernel
        assert not params["Lq"].do_not_specialize_on_alignment, kernel  # only what needs it


@pytest.mark.parametrize("fn", [sparsek_attention_reference, sparsek_attention_triton])
def test_sparsek_packed_bad_input(fn):
    inputs, _ = _sparsek_inputs(2, 1, [3, 4], 16)
    cu = _cu([3, 4])
    with pytest.raises(ValueError, match="excludes seqlens and q_offsets"):
        fn(*inputs, 2, 2, None, torch.tensor([7]), None, cu)
    with pytest.raises(ValueError, match="excludes seqlens and q_offsets"):
        fn(*inputs, 2, 2, None, None, torch.tensor([0]), cu)
    with pytest.raises(ValueError, match="rise from 0 to the 7 packed tokens"):
        fn(*inputs, 2, 2, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="rise from 0"):
        fn(*inputs, 2, 2, cu_seqlens=torch.tensor([0, 5, 3, 7]))
    two = [torch.cat([t, t]) for t in inputs]
    with pytest.raises(ValueError, match=r"q \[1, H, T, d\]"):
        fn(*two, 2, 2, cu_seqlens=cu)


# ---------------------------------------------------------------- CCA


def _cca_inputs(h, hkv, lengths, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, do = (torch.randn(1, h, t, d, generator=gen).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, hkv, t, d, generator=gen).to(device, dtype) for _ in range(2))
    return [q, k, v], do


_CCA_NAMES = ("out", "dq", "dk", "dv")


def _check_cca_packed(h, hkv, lengths, d, group, window, seed=0, alone=True):
    inputs, do = _cca_inputs(h, hkv, lengths, d, seed=seed)
    cu = _cu(lengths)
    packed = _grads(lambda *x: cca_prefill_triton(*x, group, window, cu_seqlens=cu), inputs, do)
    ref = _grads(lambda *x: cca_prefill_reference(*x, group, window, cu_seqlens=cu), inputs, do)
    _close(packed, ref, _CCA_NAMES)
    if alone:
        docs = _per_document(lambda *x: cca_prefill_triton(*x, group, window), inputs, do, lengths, (2, 2, 2))
        _close(packed, docs, _CCA_NAMES)


@pytest.mark.parametrize("g,hkv,group,window", [(1, 2, 4, 6), (3, 1, 3, 5), (4, 1, 2, 4), (8, 1, 5, 3)])
def test_cca_packed_equals_documents_alone(one_thread, g, hkv, group, window):
    """Pooling + attention of a pack == each document alone (Triton) == reference pack: documents
    shorter than a group, than the window, and cut through 16-row blocks and 16-key tiles."""
    _check_cca_packed(g * hkv, hkv, LENGTHS, 16, group, window, seed=g)


@pytest.mark.parametrize("impl,opts", [("tiles", {}), ("split", {"nsplit": 3, "fuse": False})])
def test_cca_packed_dkdv_variants(one_thread, monkeypatch, impl, opts):
    """The other dK/dV backwards: per-tile kernel, and split pieces (packed partial workspace)."""
    from sparsek.kernels import cca_triton_attention as mod

    monkeypatch.setattr(mod, "DKDV_IMPL", impl)
    monkeypatch.setattr(mod, "SPLIT_OPTIONS", {"nsplit": None, "fuse": True, "two_pass": False, **opts})
    _check_cca_packed(4, 1, [2, 40, 0, 9], 16, 2, 5, seed=9, alone=False)


def test_cca_packed_pool_and_attention_ops(one_thread):
    """The two ops on their own (explicit cores): pooling queries per document, all five gradients."""
    h, hkv, d, group, window = 4, 2, 16, 3, 4
    lengths = [8, 2, 13]
    cu = _cu(lengths)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, h, 23, d, generator=gen)
    k, v = torch.randn(1, hkv, 23, d, generator=gen), torch.randn(1, hkv, 23, d, generator=gen)
    q_last = cca_core_queries(q, group, cu)
    assert q_last.shape[2] == 8 // 3 + 2 // 3 + 13 // 3
    torch.testing.assert_close(q_last[:, :, 2], q[:, :, 10 + 2])  # document 2's first group ends at token 12
    dcore = torch.randn(1, hkv, q_last.shape[2], 2 * d, generator=gen)
    pool = [_grads(lambda *x, fn=fn: torch.cat(fn(*x, group, cu_seqlens=cu), dim=-1), [q_last, k, v], dcore)
            for fn in (cca_pool_triton, cca_pool_reference)]
    _close(pool[0], pool[1], ("cores", "dq_last", "dk", "dv"))
    kc, vc = (torch.randn(1, hkv, q_last.shape[2], d, generator=gen) for _ in range(2))
    do = torch.randn(1, h, 23, d, generator=gen)
    att = [_grads(lambda *x, fn=fn: fn(*x, group, window, cu_seqlens=cu), [q, k, v, kc, vc], do)
           for fn in (cca_attention_triton, cca_attention_reference)]
    _close(att[0], att[1], ("out", "dq", "dk", "dv", "dk_core", "dv_core"))
    for fn in (cca_attention_triton, cca_attention_reference):
        with pytest.raises(ValueError, match=r"packed cores must be \[1, Hkv, 6, d\]"):
            fn(q, k, v, kc[:, :, :5], vc[:, :, :5], group, window, cu_seqlens=cu)
        with pytest.raises(ValueError, match="excludes seqlens"):
            fn(q, k, v, kc, vc, group, window, None, torch.tensor([23]), cu_seqlens=cu)


def test_cca_packed_fp16_flash_rule(one_thread):
    from .test_cca_triton import _flash_rule, _lowp_prefill

    lengths = [17, 1, 20]
    cu = _cu(lengths)
    group, window = 4, 6
    inputs, _ = _cca_inputs(8, 2, lengths, 16, dtype=torch.float16, seed=11)
    inputs = [t.requires_grad_() for t in inputs]
    grad_outs = [torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]

    def lowp(q, k, v):
        return torch.cat([_lowp_prefill(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], group, window)
                          for a, e in _bounds(lengths) if e > a], dim=2)

    _flash_rule(lambda *x: cca_prefill_triton(*x, group, window, cu_seqlens=cu), lowp,
                lambda *x: cca_prefill_reference(*x, group, window, cu_seqlens=cu), inputs, grad_outs)


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_model_packed_row_equals_separate_rows(method):
    """A converted model on one packed row (position ids restarting at every document, as
    DataCollatorWithFlattening makes them) gives each document the logits it gets alone; the
    flash-attention kwargs (cu_seq_lens_q/k) and a batch of two packed rows give the same."""
    from .test_model_integration import _ids, _pair

    _, model = _pair("llama", method, seed=7)
    lengths = [9, 1, 4, 13]
    ids = _ids(batch=1, length=sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = _cu(lengths)
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits
        for a, e in _bounds(lengths):
            torch.testing.assert_close(packed[0, a:e], model(ids[:, a:e]).logits[0], atol=2e-5, rtol=0)
        flash = model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=13, max_length_k=13)
        torch.testing.assert_close(flash.logits, packed, atol=0, rtol=0)
        assert (model(ids).logits - packed).abs().max() > 1e-3  # plain positions: one long document
        two = model(torch.cat([ids, ids.flip(1)]), position_ids=torch.cat([pos, pos.flip(1) * 0 + pos])).logits
        torch.testing.assert_close(two[0], packed[0], atol=2e-5, rtol=0)
        rev = ids.flip(1)
        for a, e in _bounds(lengths):
            torch.testing.assert_close(two[1, a:e], model(rev[:, a:e]).logits[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_model_takes_data_collator_with_flattening(flash_kwargs):
    """What transformers' own packing collator hands the model (position ids, optionally the
    flash-attention cu_seq_lens/max_length kwargs) gives each document its logits alone."""
    from transformers import DataCollatorWithFlattening

    from .test_model_integration import _ids, _pair

    _, model = _pair("qwen3", "cca", seed=2)
    docs = [_ids(batch=1, length=n, seed=n)[0] for n in (6, 1, 11)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d.tolist()} for d in docs])
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    with torch.no_grad():
        logits = model(**batch).logits
        for (a, e), d in zip(_bounds([6, 1, 11]), docs, strict=True):
            torch.testing.assert_close(logits[0, a:e], model(d[None]).logits[0], atol=2e-5, rtol=0)


def test_model_packed_training_step_reaches_the_scorer():
    from .test_model_integration import _ids, _pair

    _, model = _pair("llama", "sparsek", seed=3)
    model.train()
    lengths = [12, 5, 20]
    ids = _ids(batch=1, length=sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    model(ids, position_ids=pos, labels=ids).loss.backward()
    assert all(layer.self_attn.scorer.weight.grad.abs().sum() > 0 for layer in model.model.layers)


# ---------------------------------------------------------------- GPU (device tool)

gpu = pytest.mark.gpu
GPU_LENGTHS = [1, 700, 37, 2000, 0, 64, 15, 1300]


@gpu
@pytest.mark.parametrize("g,d", [(1, 64), (4, 128), (8, 96)])
def test_gpu_sparsek_packed_bf16(monkeypatch, g, d):
    """bf16 pack: flash-attention's rule against the float64 reference, no NaN/Inf, forward equal
    to each document run alone, bit for bit (same kernels, same tiles, and the same selection
    levels: a pack takes those of its longest document, so the documents alone are given them)."""
    levels = sparsek_triton_select.default_strides(max(GPU_LENGTHS))
    monkeypatch.setattr(sparsek_triton_select, "default_strides", lambda lq: levels)
    hkv, topk, window = 2, 128, 64
    inputs, do = _sparsek_inputs(g * hkv, hkv, GPU_LENGTHS, d, dtype=torch.bfloat16, device="cuda", seed=g,
                                 score_scale=1.0)
    cu = _cu(GPU_LENGTHS, "cuda")
    got = _grads(lambda *x: sparsek_attention_triton(*x, topk, window, cu_seqlens=cu), inputs, do)
    refb = _grads(lambda *x: sparsek_attention_reference(*x, topk, window, cu_seqlens=cu), inputs, do)
    ref64 = _grads(lambda *x: sparsek_attention_reference(*x, topk, window, cu_seqlens=cu),
                   [t.double() for t in inputs], do.double())
    ambiguous = _boundary_keys(inputs[3].detach(), GPU_LENGTHS, topk, window)
    assert ambiguous.float().mean().item() < 0.01, ambiguous.float().mean().item()
    for name, a, r, r64 in zip(_SK_NAMES, got, refb, ref64, strict=True):
        assert torch.isfinite(a).all(), name
        if name == "dscores":  # compared away from SPARSEK's boundary (see _boundary_keys)
            a, r, r64 = a[~ambiguous], r[~ambiguous], r64[~ambiguous]
        ek, er = _rel(a, r64), _rel(r, r64)
        print(f"{name}: kernel {ek:.2e} reference-bf16 {er:.2e}")
        assert ek <= 2 * er + 1e-6, (name, ek, er)
    for a, e in _bounds(GPU_LENGTHS):
        if e > a:
            alone = sparsek_attention_triton(*(t[..., a:e, :] for t in inputs[:3]), inputs[3][..., a:e], topk, window)
            assert torch.equal(got[0][:, :, a:e], alone), (a, e)


@gpu
@pytest.mark.parametrize("g,d", [(1, 64), (4, 128), (16, 128)])
def test_gpu_cca_packed_bf16(g, d):
    from .test_cca_triton import _flash_rule, _lowp_prefill

    hkv, group, window = 2, 16, 256
    cu = _cu(GPU_LENGTHS, "cuda")
    inputs, _ = _cca_inputs(g * hkv, hkv, GPU_LENGTHS, d, dtype=torch.bfloat16, device="cuda", seed=g)
    inputs = [t.requires_grad_() for t in inputs]
    grad_outs = [torch.randn(inputs[0].shape, dtype=torch.float64, device="cuda")]

    def lowp(q, k, v):
        return torch.cat([_lowp_prefill(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], group, window)
                          for a, e in _bounds(GPU_LENGTHS) if e > a], dim=2)

    _flash_rule(lambda *x: cca_prefill_triton(*x, group, window, cu_seqlens=cu), lowp,
                lambda *x: cca_prefill_reference(*x, group, window, cu_seqlens=cu), inputs, grad_outs)
    with torch.no_grad():
        out = cca_prefill_triton(*inputs, group, window, cu_seqlens=cu)
        for a, e in _bounds(GPU_LENGTHS):
            if e > a:
                alone = cca_prefill_triton(*(t[:, :, a:e] for t in inputs), group, window)
                assert torch.equal(out[:, :, a:e], alone), (a, e)


@gpu
@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_gpu_packed_training_pack_memory(method):
    """A 32K-token pack of 50 short documents and one long one needs about the memory of one 32K
    row (no N x max_len x d buffers anywhere): peak of forward + backward within 1.25x."""
    hkv, g, d = 8, 4, 128
    lengths = [200 + 7 * i for i in range(50)]
    lengths.append(32768 - sum(lengths))
    cu = _cu(lengths, "cuda")

    def peak(cu_seqlens):
        inputs, do = _sparsek_inputs(g * hkv, hkv, lengths, d, dtype=torch.bfloat16, device="cuda", score_scale=1.0)
        leaves = [t.requires_grad_() for t in (inputs if method == "sparsek" else inputs[:3])]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if method == "sparsek":
            out = sparsek_attention_triton(*leaves, 2048, 512, cu_seqlens=cu_seqlens)
        else:
            out = cca_prefill_triton(*leaves, 16, 1024, cu_seqlens=cu_seqlens)
        out.backward(do)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    packed, one_row = peak(cu), peak(None)
    print(f"{method}: peak extra memory packed {packed / 2**20:.0f} MiB, one 32K row {one_row / 2**20:.0f} MiB")
    assert packed <= 1.25 * one_row + 64 * 2**20, (packed, one_row)
