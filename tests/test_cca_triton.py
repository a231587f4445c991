"""CCA Triton kernels (pooling, attention, prefill) against the PyTorch references.

CPU: the kernels run under the Triton interpreter (tests/conftest.py) in float32 and float16 on
tiny shapes with tiny blocks (16 rows x 16 keys), so lengths, group sizes and windows cut through
many tile boundaries. GPU (``-m gpu``): bfloat16 at larger shapes with flash-attention's rule, for both dK/dV backward
paths (``DKDV_IMPL`` "split" and "tiles"), bit-identical repeated forward and backward.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sparsek.kernels.cca_reference import (
    cca_attention_reference,
    cca_pool_reference,
    cca_prefill_reference,
    visible_cores,
)
from sparsek.kernels.cca_triton_attention import cca_attention_triton, cca_prefill_triton
from sparsek.kernels.cca_triton_pool import cca_pool_triton

interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run the kernels under the Triton interpreter"
)


def _leaf(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()


def _run(fn, inputs, grad_outs):
    """Outputs of ``fn(*inputs)`` and the gradients of ``sum(out * grad_out)`` w.r.t. ``inputs``."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grad_outs, strict=True))
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs], [g.detach() for g in grads]


def _assert_all_close(got, want, atol=1e-4, rtol=1e-4):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert torch.isfinite(a).all(), f"tensor {i} has NaN/Inf"
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, i=i: f"tensor {i}: {m}")


