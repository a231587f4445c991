"""Quick timing of the CCA Triton op against dense SDPA (cuDNN) on one GPU.

The project's benchmark is ``benchmarks/attention.py``; this module is the kernel author's own
check, runnable as ``python -m sparsek.kernels.cca_triton_bench [L ...]``. Shape of issue 3:
B=1, H=32, Hkv=8, d=128, bf16, g=16, s=1024. FLOPs: 4*d per (query head, visible key) for the
forward, x3.5 for forward+backward (the flash-attention convention, recomputation not counted);
CCA counts only the keys it needs (visible cores + raw window), dense counts the causal triangle.

It times both dK/dV backward paths of ``cca_triton_attention`` (``DKDV_IMPL``: "split" and
"tiles", the default marked) at every length, and a few options of the split path at the longest
length; the forward is the same kernel for all of them (timed once). At the shortest length it
also prints the relative difference between the two paths' gradients. The last lines are a
markdown table. ``CCA_BENCH_PROFILE=1``: a CUDA profile of one default forward+backward at the
longest length.
"""

from __future__ import annotations

import os
import sys

import torch


def cca_visits(length: int, group: int, window: int) -> int:
    """Sum over queries of the keys CCA attends to (visible cores + raw window)."""
    i = torch.arange(length, dtype=torch.float64)
    p = torch.div(i + 1 - window, group, rounding_mode="floor").clamp(min=0)
    return int((p + (i - p * group + 1)).sum().item())


def _variants(longest: bool) -> list[tuple[str, str, dict, dict]]:
    """(name, DKDV_IMPL, SPLIT_OPTIONS, block-shape override) of the dK/dV backwards to time.
    Both paths at every length; a few options of the split path at the longest length only."""
    from .cca_triton_attention import DKDV_IMPL

    other = "tiles" if DKDV_IMPL == "split" else "split"
    auto = {"nsplit": None, "fuse": True, "two_pass": False}
    out = [(f"{DKDV_IMPL} (default)", DKDV_IMPL, auto, {}), (other, other, auto, {})]
    if longest:
        out += [
            ("split nsplit=2", "split", {**auto, "nsplit": 2}, {}),
            ("split 2 launches", "split", {**auto, "fuse": False}, {}),
            ("split two-pass", "split", {**auto, "two_pass": True}, {}),
            ("split 64x64 w8", "split", auto, {"dkdv_split": (64, 64, 8, 2)}),
        ]
    return out


def main(lengths: list[int]) -> None:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import cca_triton_attention as mod

    b, h, hkv, d, group, window = 1, 32, 8, 128, 16, 1024
    dev = "cuda"
    saved = (mod.DKDV_IMPL, dict(mod.SPLIT_OPTIONS))
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(f"default dK/dV backward: DKDV_IMPL={mod.DKDV_IMPL!r} (env SPARSEK_CCA_DKDV)", flush=True)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=500, return_mode="median")  # >= 3 repeats at 128K

    def one_length(length: int, rows: list) -> None:
        torch.manual_seed(0)
        q = torch.randn(b, h, length, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, length, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, length, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        fwd_flops = 4 * d * h * cca_visits(length, group, window)
        dense_flops = 4 * d * h * length * (length + 1) / 2

        def cca_fwd():
            with torch.no_grad():
                mod.cca_prefill_triton(q, k, v, group, window)

        def cca_fb():
            o = mod.cca_prefill_triton(q, k, v, group, window)
            return torch.autograd.grad(o, (q, k, v), do)

        t_fwd = bench(cca_fwd)  # the forward is the same kernel for every backward variant
        grads = {}
        for name, impl, opts, cfg in _variants(length == max(lengths)):
            mod.DKDV_IMPL = impl
            mod.SPLIT_OPTIONS.clear()
            mod.SPLIT_OPTIONS.update(opts)
            mod._CONFIG_OVERRIDE.clear()
            mod._CONFIG_OVERRIDE.update(cfg)
            try:
                if length == min(lengths) and impl not in grads:
                    grads[impl] = cca_fb()
                torch.cuda.reset_peak_memory_stats()
                t_fb = bench(cca_fb)
            except Exception as exc:  # a block shape that does not fit (shared memory): report, go on
                print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append((length, f"cca {name}", t_fwd, t_fb, fwd_flops, peak))
            print(rows[-1], flush=True)
        mod.DKDV_IMPL = saved[0]
        mod.SPLIT_OPTIONS.clear()
        mod.SPLIT_OPTIONS.update(saved[1])
        mod._CONFIG_OVERRIDE.clear()
        if len(grads) == 2:
            a, c = grads["split"], grads["tiles"]
            rel = [((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a, c, strict=True)]
            print(f"L={length}: split vs tiles gradients, relative L2 difference dq/dk/dv: "
                  + " ".join(f"{r:.1e}" for r in rel), flush=True)

        if os.environ.get("CCA_BENCH_PROFILE") == "1" and length == max(lengths):
            from torch.profiler import ProfilerActivity, profile

            cca_fb()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                cca_fb()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)

        ke = k.detach().repeat_interleave(h // hkv, 1).requires_grad_()
        ve = v.detach().repeat_interleave(h // hkv, 1).requires_grad_()

        def sdpa_fwd():
            with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)

        def sdpa_fb():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
            torch.autograd.grad(o, (q, ke, ve), do)

        t_f = bench(sdpa_fwd)
        torch.cuda.reset_peak_memory_stats()
        t_fb = bench(sdpa_fb)
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append((length, "sdpa-cudnn", t_f, t_fb, dense_flops, peak))
        print(rows[-1], flush=True)

    rows: list = []
    for length in lengths:
        one_length(length, rows)
        torch.cuda.empty_cache()

    dense = {r[0]: r for r in rows if r[1] == "sdpa-cudnn"}
    print("\n| L | op | fwd ms | f+b ms | f+b TFLOP/s | peak GiB | f+b speed-up vs cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for length, name, t_f, t_fb, flops, peak in rows:
        print(
            f"| {length} | {name} | {t_f:.2f} | {t_fb:.2f} | {3.5 * flops / t_fb / 1e9:.0f} | {peak:.2f} "
            f"| {dense[length][3] / t_fb:.2f}x |"
        )


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [8192, 32768, 131072])
