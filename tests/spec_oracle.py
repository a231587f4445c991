"""Literal, slow, per-query implementations of SPEC 1.2-1.4 and 2.1-2.3 in float64.

They follow the SPEC text line by line (Python loops, sets, a sort-based exact SPARSEK threshold)
and share no code with the package, so the vectorised references are tested against an
independent reading of the spec.
"""

from __future__ import annotations

import math

import torch


def sparsek_exact(z: list[float], k: int) -> list[float]:
    """SPARSEK(z, k) by scanning the sorted breakpoints (exact)."""
    n = len(z)
    if n <= k:
        return [1.0] * n
    points = sorted(set(z) | {x - 1 for x in z})

    def f(t):
        return sum(min(max(x - t, 0.0), 1.0) for x in z)

    # f is non-increasing and piecewise linear between breakpoints: find the segment with f = k.
    for lo, hi in zip(points, points[1:]):
        f_lo, f_hi = f(lo), f(hi)
        if f_lo >= k >= f_hi:
            tau = lo if f_lo == f_hi else lo + (f_lo - k) * (hi - lo) / (f_lo - f_hi)
            return [min(max(x - tau, 0.0), 1.0) for x in z]
    raise AssertionError("no threshold found")


def sparsek_attention_oracle(q, k, v, u, topk, window, scale=None):
    """q [B,H,L,d], k/v [B,Hkv,L,d], u [B,Hkv,L]; queries aligned with keys; no padding."""
    b_, h_, length, d = q.shape
    hkv = k.shape[1]
    g = h_ // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    q, k, v, u = (t.double() for t in (q, k, v, u))
    out = torch.zeros(b_, h_, length, d, dtype=torch.float64)
    for b in range(b_):
        for hk in range(hkv):
            for i in range(length):
                window_keys = [j for j in range(length) if i - window < j <= i]
                cands = [j for j in range(length) if j <= i - window]
                scores = [float(u[b, hk, j]) for j in cands]
                p = sparsek_exact(scores, topk)
                order = sorted(cands, key=lambda j: (float(u[b, hk, j]), j), reverse=True)
                selected = set(order[:topk])
                gate = {j: 1.0 for j in window_keys}
                for j, pj in zip(cands, p):
                    if j in selected:
                        gate[j] = pj
                keys = sorted(gate)
                for hq in range(hk * g, (hk + 1) * g):
                    logits = torch.stack([q[b, hq, i] @ k[b, hk, j] * scale for j in keys])
                    a = torch.softmax(logits, 0)
                    out[b, hq, i] = sum(a[n] * gate[j] * v[b, hk, j] for n, j in enumerate(keys))
    return out


def cca_oracle(q, k, v, group, window, scale=None):
    """q [B,H,L,d], k/v [B,Hkv,L,d]; queries aligned with keys; no padding."""
    b_, h_, length, d = q.shape
    hkv = k.shape[1]
    g = h_ // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    q, k, v = (t.double() for t in (q, k, v))
    out = torch.zeros(b_, h_, length, d, dtype=torch.float64)
    for b in range(b_):
        for hk in range(hkv):
            heads = range(hk * g, (hk + 1) * g)
            cores_k, cores_v = [], []
            for n in range(length // group):
                members = range(n * group, (n + 1) * group)
                last = (n + 1) * group - 1
                weights = torch.zeros(group, dtype=torch.float64)
                for hq in heads:
                    logits = torch.stack([q[b, hq, last] @ k[b, hk, j] * scale for j in members])
                    weights += torch.softmax(logits, 0) / g
                cores_k.append(sum(weights[m] * k[b, hk, j] for m, j in enumerate(members)))
                cores_v.append(sum(weights[m] * v[b, hk, j] for m, j in enumerate(members)))
            for i in range(length):
                p = (i + 1 - window) // group if i + 1 > window else 0
                keys = cores_k[:p] + [k[b, hk, j] for j in range(p * group, i + 1)]
                vals = cores_v[:p] + [v[b, hk, j] for j in range(p * group, i + 1)]
                for hq in heads:
                    a = torch.softmax(torch.stack([q[b, hq, i] @ kk * scale for kk in keys]), 0)
                    out[b, hq, i] = sum(a[n] * vals[n] for n in range(len(keys)))
    return out


def dense_causal(q, k, v, scale=None):
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    vv = v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)