def _lowp_attention(q, k, v, k_core, v_core, group, window, scale=None, seqlens=None, q_offsets=None):
    """The same CCA math as the reference, but every product and the softmax at the inputs' dtype
    (what "PyTorch at that dtype" means in flash-attention's tolerance rule)."""
    b, h, lq, d = q.shape
    hkv, lk, n = k.shape[1], k.shape[2], k_core.shape[2]
    scale = d**-0.5 if scale is None else scale
    dev = q.device
    q_pos = torch.arange(lq, device=dev)[None] + (
        (lk - lq) if q_offsets is None else q_offsets.to(dev, torch.long)[:, None]
    )
    kv_len = torch.full((b,), lk, device=dev) if seqlens is None else seqlens.to(dev, torch.long)
    q_ok = ((q_pos >= 0) & (q_pos < kv_len[:, None]))[:, :, None]
    p = visible_cores(q_pos, group, window)[:, :, None]
    j = torch.arange(lk, device=dev)
    raw = (j >= p * group) & (j <= q_pos[:, :, None]) & (j < kv_len[:, None, None]) & q_ok
    cores = (torch.arange(n, device=dev) < p) & q_ok
    vis = torch.cat([cores, raw], -1)[:, None, None]
    keys = torch.cat([k_core, k], 2)
    vals = torch.cat([v_core, v], 2)
    qg = q.view(b, hkv, h // hkv, lq, d)
    logits = torch.einsum("bhgcd,bhjd->bhgcj", qg, keys) * scale
    logits = logits.masked_fill(~vis, float("-inf"))
    logits = torch.where(vis.any(-1, keepdim=True), logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, -1) * vis
    return torch.einsum("bhgcj,bhjd->bhgcd", probs, vals).reshape(b, h, lq, d)


def _lowp_prefill(q, k, v, group, window, scale=None, seqlens=None):
    n = k.shape[2] // group
    b, h, _, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kg = k[:, :, : n * group].reshape(b, hkv, n, group, d)
    vg = v[:, :, : n * group].reshape(b, hkv, n, group, d)
    qg = q[:, :, group - 1 : n * group : group].reshape(b, hkv, h // hkv, n, d)
    w = torch.softmax(torch.einsum("bhgnd,bhnjd->bhgnj", qg, kg) * scale, -1).mean(2)
    kc = torch.einsum("bhnj,bhnjd->bhnd", w, kg)
    vc = torch.einsum("bhnj,bhnjd->bhnd", w, vg)
    return _lowp_attention(q, k, v, kc, vc, group, window, scale, seqlens)


def _flash_rule(fn, lowp_fn, ref_fn, inputs, grad_outs, slack=2.0, floor=1e-5):
    """Kernel error <= slack x (error of the same math in PyTorch at the inputs' dtype), both
    measured against the float64 reference; checks outputs and every gradient."""
    got_o, got_g = _run(fn, inputs, grad_outs)
    low_o, low_g = _run(lowp_fn, inputs, grad_outs)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref_o, ref_g = _run(ref_fn, ref_inputs, grad_outs)
    for name, got, low, ref in zip(
        [f"out{i}" for i in range(len(got_o))] + [f"grad{i}" for i in range(len(got_g))],
        got_o + got_g, low_o + low_g, ref_o + ref_g,
        strict=True,
    ):
        assert torch.isfinite(got).all(), f"{name} has NaN/Inf"
        err = (got.double() - ref).abs().max().item()
        base = (low.double() - ref).abs().max().item()
        assert err <= slack * base + floor * max(1.0, ref.abs().max().item()), f"{name}: kernel {err:.3g} vs torch {base:.3g}"


# ---------------------------------------------------------------------------------------------
# CPU, under the interpreter


@interpreter
@pytest.mark.parametrize(
    "g_heads,hkv,n,lk,group",
    [(1, 2, 4, 18, 4), (3, 1, 3, 23, 5), (4, 2, 5, 16 * 5, 16), (8, 1, 2, 40, 16)],
)
def test_pool_matches_reference(g_heads, hkv, n, lk, group):
    gen = torch.Generator().manual_seed(n * 100 + group)
    b, d = 2, 16
    q_last = _leaf(b, hkv * g_heads, n, d, gen=gen)
    k, v = _leaf(b, hkv, lk, d, gen=gen), _leaf(b, hkv, lk, d, gen=gen)
    grad_outs = [torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    got = _run(lambda *x: cca_pool_triton(*x, group), [q_last, k, v], grad_outs)
    want = _run(lambda *x: cca_pool_reference(*x, group), [q_last, k, v], grad_outs)
    _assert_all_close(got[0] + got[1], want[0] + want[1])


@interpreter
@pytest.mark.parametrize(
    "g_heads,hkv,lk,d,group,window",
    [
        (1, 2, 37, 16, 4, 8),  # MHA, lengths off every block
        (3, 1, 50, 16, 5, 7),  # G=3 (13 positions per 16-row block), s not a multiple of g
        (4, 2, 45, 24, 3, 64),  # s >= L: dense causal; d=24 padded to 32
        (8, 1, 33, 16, 16, 10),  # G=8: 2 positions per block, g > s
        (4, 1, 100, 16, 2, 40),  # wide enough for fully visible (unmasked) core and raw tiles
    ],
)
def test_attention_matches_reference(g_heads, hkv, lk, d, group, window):
    gen = torch.Generator().manual_seed(lk * 10 + group)
    b, n = 2, lk // group
    q = _leaf(b, hkv * g_heads, lk, d, gen=gen)
    k, v = _leaf(b, hkv, lk, d, gen=gen), _leaf(b, hkv, lk, d, gen=gen)
    kc, vc = _leaf(b, hkv, n, d, gen=gen), _leaf(b, hkv, n, d, gen=gen)
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64)]
    inputs = [q, k, v, kc, vc]
    got = _run(lambda *x: cca_attention_triton(*x, group, window), inputs, grad_outs)
    want = _run(lambda *x: cca_attention_reference(*x, group, window), inputs, grad_outs)
    _assert_all_close(got[0] + got[1], want[0] + want[1])
    if window >= lk:  # nothing compressed: plain causal attention, checked against SDPA too
        dense = F.scaled_dot_product_attention(
            q.detach(), k.detach().repeat_interleave(g_heads, 1), v.detach().repeat_interleave(g_heads, 1), is_causal=True
        )
        torch.testing.assert_close(got[0][0], dense, atol=1e-5, rtol=1e-5)
        assert got[1][3].abs().max() == 0 and got[1][4].abs().max() == 0  # no core is visible


@interpreter
def test_attention_padded_batch_and_query_offsets():
    """Right padding (seqlens), decode-like Lq < Lk, a negative offset and queries past the end
    (both must output zeros and get zero gradients), and fewer cores than groups."""
    gen = torch.Generator().manual_seed(7)
    b, hkv, g_heads, lk, lq, d, group, window = 3, 2, 3, 40, 9, 16, 4, 6
    n = 8  # max P(i) is floor((39 + 1 - 6) / 4) = 8
    q = _leaf(b, hkv * g_heads, lq, d, gen=gen)
    k, v = _leaf(b, hkv, lk, d, gen=gen), _leaf(b, hkv, lk, d, gen=gen)
    kc, vc = _leaf(b, hkv, n, d, gen=gen), _leaf(b, hkv, n, d, gen=gen)
    seqlens = torch.tensor([40, 26, 33])
    q_offsets = torch.tensor([31, -3, 29])  # row 1: positions -3..5; row 2: 29..37, 33.. padded
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64)]
    inputs = [q, k, v, kc, vc]
    got = _run(lambda *x: cca_attention_triton(*x, group, window, None, seqlens, q_offsets), inputs, grad_outs)
    want = _run(lambda *x: cca_attention_reference(*x, group, window, None, seqlens, q_offsets), inputs, grad_outs)
    _assert_all_close(got[0] + got[1], want[0] + want[1])
    out, dq = got[0][0], got[1][0]
    assert out[1, :, :3].abs().max() == 0 and dq[1, :, :3].abs().max() == 0
    assert out[2, :, 4:].abs().max() == 0 and dq[2, :, 4:].abs().max() == 0
    assert got[1][1][1, :, 26:].abs().max() == 0  # padded keys get no gradient


