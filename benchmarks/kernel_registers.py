"""Registers and local-memory (spill) bytes of the SparseK kernels for the H100, without a GPU.

Compiles each kernel ahead of time for sm_90 with the block shapes the GPU path uses (issue 3's
shape: G = 4, head_dim 128, bf16) and reads the resource usage of the cubin with the ``cuobjdump``
that ships in Triton's wheel. Occupancy follows from the registers (65536 per SM): a register
count is the cheapest signal of a kernel change that the CPU machine can give, e.g. the band
select kernel went from 255 to 168 registers when its full-path fallback moved to its own kernel.

    python benchmarks/kernel_registers.py            # the default shapes
    python benchmarks/kernel_registers.py --warps 8  # all selection kernels with 8 warps
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# per-token or per-item integer arrays and the bf16 tensors; every other pointer is float32
_INT_POINTERS = {"OFF", "KVLEN", "THJ", "NFRAC", "IDX", "CNT", "EJ", "FJ", "LJ", "CI", "ITAB", "TOK", "BTAB",
                 "STAB", "IST", "FALLBACK"}
_BF16_POINTERS = {"Q", "K", "V", "DO", "DQ", "OUT"}
_SCALARS = {"Lq", "Lk", "S", "R", "M", "TPI", "CAP_E", "CAP_F", "CAP_L"}


def _signature(fn, constexprs: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in _SCALARS or not name.isupper():
            sig[name] = "i32"
        else:
            sig[name] = "*i32" if name in _INT_POINTERS else "*bf16" if name in _BF16_POINTERS else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = {p.name for p in fn.params if p.is_constexpr} - set(constexprs)
    if missing:
        raise ValueError(f"{fn.__name__}: constexprs missing: {sorted(missing)}")
    return sig, attrs


def resources(fn, constexprs: dict, num_warps: int, num_stages: int = 2) -> tuple[int, int, int]:
    """(registers per thread, local memory bytes per thread, local load/store instructions in the
    SASS: spills) of ``fn`` compiled for sm_90."""
    sig, attrs = _signature(fn, constexprs)
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        info = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    regs, local = re.search(r"REG:(\d+)", info), re.search(r"LOCAL:(\d+)", info)
    spills = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", sass))
    return int(regs.group(1)), int(local.group(1)) if local else 0, spills


def main() -> None:
    from sparsek.kernels import sparsek_triton_attn as attn
    from sparsek.kernels import sparsek_triton_bwd as bwd
    from sparsek.kernels import sparsek_triton_select as sel
    from sparsek.kernels.sparsek_triton import _config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warps", type=int, default=None, help="override the selection kernels' warps")
    args = ap.parse_args()
    g, d = args.group, args.head_dim
    c = _config(g, d, torch.bfloat16)
    s = c["sel"]
    bq = max(1, c["BM"] // g)
    bd = triton.next_power_of_2(d)
    dk_bq = max(1, c["dkdv_BM"] // g)
    w = args.warps
    rows = [
        ("anchors", sel._anchor_kernel, {"BQ": s["anchor_block_q"], "BN": s["anchor_block_n"], "HKV": 8, "PACKED": False},
         w or s.get("anchor_warps", 4), 2),
        ("band build", sel._band_build_kernel, {"BUILD_LIST": True, "BN": s["build_block_n"], "HKV": 8, "PACKED": False},
         w or s.get("build_warps", 4), 2),
        ("band select", sel._band_select_kernel,
         {"BQ": s["band_block_q"], "BN": c["SEL_BN"], "BE": s["band_block_e"], "HKV": 8, "PACKED": False},
         w or s.get("band_warps", 4), 2),
        ("band fallback", sel._band_fallback_kernel, {"BQ": s["band_block_q"], "BN": c["SEL_BN"], "HKV": 8, "PACKED": False},
         w or 4, 2),
        ("block lists", sel._block_list_kernel,
         {"HAS_LIST": True, "BQ": bq, "BN": c["LIST_BN"], "HKV": 8, "PACKED": False}, w or 4, 2),
        ("forward", attn._sparsek_fwd_kernel,
         {"HKV": 8, "G": g, "BQ": bq, "BM": c["BM"], "BN": c["BN"], "D": d, "BD": bd, "UPCAST": False, "PACKED": False},
         c["warps"], c["stages"]),
        ("dQ", bwd._sparsek_bwd_dq_kernel,
         {"HKV": 8, "G": g, "BQ": bq, "BM": c["BM"], "BN": c["BN"], "D": d, "BD": bd, "UPCAST": False, "PACKED": False},
         c["warps"], c["stages"]),
        ("dK/dV", bwd._sparsek_bwd_dkdv_kernel,
         {"HKV": 8, "G": g, "BQ": dk_bq, "NSUB": c["NSUB"], "BM": triton.next_power_of_2(g * dk_bq),
          "BN": c["dkdv_BN"], "D": d, "BD": bd, "UPCAST": False, "PACKED": False},
         c["dkdv_warps"], c["dkdv_stages"]),
    ]
    print(f"sm_90, triton {triton.__version__}, G={g}, head_dim={d}, bf16\n")
    print("| kernel | warps | stages | registers | local bytes | spill loads+stores (SASS) | programs per SM "
          "(registers) |\n|---|---|---|---|---|---|---|")
    for name, fn, consts, warps, stages in rows:
        regs, local, spills = resources(fn, consts, warps, stages)
        per_sm = 65536 // max(1, regs * 32 * warps)
        print(f"| {name} | {warps} | {stages} | {regs} | {local} | {spills} | {per_sm} |")


if __name__ == "__main__":
    main()
