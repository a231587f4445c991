"""Kernel-level profile of one SparseK fwd+bwd (issue 3's shape) and a threshold diagnostic.

Prints the CUDA kernels of one forward+backward at ``--length`` (content-driven scores) with
their total time, so that the time can be attributed (selection, block lists, forward, dQ,
dK/dV, mean term). ``--tau`` adds the per-query comparison of the
Triton thresholds with the float64 reference in the recency regime (L = 20000), with the
fractional-set sizes, to locate where the float32 path loses precision.

    python benchmarks/profile_sparsek.py --length 131072 --tau
"""

from __future__ import annotations

import argparse

import torch


def profile(length: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from sparsek.kernels import sparsek_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    h, hkv, d = 32, 8, 128
    q = torch.randn(1, h, length, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    u = torch.randn(1, hkv, length, device="cuda", generator=g).requires_grad_()
    do = torch.randn_like(q)

    def step():
        out = sparsek_triton.sparsek_attention_triton(q, k, v, u, 2048, 512)
        out.backward(do)

    step()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name[:60]
            t, n = rows.get(name, (0.0, 0))
            rows[name] = (t + e.device_time, n + 1)
    total = sum(t for t, _ in rows.values())
    print(f"\n## L={length}: {total / 1e3:.1f} ms of kernels")
    print("| kernel | ms | calls | share |\n|---|---|---|---|")
    for name, (t, n) in sorted(rows.items(), key=lambda x: -x[1][0])[:14]:
        print(f"| {name} | {t / 1e3:.2f} | {n} | {t / total:.1%} |")


def tau_diagnostic() -> None:
    from sparsek.kernels.sparsek_projection import sparsek_threshold
    from sparsek.kernels.sparsek_triton_select import sparsek_selection

    length, topk, window = 20000, 2048, 512
    gen = torch.Generator(device="cuda").manual_seed(11)
    u = torch.randn(2, length, device="cuda", generator=gen)
    u = u + torch.arange(length, device="cuda", dtype=torch.float32) / 16
    off = torch.zeros(1, dtype=torch.int32, device="cuda")
    kvlen = torch.tensor([length], dtype=torch.int32, device="cuda")
    queries = torch.arange(window + topk + 1, length, 97, device="cuda")
    cand = torch.arange(length, device="cuda")[None, :] <= (queries[:, None] - window)
    print("\n## tau diagnostic (recency, L=20000, k=2048, w=512)")
    for path, strides in (("band", None), ("full", (1,))):
        sel = sparsek_selection(u, off, kvlen, length, topk, window, 2, strides=strides)
        for h in range(2):
            ref = sparsek_threshold(u[h].double().expand(len(queries), -1), topk, cand)
            got = sel.tau[h, queries].double()
            err = (got - ref).abs()
            i = int(err.argmax())
            uu = u[h].double()[cand[i]]
            dl = uu - ref[i]
            nfr_true = int(((dl > 0) & (dl < 1)).sum())
            n_one = int((dl >= 1).sum())
            dk = uu - got[i]
            nfr_k = int(((dk > 0) & (dk < 1)).sum())
            f_at_got = float((uu - got[i]).clamp(0, 1).sum())
            print(f"{path} h{h}: max |err| {err.max().item():.3e} at q={int(queries[i])} tau_ref={ref[i].item():.6f} "
                  f"tau={got[i].item():.6f} |F| true {nfr_true} kernel-out {int(sel.nfrac[h, queries[i]])} "
                  f"at-kernel-tau {nfr_k}; #ones {n_one}; f(kernel tau) = {f_at_got:.5f} (k={topk}); "
                  f"median |err| {err.median().item():.2e}, share > 1e-3: {(err > 1e-3).float().mean().item():.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--tau", action="store_true")
    args = ap.parse_args()
    if args.tau:
        tau_diagnostic()
    profile(args.length)


if __name__ == "__main__":
    main()