@interpreter
@pytest.mark.parametrize(
    "g_heads,hkv,lk,group,window,seqlens",
    [(4, 2, 41, 4, 9, [41, 30]), (3, 1, 40, 5, 5, None), (1, 3, 29, 3, 2, [17, 29])],
)
def test_prefill_matches_reference(g_heads, hkv, lk, group, window, seqlens):
    gen = torch.Generator().manual_seed(lk + group)
    b, d = 2, 16
    q = _leaf(b, hkv * g_heads, lk, d, gen=gen)
    k, v = _leaf(b, hkv, lk, d, gen=gen), _leaf(b, hkv, lk, d, gen=gen)
    sl = None if seqlens is None else torch.tensor(seqlens)
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64)]
    got = _run(lambda *x: cca_prefill_triton(*x, group, window, None, sl), [q, k, v], grad_outs)
    want = _run(lambda *x: cca_prefill_reference(*x, group, window, None, sl), [q, k, v], grad_outs)
    _assert_all_close(got[0] + got[1], want[0] + want[1])


@interpreter
@pytest.mark.parametrize(
    "impl,opts,g_heads,hkv,lk,lq,group,window,seqlens,q_offsets",
    [
        # core query ranges cut into 3 pieces (uneven last piece), padding + offsets, G=3
        ("split", {"nsplit": 3}, 3, 1, 46, 14, 2, 5, [46, 37], [32, 22]),
        # 5 pieces: several are empty for late core tiles; two launches; G=8
        ("split", {"nsplit": 5, "fuse": False}, 8, 1, 40, 40, 2, 5, None, None),
        # dV then dK (two passes), 2 pieces, MHA with 3 KV heads
        ("split", {"nsplit": 2, "two_pass": True}, 1, 3, 41, 41, 3, 4, [41, 30], None),
        # one piece (direct store, no reduction), G=4
        ("split", {"nsplit": 1}, 4, 1, 39, 39, 2, 5, None, None),
        # the committed per-tile backward stays selectable and correct
        ("tiles", {}, 4, 1, 42, 20, 2, 5, [42, 35], [22, 15]),
    ],
)
def test_dkdv_backward_variants(monkeypatch, impl, opts, g_heads, hkv, lk, lq, group, window, seqlens, q_offsets):
    """Every dK/dV backward path against the reference, all five gradients (fp32)."""
    from sparsek.kernels import cca_triton_attention as mod

    monkeypatch.setattr(mod, "DKDV_IMPL", impl)
    monkeypatch.setattr(mod, "SPLIT_OPTIONS", {"nsplit": None, "fuse": True, "two_pass": False, **opts})
    gen = torch.Generator().manual_seed(lk * 7 + lq)
    b, d = 2, 16
    n = lk // group
    q = _leaf(b, hkv * g_heads, lq, d, gen=gen)
    k, v = _leaf(b, hkv, lk, d, gen=gen), _leaf(b, hkv, lk, d, gen=gen)
    kc, vc = _leaf(b, hkv, n, d, gen=gen), _leaf(b, hkv, n, d, gen=gen)
    sl = None if seqlens is None else torch.tensor(seqlens)
    offs = None if q_offsets is None else torch.tensor(q_offsets)
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64)]
    inputs = [q, k, v, kc, vc]
    got = _run(lambda *x: cca_attention_triton(*x, group, window, None, sl, offs), inputs, grad_outs)
    want = _run(lambda *x: cca_attention_reference(*x, group, window, None, sl, offs), inputs, grad_outs)
    _assert_all_close(got[0] + got[1], want[0] + want[1])


