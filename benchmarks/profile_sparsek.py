"""Kernel-level profile of one SparseK fwd+bwd (issue 3's shape) and a threshold diagnostic.

Prints the CUDA kernels of one forward+backward at ``--length`` (``--regime`` content or recency
scores) with their total time, so that the time can be attributed (selection, block lists,
forward, dQ, dK/dV, mean term). ``--selection`` times the selection alone (thresholds + block
lists) for several level layouts (``strides``) and lists its kernel launches one by one, in order,
so that the time of each level is visible. ``--tau`` adds the per-query comparison of the
Triton thresholds with the float64 reference in the recency regime (L = 20000), with the
fractional-set sizes, to locate where the float32 path loses precision.

    python benchmarks/profile_sparsek.py --length 131072 --regime recency --selection --tau
"""

from __future__ import annotations

import argparse
import sys

import torch


def _scores(length: int, regime: str, hkv: int = 8) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(1)
    u = torch.randn(1, hkv, length, device="cuda", generator=g)
    if regime == "recency":
        u = u + torch.arange(length, device="cuda", dtype=torch.float32) / 16
    return u


def _kernel_rows(prof) -> list[tuple[str, float]]:
    return [(e.name, e.device_time) for e in prof.events() if e.device_type.name == "CUDA"]


def profile(length: int, regime: str = "content") -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from sparsek.kernels import sparsek_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    h, hkv, d = 32, 8, 128
    q = torch.randn(1, h, length, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    u = _scores(length, regime, hkv).requires_grad_()
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
    for name, dt in _kernel_rows(prof):
        t, n = rows.get(name[:60], (0.0, 0))
        rows[name[:60]] = (t + dt, n + 1)
    total = sum(t for t, _ in rows.values())
    print(f"\n## L={length}, {regime}: {total / 1e3:.1f} ms of kernels")
    print("| kernel | ms | calls | share |\n|---|---|---|---|")
    for name, (t, n) in sorted(rows.items(), key=lambda x: -x[1][0])[:14]:
        print(f"| {name} | {t / 1e3:.2f} | {n} | {t / total:.1%} |")


STRIDE_VARIANTS = {
    "default": {},
    "2048,128,1": {"strides": (2048, 128, 1)},
    "4096,128,1": {"strides": (4096, 128, 1)},
    "2048,256,1": {"strides": (2048, 256, 1)},
    "band_bq=16": {"band_block_q": 16},
    "band_be=32": {"band_block_e": 32},
    "anchor_bq=4,warps=4,bn=1024 (before)": {"anchor_block_q": 4, "anchor_warps": 4, "anchor_block_n": 1024},
}


def _load_module(path: str):
    """A selection module from a file (e.g. an earlier commit's, for an A/B on the same GPU)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_select", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_select"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def selection(length: int, regimes: list[str], reps: int = 10, baseline: str | None = None) -> None:
    """Selection alone (thresholds + block lists, issue 3's shape): medians per layout, launches in order."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from sparsek.kernels import sparsek_triton_select
    from sparsek.kernels.sparsek_triton import _config

    hkv, topk, window = 8, 2048, 512
    cfg = _config(4, 128, torch.bfloat16)
    off = torch.zeros(1, dtype=torch.int32, device="cuda")
    kvlen = torch.tensor([length], dtype=torch.int32, device="cuda")
    for regime in regimes:
        u = _scores(length, regime, hkv).reshape(hkv, length).contiguous()

        def run(u=u, **kw):
            mod = kw.pop("module", sparsek_triton_select)
            sel_kw = dict(cfg["sel"])
            strides = kw.pop("strides", None)
            sel_kw.update(kw)
            sel = mod.sparsek_selection(u, off, kvlen, length, topk, window, hkv, strides, cfg["SEL_BQ"],
                                        cfg["SEL_BN"], **sel_kw)
            mod.sparsek_block_lists(u, off, kvlen, sel.thu, sel.thj, length, topk, window, hkv, 32,
                                    cfg["LIST_BN"], sel.lists)
            return sel

        ref = run()
        print(f"\n## selection, L={length}, {regime} (k={topk}, w={window}, Hkv={hkv})")
        print(f"| layout | ms (median of {reps}) | tau max abs diff vs default | theta equal |\n|---|---|---|---|")
        variants = dict(STRIDE_VARIANTS)
        if baseline:
            variants[f"baseline {baseline}"] = {"module": _load_module(baseline)}
        for name, kw in variants.items():
            sel = run(**dict(kw))
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run(**dict(kw))
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            times.sort()
            fin = torch.isfinite(ref.tau)
            same_inf = bool(torch.equal(fin, torch.isfinite(sel.tau)))
            diff = (sel.tau - ref.tau)[fin].abs().max().item() if same_inf and fin.any() else float("nan")
            same = bool(torch.equal(sel.thu, ref.thu) and torch.equal(sel.thj, ref.thj))
            print(f"| {name} | {times[len(times) // 2]:.2f} | {diff:.2e} | {same} |")
        for name in ("default", "2048,128,1", *(f"baseline {baseline}",) * bool(baseline)):
            with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                run(**dict(variants[name]))
                torch.cuda.synchronize()
            print(f"\nlaunches, {name}: " + ", ".join(f"{n[:28]} {t / 1e3:.2f}" for n, t in _kernel_rows(prof)))


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
    ap.add_argument("--regime", nargs="+", default=["content"], choices=["content", "recency"])
    ap.add_argument("--tau", action="store_true")
    ap.add_argument("--selection", action="store_true", help="time the selection alone per level layout")
    ap.add_argument("--no-profile", action="store_true", help="skip the fwd+bwd kernel profile")
    ap.add_argument("--baseline-select", default=None, help="a sparsek_triton_select.py to time alongside")
    args = ap.parse_args()
    if args.tau:
        tau_diagnostic()
    if args.selection:
        selection(args.length, args.regime, baseline=args.baseline_select)
    if not args.no_profile:
        for regime in args.regime:
            profile(args.length, regime)


if __name__ == "__main__":
    main()
