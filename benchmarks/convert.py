"""Benchmark ``sparsek convert`` against a plain copy of the same files (CPU / disk work).

Builds a multi-shard, Llama-shaped checkpoint of random tensors (default: TinyLlama-1.1B shapes in
float16, about 2.2 GB in 5 shards), then times, each in a fresh child process so peak RSS is the
child's own:

* ``copy``: ``shutil.copyfile`` of every file of the folder (kernel-side copy);
* ``convert``: ``sparsek.convert.convert`` (SparseK, dense tensors copied unchanged);
* ``convert --dtype bfloat16``: the path that reads and casts every tensor.

Each measurement is the median of ``--repeat`` runs, with the page cache warm (the source is read
once first), modes interleaved, and an ``fsync`` of every written file counted in the time, so
the data is on disk in both cases. Peak RSS is the child's ``VmHWM``. Usage::

    python benchmarks/convert.py --workdir /tmp/sparsek-bench [--gb 2.2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, shutil, sys, time
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode != "copy":
    from sparsek.convert import ConvertOptions, convert

def hwm():  # peak RSS of this process (VmHWM is reset by exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base_rss = hwm()
t0 = time.perf_counter()
if mode == "copy":
    os.mkdir(out)
    for f in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, f), os.path.join(out, f))
else:
    convert(src, out, ConvertOptions(method="sparsek", dtype=None if mode == "convert" else mode, progress=False))
for f in os.listdir(out):  # data on disk, counted in the time; only this run's files
    fd = os.open(os.path.join(out, f), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss": hwm(), "rss_before": base_rss}))
"""


def make_checkpoint(path: Path, layers: int, hidden: int, inter: int, vocab: int, kv_heads: int, heads: int,
                    shard_bytes: int) -> None:
    """Random float16 Llama weights, written shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    groups, current, size = [], [], 0
    for name, shape in shapes:
        n = 2
        for d in shape:
            n *= d
        if current and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    groups.append(current)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for s, group in enumerate(groups):
        file = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=gen) * 0.02).half() for name, shape in group}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * 2
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "float16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def run_child(mode: str, src: Path, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sparsek-bench-convert"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args()

    src = args.workdir / "source"
    if not src.exists():
        t0 = time.perf_counter()
        make_checkpoint(src, args.layers, 2048, 5632, 32000, 4, 32, args.shard_mb * 2**20)
        print(f"generated checkpoint in {time.perf_counter() - t0:.1f} s")
    files = sorted(src.iterdir())
    shards = [f for f in files if f.suffix == ".safetensors"]
    total = sum(f.stat().st_size for f in files)
    largest = max(f.stat().st_size for f in shards)
    for f in files:  # warm the page cache
        with open(f, "rb") as h:
            while h.read(1 << 26):
                pass
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards, largest {largest / 1e6:.0f} MB")
    modes = ("copy", "convert", "bfloat16")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeat):  # interleaved, so background load hits every mode alike
        for mode in modes:
            runs[mode].append(run_child(mode, src, args.workdir / "out"))
    results = {}
    for mode in modes:
        seconds = statistics.median(r["seconds"] for r in runs[mode])
        peak = max(r["peak_rss"] for r in runs[mode])
        before = max(r["rss_before"] for r in runs[mode])
        results[mode] = (seconds, peak, before)
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs[mode])
        print(f"{mode:9s} median {seconds:6.2f} s  {total / seconds / 1e9:5.2f} GB/s  peak RSS {peak / 1e6:6.0f} MB "
              f"(after imports {before / 1e6:.0f} MB)  runs: {times}")
    copy_s, convert_s = results["copy"][0], results["convert"][0]
    print(f"convert throughput = {copy_s / convert_s:.0%} of copy; peak RSS = {results['convert'][1] / largest:.0%} "
          f"of the largest shard (target: >= 80%, <= 120%)")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