def test_choose_nsplit():
    from sparsek.kernels.cca_triton_backward import choose_nsplit

    # 128K, issue-3 shape, 132 SMs: enough work per SM that the longest core tile needs no cut
    assert choose_nsplit(131072, 8192, 131072, 16, 1024, 16, 128, 8, 132) == 1
    # 8K: 4 core tiles per head, far fewer programs than SMs: cut
    assert choose_nsplit(8192, 512, 8192, 16, 1024, 16, 128, 8, 132) > 1
    assert choose_nsplit(100, 0, 100, 16, 1024, 16, 128, 8, 132) == 1  # no cores
    assert choose_nsplit(8192, 512, 8192, 16, 1024, 16, 128, 8, 10**6) == 8  # capped


@interpreter
@pytest.mark.slow
def test_gpu_block_shapes_under_interpreter(monkeypatch):
    """The block shapes the GPU uses for d <= 128 (128/64-row blocks, 64/128-key tiles), so the
    tile bookkeeping is checked at the sizes that run there, not only at 16 x 16."""
    from sparsek.kernels import cca_triton_attention as mod

    gpu = {kernel: mod._config(kernel, 128, torch.device("cuda")) for kernel in ("fwd", "dq", "dkdv")}
    monkeypatch.setattr(mod, "_CONFIG_OVERRIDE", gpu)
    gen = torch.Generator().manual_seed(5)
    # window 200 > 128-key tile + block: unmasked raw tiles; 135 cores: an unmasked 128-core tile
    b, hkv, g_heads, lk, d, group, window = 1, 1, 4, 470, 16, 2, 200
    q = _leaf(b, hkv * g_heads, lk, d, gen=gen)
    k, v = _leaf(b, hkv, lk, d, gen=gen), _leaf(b, hkv, lk, d, gen=gen)
    sl = torch.tensor([463])
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64)]
    got = _run(lambda *x: cca_prefill_triton(*x, group, window, None, sl), [q, k, v], grad_outs)
    want = _run(lambda *x: cca_prefill_reference(*x, group, window, None, sl), [q, k, v], grad_outs)
    _assert_all_close(got[0] + got[1], want[0] + want[1])


@interpreter
def test_float16_flash_rule():
    gen = torch.Generator().manual_seed(3)
    b, hkv, g_heads, lk, d, group, window = 2, 2, 4, 37, 16, 4, 6
    half = dict(dtype=torch.float16, gen=gen)
    q = _leaf(b, hkv * g_heads, lk, d, **half)
    k, v = _leaf(b, hkv, lk, d, **half), _leaf(b, hkv, lk, d, **half)
    sl = torch.tensor([37, 25])
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64)]
    _flash_rule(
        lambda *x: cca_prefill_triton(*x, group, window, None, sl),
        lambda *x: _lowp_prefill(*x, group, window, None, sl),
        lambda *x: cca_prefill_reference(*x, group, window, None, sl),
        [q, k, v], grad_outs,
    )


