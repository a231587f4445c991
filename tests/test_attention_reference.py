"""SparseK and CCA references against a literal reading of the SPEC and its invariants."""

import pytest
import torch

from sparsek.kernels import (
    cca_attention_reference,
    cca_pool_reference,
    cca_prefill_reference,
    sparsek_attention_reference,
    topk_mask,
)

from .spec_oracle import cca_oracle, dense_causal, sparsek_attention_oracle


def _qkvu(b, h, hkv, length, d, dtype=torch.float64, seed=0, slope=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, length, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, length, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, length, d, generator=g, dtype=dtype)
    u = torch.randn(b, hkv, length, generator=g, dtype=dtype) + slope * torch.arange(length, dtype=dtype)
    return q, k, v, u


@pytest.mark.parametrize("h,hkv", [(2, 2), (4, 2), (6, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("length,topk,window", [(19, 4, 3), (23, 1, 1), (17, 40, 2), (13, 3, 20)])
def test_sparsek_matches_spec_oracle(h, hkv, length, topk, window):
    q, k, v, u = _qkvu(1, h, hkv, length, 8, seed=length + h)
    got = sparsek_attention_reference(q, k, v, u, topk, window)
    torch.testing.assert_close(got, sparsek_attention_oracle(q, k, v, u, topk, window), atol=1e-10, rtol=0)


def test_sparsek_ties_go_to_newer_keys():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0]])
    cand = torch.tensor([[True, True, True, True, True, False]])
    assert topk_mask(scores, cand, 2).tolist() == [[False, False, True, True, False, False]]


