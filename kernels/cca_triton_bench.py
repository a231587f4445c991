"""Quick timing of the CCA Triton op against dense SDPA (cuDNN) on one GPU.

The project's benchmark is ``benchmarks/attention.py``; this module is the kernel author's own
check, runnable as ``python -m sparsek.kernels.cca_triton_bench [L ...]``. Shape of issue 3:
B=1, H=32, Hkv=8, d=128, bf16, g=16, s=1024. FLOPs: 4*d per (query head, visible key) for the
forward, x3.5 for forward+backward (the flash-attention convention, recomputation not counted);
CCA counts only the keys it needs (visible cores + raw window), dense counts the causal triangle.
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


def main(lengths: list[int]) -> None:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .cca_triton_attention import _CONFIG_OVERRIDE, cca_prefill_triton

    b, h, hkv, d, group, window = 1, 32, 8, 128, 16, 1024
    dev = "cuda"
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")

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
                cca_prefill_triton(q, k, v, group, window)

        def cca_fb():
            o = cca_prefill_triton(q, k, v, group, window)
            torch.autograd.grad(o, (q, k, v), do)

        variants = [("default", {})]
        if os.environ.get("CCA_BENCH_VARIANTS") == "1" and length == max(lengths):
            variants += [
                ("fwd64x64w4", {"fwd": (64, 64, 4, 3)}),
                ("fwd128x128w8", {"fwd": (128, 128, 8, 2)}),
                ("dq64x64w4", {"dq": (64, 64, 4, 2)}),
                ("dq128x32w8", {"dq": (128, 32, 8, 3)}),
                ("dkdv128x64w8", {"dkdv": (128, 64, 8, 2)}),
                ("dkdv64x128w8", {"dkdv": (64, 128, 8, 2)}),
                ("dkdv32x128w4", {"dkdv": (32, 128, 4, 3)}),
            ]
        for name, cfg in variants:
            _CONFIG_OVERRIDE.clear()
            _CONFIG_OVERRIDE.update(cfg)
            try:
                t_f = bench(cca_fwd)
                torch.cuda.reset_peak_memory_stats()
                t_fb = bench(cca_fb)
            except Exception as exc:  # a block shape that does not fit (shared memory): report, go on
                print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append((length, f"cca[{name}]", t_f, t_fb, fwd_flops, peak))
            print(rows[-1], flush=True)
        _CONFIG_OVERRIDE.clear()

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

    print(f"{'L':>7} {'op':<20} {'fwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>9} {'f+b TF/s':>9} {'peak GiB':>9}")
    for length, name, t_f, t_fb, flops, peak in rows:
        print(
            f"{length:>7} {name:<20} {t_f:>9.2f} {t_fb:>9.2f} {flops / t_f / 1e9:>9.1f} "
            f"{3.5 * flops / t_fb / 1e9:>9.1f} {peak:>9.2f}"
        )
    by = {(r[0], r[1]): r for r in rows}
    for length in lengths:
        dense = by[(length, "sdpa-cudnn")]
        cca = by[(length, "cca[default]")]
        print(
            f"L={length}: cca speed-up vs cuDNN fwd {dense[2] / cca[2]:.2f}x, fwd+bwd {dense[3] / cca[3]:.2f}x; "
            f"f+b TFLOP/s ratio {(3.5 * cca[4] / cca[3]) / (3.5 * dense[4] / dense[3]):.2f}"
        )


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [8192, 32768, 131072])