@interpreter
def test_rejects_bad_shapes():
    q, k = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        cca_prefill_triton(q, k, k, 4, 4)
    with pytest.raises(ValueError, match="group and window"):
        cca_prefill_triton(torch.randn(1, 2, 8, 16), k, k, 0, 4)
    with pytest.raises(ValueError, match="groups of"):
        cca_pool_triton(torch.randn(1, 2, 3, 16), k, k, 4)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "g_heads,hkv,lk,d,group,window,seqlens",
    [
        (4, 4, 777, 128, 16, 128, [777, 500]),
        (3, 2, 1000, 64, 16, 100, None),
        (16, 1, 700, 128, 16, 256, None),
        (8, 1, 520, 96, 7, 1024, None),  # s >= L: dense causal; d=96 padded
    ],
)
@pytest.mark.parametrize("impl", ["split", "tiles"])
def test_gpu_prefill_bf16(monkeypatch, impl, g_heads, hkv, lk, d, group, window, seqlens):
    from sparsek.kernels import cca_triton_attention as mod

    monkeypatch.setattr(mod, "DKDV_IMPL", impl)
    gen = torch.Generator().manual_seed(lk)
    b = 2
    bf = dict(dtype=torch.bfloat16, device="cuda", gen=gen)
    q = _leaf(b, hkv * g_heads, lk, d, **bf)
    k, v = _leaf(b, hkv, lk, d, **bf), _leaf(b, hkv, lk, d, **bf)
    sl = None if seqlens is None else torch.tensor(seqlens, device="cuda")
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64).cuda()]
    _flash_rule(
        lambda *x: cca_prefill_triton(*x, group, window, None, sl),
        lambda *x: _lowp_prefill(*x, group, window, None, sl),
        lambda *x: cca_prefill_reference(*x, group, window, None, sl),
        [q, k, v], grad_outs,
    )
    with torch.no_grad():
        o1 = cca_prefill_triton(q, k, v, group, window, None, sl)
        o2 = cca_prefill_triton(q, k, v, group, window, None, sl)
    assert torch.equal(o1, o2), "forward is not deterministic"
    g1 = torch.autograd.grad(cca_prefill_triton(q, k, v, group, window, None, sl), (q, k, v), grad_outs[0].to(q.dtype))
    g2 = torch.autograd.grad(cca_prefill_triton(q, k, v, group, window, None, sl), (q, k, v), grad_outs[0].to(q.dtype))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True)), "backward is not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("impl,nsplit", [("split", None), ("split", 3), ("tiles", None)])
def test_gpu_attention_decode_offsets_bf16(monkeypatch, impl, nsplit):
    from sparsek.kernels import cca_triton_attention as mod

    monkeypatch.setattr(mod, "DKDV_IMPL", impl)
    monkeypatch.setattr(mod, "SPLIT_OPTIONS", {"nsplit": nsplit, "fuse": True, "two_pass": False})
    gen = torch.Generator().manual_seed(11)
    b, hkv, g_heads, lk, lq, d, group, window = 3, 2, 4, 900, 77, 128, 16, 256
    n = lk // group
    bf = dict(dtype=torch.bfloat16, device="cuda", gen=gen)
    q = _leaf(b, hkv * g_heads, lq, d, **bf)
    k, v = _leaf(b, hkv, lk, d, **bf), _leaf(b, hkv, lk, d, **bf)
    kc, vc = _leaf(b, hkv, n, d, **bf), _leaf(b, hkv, n, d, **bf)
    sl = torch.tensor([900, 640, 333], device="cuda")
    offs = torch.tensor([823, 600, 300], device="cuda")
    grad_outs = [torch.randn(q.shape, generator=gen, dtype=torch.float64).cuda()]
    _flash_rule(
        lambda *x: cca_attention_triton(*x, group, window, None, sl, offs),
        lambda *x: _lowp_attention(*x, group, window, None, sl, offs),
        lambda *x: cca_attention_reference(*x, group, window, None, sl, offs),
        [q, k, v, kc, vc], grad_outs,
    )
