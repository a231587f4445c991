"""Attention benchmark (issue 3): SparseK and CCA kernels against dense SDPA and FlexAttention.

Shape: batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16, causal. SparseK k=2048, w=512 in
two score regimes (content: u ~ N(0,1); recency: u = noise + j/16); CCA g=16, s=1024 through the
public ``sparsek.kernels.cca_prefill``. Baselines: SDPA with the cuDNN and the flash backends,
FlexAttention with the same SparseK mask (block mask built from the same thresholds; gates are
not expressible there, only the mask; mask building timed separately).

Times are medians of CUDA-event timings (``triton.testing.do_bench``). TFLOP/s use the FLOPs
each method needs (``benchmarks/flops.py``). Peak memory is ``max_memory_allocated`` during one
forward+backward minus what was allocated before it.

    python benchmarks/attention.py --lengths 8192,32768 --out results.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import attention_flops, banded_pairs, causal_pairs, cca_pairs  # noqa: E402

B, H, HKV, D = 1, 32, 8, 128
TOPK, WINDOW = 2048, 512
CCA_G, CCA_S = 16, 1024


def _bench(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=1, rep=reps, return_mode="median")


def _peak(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _inputs(length: int):
    gen = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(B, H, length, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    k = torch.randn(B, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    v = torch.randn(B, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    do = torch.randn(B, H, length, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, do


def _scores(length: int, regime: str) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(length + 1)
    u = torch.randn(B, HKV, length, device="cuda", generator=gen)
    if regime == "recency":
        u = u + torch.arange(length, device="cuda", dtype=torch.float32) / 16
    return u.requires_grad_(True)


def _fwd_bwd(f, do, leaves):
    def run():
        for t in leaves:
            t.grad = None
        f().backward(do)

    return run


def _use_variant(variant: str) -> None:
    """``KEY=VAL,...``: block-config overrides of the SparseK kernels (``default``: none); ``sel.KEY``
    for the selection kernels (``sel.anchor_warps=8``), ``strides=4096/256/64/1`` for the levels."""
    from sparsek.kernels import sparsek_triton

    base = _BASE_CONFIG.setdefault("f", sparsek_triton._config)
    extra, sel = {}, {}
    for kv in variant.split(","):
        if not kv or variant == "default":
            continue
        key, val = kv.split("=")
        if key.startswith("sel."):  # selection kernels' options (sparsek_selection keywords)
            sel[key[4:]] = int(val)
        elif key == "strides":  # level layout, e.g. strides=4096/256/64/1
            extra[key] = tuple(int(x) for x in val.split("/"))
        else:
            extra[key] = int(val)

    def config(g, d, dt):
        c = {**base(g, d, dt), **extra}
        c["sel"] = {**c["sel"], **sel}
        return c

    sparsek_triton._config = config


_BASE_CONFIG: dict = {}


def bench_length(length: int, reps: int, rows: list[dict], skip: set[str], variants=("default",)) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparsek.kernels import cca_prefill
    from sparsek.kernels.sparsek_triton import _Plan, sparsek_attention_triton

    q, k, v, do = _inputs(length)
    dense_pairs = causal_pairs(length)

    def add(name, fwd_ms, fb_ms, pairs, mem, extra="", sel_ms=None):
        fl_f = attention_flops(pairs, H, D)
        fl_fb = attention_flops(pairs, H, D, backward=True)
        rows.append({
            "L": length, "method": name, "fwd_ms": fwd_ms, "fb_ms": fb_ms, "sel_ms": sel_ms,
            "tflops_fwd": fl_f / fwd_ms / 1e9 if fwd_ms else None,
            "tflops_fb": fl_fb / fb_ms / 1e9 if fb_ms else None, "mem_gib": mem, "note": extra,
        })
        print(rows[-1], flush=True)

    for name, backend in (("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-flash", "FLASH_ATTENTION")):
        if name in skip:
            continue
        try:
            be = getattr(SDPBackend, backend)

            def f(be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            fwd = _bench(lambda f=f: f().detach(), reps)
            fb = _bench(_fwd_bwd(f, do, (q, k, v)), reps)
            mem = _peak(_fwd_bwd(f, do, (q, k, v)))
            add(name, fwd, fb, dense_pairs, mem)
        except Exception as e:  # noqa: BLE001 - a missing backend is a result, not a crash
            add(name, None, None, dense_pairs, None, f"error: {type(e).__name__}: {str(e)[:80]}")

    for regime in ("content", "recency"):
        u = _scores(length, regime)
        pairs = banded_pairs(length, TOPK + WINDOW)
        plan_holder = {}

        def select(u=u, holder=plan_holder):
            plan = _Plan(q, k, u, TOPK, WINDOW, None, None)
            plan.select()
            holder["p"] = plan

        sel = _bench(select, reps)

        def f(u=u):
            return sparsek_attention_triton(q, k, v, u, TOPK, WINDOW)

        fwd = _bench(lambda f=f: f().detach(), reps)
        for variant in variants:
            _use_variant(variant)
            fb = _bench(_fwd_bwd(f, do, (q, k, v, u)), reps)
            mem = _peak(_fwd_bwd(f, do, (q, k, v, u)))
            name = f"sparsek-triton/{regime}" + ("" if variant == "default" else f" [{variant}]")
            add(name, fwd, fb, pairs, mem, sel_ms=sel)
        _use_variant(variants[0])
        if "flex" not in skip:
            try:
                _flex(length, regime, q, k, v, do, u, plan_holder["p"], reps, pairs, add)
            except Exception as e:  # noqa: BLE001
                add(f"flex-sparsek/{regime}", None, None, pairs, None, f"error: {type(e).__name__}: {str(e)[:80]}")
        plan_holder.clear()

    if "cca" not in skip:
        try:
            def f():
                return cca_prefill(q, k, v, CCA_G, CCA_S)

            fwd = _bench(lambda: f().detach(), reps)
            fb = _bench(_fwd_bwd(f, do, (q, k, v)), reps)
            mem = _peak(_fwd_bwd(f, do, (q, k, v)))
            add("cca (public cca_prefill)", fwd, fb, cca_pairs(length, CCA_G, CCA_S), mem)
        except Exception as e:  # noqa: BLE001
            add("cca (public cca_prefill)", None, None, cca_pairs(length, CCA_G, CCA_S), None,
                f"error: {type(e).__name__}: {str(e)[:80]}")


_FLEX = {}


def _flex(length, regime, q, k, v, do, u, plan, reps, pairs, add):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    g = H // HKV
    uu = plan.u  # [HKV, L] (B = 1)
    thu = plan.thu.view(HKV, -1)
    thj = plan.thj.view(HKV, -1)

    def mask_mod(b, h, qi, kj):
        hk = h // g
        win = (kj <= qi) & (kj > qi - WINDOW)
        uk = uu[hk, kj]
        tq = thu[hk, qi]
        sel = (uk > tq) | ((uk == tq) & (kj >= thj[hk, qi]))
        return win | ((kj <= qi - WINDOW) & sel)

    def build():
        return create_block_mask(mask_mod, 1, H, length, length, device="cuda", _compile=True)

    bm = build()  # the first call compiles the mask builder: not part of the timing
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bm = build()
    torch.cuda.synchronize()
    second = (time.perf_counter() - t0) * 1e3
    build_ms = _bench(build, reps) if second < 2000 else second

    def f():
        return flex(q, k, v, block_mask=bm, enable_gqa=True)

    fwd = _bench(lambda: f().detach(), reps)
    fb = _bench(_fwd_bwd(f, do, (q, k, v)), reps)
    mem = _peak(_fwd_bwd(f, do, (q, k, v)))
    add(f"flex-sparsek/{regime}", fwd, fb, pairs, mem, f"mask build {build_ms:.1f} ms (mask only, no gates)",
        sel_ms=None)
    _FLEX.setdefault("build", {})[(length, regime)] = build_ms


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    out = ["| L | method | selection ms | fwd ms | fwd+bwd ms | TFLOP/s fwd | TFLOP/s fwd+bwd | peak GiB | "
           "fwd+bwd vs cuDNN | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    cudnn = {r["L"]: r["fb_ms"] for r in rows if r["method"] == "sdpa-cudnn"}
    for r in rows:
        ratio = cudnn.get(r["L"]) / r["fb_ms"] if cudnn.get(r["L"]) and r["fb_ms"] else None
        out.append(f"| {r['L']} | {r['method']} | {_fmt(r['sel_ms'])} | {_fmt(r['fwd_ms'])} | {_fmt(r['fb_ms'])} | "
                   f"{_fmt(r['tflops_fwd'])} | {_fmt(r['tflops_fb'])} | {_fmt(r['mem_gib'], '.2f')} | "
                   f"{_fmt(ratio, '.2f')}x | {r['note']} |")
    return "\n".join(out)


def _header() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
            f"commit {commit}\n\nShape B={B}, H={H}, Hkv={HKV}, d={D}, bf16, causal; SparseK k={TOPK}, w={WINDOW}; "
            f"CCA g={CCA_G}, s={CCA_S}. SparseK fwd and fwd+bwd include selection.\n")


def _write(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--out", default=None, help="markdown file to write (atomically)")
    ap.add_argument("--reps", type=int, default=200, help="do_bench repetition time in ms")
    ap.add_argument("--skip", default="", help="comma list of: sdpa-cudnn,sdpa-flash,flex,cca")
    ap.add_argument("--sparsek-config", default="default",
                    help="SparseK block-config variants, ';'-separated KEY=VAL,... (e.g. 'default;NSUB=16,dkdv_BN=64')")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        print(f"error: --lengths must be a comma list of integers, got {args.lengths!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA device", file=sys.stderr)
        return 2
    rows: list[dict] = []
    skip = set(filter(None, args.skip.split(",")))
    for length in lengths:
        bench_length(length, args.reps, rows, skip, tuple(args.sparsek_config.split(";")))
        text = _header() + "\n" + table(rows) + "\n"
        if args.out:
            _write(args.out, text)
        torch.cuda.empty_cache()
    print(_header())
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