@pytest.mark.parametrize("h,hkv", [(3, 3), (4, 2), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("length", [1, 37, 64])
def test_sparsek_with_nothing_dropped_equals_dense(h, hkv, length):
    q, k, v, u = _qkvu(2, h, hkv, length, 16, dtype=torch.float32, seed=h)
    for topk, window in ((length, 1), (1, length), (length // 2 + 1, length // 2 + 1)):
        got = sparsek_attention_reference(q, k, v, u, topk, window)
        torch.testing.assert_close(got, dense_causal(q, k, v), atol=2e-6, rtol=0)


@pytest.mark.parametrize("h,hkv", [(2, 2), (6, 3), (8, 2)])
@pytest.mark.parametrize("length,group,window", [(23, 4, 7), (31, 5, 5), (20, 3, 1), (16, 16, 3), (9, 2, 30)])
def test_cca_matches_spec_oracle(h, hkv, length, group, window):
    q, k, v, _ = _qkvu(1, h, hkv, length, 8, seed=length * group)
    got = cca_prefill_reference(q, k, v, group, window)
    torch.testing.assert_close(got, cca_oracle(q, k, v, group, window), atol=1e-10, rtol=0)


@pytest.mark.parametrize("h,hkv", [(3, 3), (4, 2), (6, 2), (8, 2), (8, 1)])
def test_cca_with_window_covering_everything_equals_dense(h, hkv):
    q, k, v, _ = _qkvu(2, h, hkv, 45, 16, dtype=torch.float32, seed=h)
    for group in (1, 4, 7, 64):
        torch.testing.assert_close(cca_prefill_reference(q, k, v, group, 45), dense_causal(q, k, v), atol=2e-6, rtol=0)


def test_cca_floor_semantics_core_zero_not_visible_early():
    # s = 10, g = 4: rows i < s + g - 1 = 13 have P(i) = 0 and must see their whole prefix raw.
    q, k, v, _ = _qkvu(1, 2, 2, 20, 8, seed=7)
    got = cca_prefill_reference(q, k, v, 4, 10)
    dense = dense_causal(q, k, v)
    torch.testing.assert_close(got[:, :, :13], dense[:, :, :13], atol=1e-12, rtol=0)
    assert (got[:, :, 13] - dense[:, :, 13]).abs().max() > 1e-6  # row 13 pools group 0


def test_cca_pool_averages_weights_over_the_group_heads():
    q, k, v, _ = _qkvu(1, 4, 2, 8, 4, seed=9)
    kc, vc = cca_pool_reference(q[:, :, 3::4], k, v, 4)
    assert kc.shape == (1, 2, 2, 4)
    w = torch.softmax(torch.einsum("hd,hjd->hj", q[0, :2, 3], k[0, 0, :4].expand(2, -1, -1)) / 2, -1).mean(0)
    torch.testing.assert_close(kc[0, 0, 0], w @ k[0, 0, :4])
    torch.testing.assert_close(vc[0, 0, 0], w @ v[0, 0, :4])


@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_right_padding_and_decode_offsets(method):
    """Right-padded rows equal their unpadded selves; Lq < Lk with q_offsets equals the tail of prefill."""
    q, k, v, u = _qkvu(2, 4, 2, 29, 8, seed=11)

    def run(q, k, v, u, seqlens=None, q_offsets=None):
        if method == "sparsek":
            return sparsek_attention_reference(q, k, v, u, 3, 4, seqlens=seqlens, q_offsets=q_offsets)
        n = k.shape[2] // 4
        qq = q if q.shape[2] == k.shape[2] else full_q
        kc, vc = cca_pool_reference(qq[:, :, 3 : 4 * n : 4], k, v, 4)
        return cca_attention_reference(q, k, v, kc, vc, 4, 6, seqlens=seqlens, q_offsets=q_offsets)

    full_q = q
    seqlens = torch.tensor([29, 18])
    padded = run(q, k, v, u, seqlens=seqlens)
    alone = run(q[1:, :, :18], k[1:, :, :18], v[1:, :, :18], u[1:, :, :18])
    torch.testing.assert_close(padded[1, :, :18], alone[0], atol=1e-12, rtol=0)
    assert padded[1, :, 18:].eq(0).all()  # queries past the row's end see nothing
    full = run(q, k, v, u)
    # Decode-like: the last 3 queries of each row against all its keys.
    offsets = seqlens - 3
    tail_q = torch.stack([q[0, :, 26:29], q[1, :, 15:18]])
    got = run(tail_q, k, v, u, seqlens=seqlens, q_offsets=offsets)
    torch.testing.assert_close(got[0], full[0, :, 26:29], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], padded[1, :, 15:18], atol=1e-12, rtol=0)


def test_gradcheck_sparsek_and_cca():
    q, k, v, u = _qkvu(1, 4, 2, 14, 4, seed=13)
    args = [t.clone().requires_grad_() for t in (q, k, v, u)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: sparsek_attention_reference(a, b, c, d, 3, 3), args, fast_mode=True
    )
    assert torch.autograd.gradcheck(lambda a, b, c: cca_prefill_reference(a, b, c, 3, 4), args[:3], fast_mode=True)


def test_scores_get_gradient_through_gates():
    q, k, v, u = _qkvu(1, 2, 1, 40, 8, dtype=torch.float32, seed=17)
    u = torch.zeros_like(u).requires_grad_()  # a freshly converted scorer: u = alpha * j with alpha = 0
    sparsek_attention_reference(q, k, v, u + torch.arange(40) / 16, 8, 8).square().sum().backward()
    assert u.grad.abs().sum() > 0


def test_chunked_backward_matches_unchunked(monkeypatch):
    import sparsek.kernels.sparsek_reference as ref

    q, k, v, u = _qkvu(1, 4, 2, 50, 8, dtype=torch.float64, seed=19)
    grads = []
    for elements in (1 << 24, 4 * 50 * 7):  # one chunk, then chunks of 7 queries (checkpointed)
        monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", elements)
        args = [t.clone().requires_grad_() for t in (q, k, v, u)]
        ref.sparsek_attention_reference(*args, 5, 6).pow(2).sum().backward()
        grads.append([a.grad for a in args])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_bad_shapes_are_rejected():
    q, k, v, u = _qkvu(1, 3, 2, 5, 4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        sparsek_attention_reference(q, k, v, u, 2, 2)
    q, k, v, u = _qkvu(1, 4, 2, 5, 4)
    with pytest.raises(ValueError, match=">= 1"):
        sparsek_attention_reference(q, k, v, u, 0, 2)
