"""Generation benchmark: our runtime (bounded caches, CUDA-graph decode) vs transformers' dense
``generate()`` with SDPA, on the same random weights, in one run.

Model: Llama-3-8B-shaped (32 layers, hidden 4096, 32/8 heads, head_dim 128, MLP 14336, vocab
128256), random bf16 weights, random non-zero SparseK scorers (so selection is not a plain
sliding window). Contexts 8K/32K/128K (``--quick``: 8K/32K, fewer steps).

Measured per context:
* time to first token at batch 1 (prefill + first token; ours prefills the prompt in one chunk
  through the Triton prefill op, dense is ``generate(max_new_tokens=1)``);
* decode tokens/s at batch 1 (``(T(n) - T(1)) / (n - 1)``);
* decode attention time per step: the attention op alone (ours: cache update + split-K kernel,
  per layer, x layers; dense: SDPA over the full KV), CUDA-event timed;
* KV memory per sequence and peak memory of the batch-1 run;
* the largest batch that fits (from free memory after weights and the per-sequence footprint
  measured at batch 1, with 10% headroom) and aggregate decode tokens/s at that batch: the
  prefilled batch-1 state is replicated across the batch (decode cost does not depend on the
  cached values), dense decodes through its DynamicCache with the model's forward, ours with the
  CUDA-graph step.

Prints a markdown table and writes it to ``--out``. ``--preset tiny --device cpu`` is a smoke
test of the code paths (numbers meaningless).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

PRESETS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build_model(preset: str, method: str, dtype, dev, args):
    from sparsek.runtime.configuration_sparsek import SparseKLlamaConfig
    from sparsek.runtime.modeling_sparsek import SparseKLlamaForCausalLM

    cfg = SparseKLlamaConfig(**PRESETS[preset], sparse_method=method, sparsek_topk=args.k, sparsek_window=args.window,
                             cca_group=args.group, cca_window=args.cca_window, base_model_type="llama")
    torch.manual_seed(0)
    with torch.device(dev):
        model = SparseKLlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
        for mod in model.modules():
            if hasattr(mod, "scorer"):
                mod.scorer.weight.normal_(0, 0.05)
    return model.eval()


def timed(fn, dev):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t, out


def event_time(fn, dev, reps=20):
    if dev.type != "cuda":
        t, _ = timed(lambda: [fn() for _ in range(reps)], dev)
        return t / reps
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def kv_bytes_dense(model, length, batch=1):
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * length * batch * next(model.parameters()).element_size()


def sparse_attention_step_time(model, cache, dev):
    """Cache update + decode kernel for one layer, x layers (the cache state is restored after)."""
    layer = cache.layers[0]
    attn = model.model.layers[0].self_attn
    b = layer.count.shape[0]
    c = model.config
    q = torch.randn(b, c.num_attention_heads, 1, c.head_dim, device=dev, dtype=model.dtype)
    k = torch.randn(b, c.num_key_value_heads, 1, c.head_dim, device=dev, dtype=model.dtype)
    scores = torch.randn(b, c.num_key_value_heads, 1, device=dev)
    with torch.inference_mode():
        saved = {n: getattr(layer, n).clone() for n in layer._state_names() if getattr(layer, n) is not None}
    cols = layer.columns
    with torch.inference_mode():
        t = event_time(lambda: layer.attend(attn, q, k, k, None, c.head_dim**-0.5, scores), dev)
        for n, v in saved.items():
            getattr(layer, n).copy_(v)
    layer.columns = cols
    return t * c.num_hidden_layers


def dense_attention_step_time(model, length, batch, dev):
    c = model.config
    q = torch.randn(batch, c.num_attention_heads, 1, c.head_dim, device=dev, dtype=model.dtype)
    k = torch.randn(batch, c.num_key_value_heads, length, c.head_dim, device=dev, dtype=model.dtype)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)  # noqa: E731
    with torch.inference_mode():
        t = event_time(fn, dev)
    return t * c.num_hidden_layers


def run_ours(model, length, steps, dev, args):
    from sparsek.runtime.generation import Generator
    from sparsek.runtime.sampling import SamplingConfig

    gen = Generator(model, None, prefill_chunk=args.prefill_chunk or length, cuda_graph=not args.no_graph)
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _, (res, cache) = timed(lambda: gen.generate_ids([prompt], SamplingConfig(max_new_tokens=steps)), dev)
    r = res[0]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    row = dict(ttft=r.time_to_first_token_s, tps=r.decode_tokens_per_s, kv=cache.kv_bytes(), peak=peak,
               attn=sparse_attention_step_time(model, cache, dev))
    return row, gen, cache


def run_dense(model, length, steps, dev):
    from sparsek.runtime.dense_switch import dense_attention

    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1)).to(dev)
    with dense_attention(model), torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t1, _ = timed(lambda: model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1), dev)
        tn, out = timed(lambda: model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                                               return_dict_in_generate=True), dev)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return dict(ttft=t1, tps=(steps - 1) / max(tn - t1, 1e-9), kv=kv_bytes_dense(model, length), peak=peak,
                attn=dense_attention_step_time(model, length, 1, dev)), out.past_key_values


def free_bytes(dev):
    if dev.type != "cuda":
        return 8 * 2**30
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    return free


def batch_decode_ours(gen, cache, batch, steps, dev):
    from sparsek.runtime.sampling import SamplingConfig

    cache.batch_repeat_interleave(batch)
    start = torch.randint(0, gen.model.config.vocab_size, (batch, 1)).tolist()
    t, (res, _) = timed(lambda: gen.generate_ids(start, SamplingConfig(max_new_tokens=steps), cache=cache), dev)
    return batch * res[0].decode_tokens_per_s


def batch_decode_dense(model, dense_cache, batch, steps, dev):
    from sparsek.runtime.dense_switch import dense_attention

    dense_cache.batch_repeat_interleave(batch)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    past = dense_cache.get_seq_length()
    with dense_attention(model), torch.inference_mode():
        def loop(n):
            nonlocal tok
            for i in range(n):
                pos = torch.full((batch, 1), past + i, device=dev)
                logits = model(tok, past_key_values=dense_cache, position_ids=pos, logits_to_keep=1).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
        loop(1)
        past += 1
        t, _ = timed(lambda: loop(steps), dev)
    return batch * steps / t


def fmt_bytes(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--method", default="sparsek", choices=["sparsek", "cca"])
    ap.add_argument("--contexts", default=None, help="comma-separated, e.g. 8192,32768,131072")
    ap.add_argument("--quick", action="store_true", help="8K and 32K only, fewer decode steps")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per measurement")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--cca-window", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=0, help="0: the whole prompt in one chunk")
    ap.add_argument("--no-graph", action="store_true", help="decode eagerly (no CUDA graph)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-batch", action="store_true", help="skip the largest-batch measurements")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    elif args.preset == "tiny":
        contexts = [256, 1024]
    else:
        contexts = [8192, 32768] if args.quick else [8192, 32768, 131072]
    steps = args.steps or (32 if args.quick else 64)
    model = build_model(args.preset, args.method, dtype, dev, args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for length in contexts:
        print(f"context {length}: ours ...", flush=True)
        ours, gen, cache = run_ours(model, length, steps, dev, args)
        dense, dense_cache = (None, None)
        if not args.no_dense:
            print(f"context {length}: dense ...", flush=True)
            try:
                dense, dense_cache = run_dense(model, length, steps, dev)
            except torch.OutOfMemoryError:
                dense = None
        row = dict(context=length, ours=ours, dense=dense)
        if not args.no_batch:
            avail = free_bytes(dev) + (cache.kv_bytes() if cache else 0)
            per_ours = max(1, ours["kv"]) * 1.5 + 64 * 2**20  # cache + decode activations
            row["b_ours"] = max(1, min(args.max_batch, int(0.9 * avail / per_ours)))
            try:
                row["agg_ours"] = batch_decode_ours(gen, cache, row["b_ours"], steps, dev)
            except torch.OutOfMemoryError:
                row["agg_ours"] = None
            del cache
            if dense is not None:
                avail = free_bytes(dev) + dense["kv"]
                row["b_dense"] = max(1, min(args.max_batch, int(0.9 * avail / (dense["kv"] * 1.1))))
                try:
                    row["agg_dense"] = batch_decode_dense(model, dense_cache, row["b_dense"], steps, dev)
                except torch.OutOfMemoryError:
                    row["agg_dense"] = None
        del dense_cache
        free_bytes(dev)
        rows.append(row)
        print(row, flush=True)

    name = "SparseK" if args.method == "sparsek" else "CCA"
    lines = [
        f"Generation benchmark: {args.preset} random weights ({fmt_bytes(weights)}), {dtype}, {dev} "
        f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), {name} "
        + (f"k={args.k} w={args.window}" if args.method == "sparsek" else f"g={args.group} s={args.cca_window}")
        + f", {steps} decode steps, CUDA graph {'off' if args.no_graph or dev.type != 'cuda' else 'on'}",
        "",
        "| context | runtime | TTFT b=1 (s) | decode tok/s b=1 | decode attn/step (ms) | KV / seq | peak mem b=1 "
        "| largest batch | aggregate tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for label, key, bkey, akey in ((name, "ours", "b_ours", "agg_ours"), ("dense SDPA", "dense", "b_dense", "agg_dense")):
            m = r.get(key)
            if m is None:
                lines.append(f"| {r['context']} | {label} | OOM/skipped | | | | | | |")
                continue
            agg = r.get(akey)
            lines.append(
                f"| {r['context']} | {label} | {m['ttft']:.3f} | {m['tps']:.1f} | {m['attn'] * 1e3:.3f} | "
                f"{fmt_bytes(m['kv'])} | {fmt_bytes(m['peak'])} | {r.get(bkey, '-')} | "
                f"{'-' if agg is None else f'{agg:.1f}'} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
