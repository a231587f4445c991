"""Generation benchmark: our runtime (bounded caches, CUDA-graph decode) vs transformers' dense
``generate()`` with SDPA, on the same random weights, in one run (issue 4's targets at 128K).

Model: Llama-3-8B-shaped (32 layers, hidden 4096, 32/8 heads, head_dim 128, MLP 14336, vocab
128256), random bf16 weights, random non-zero SparseK scorers (so selection is not a plain
sliding window). Contexts 8K/32K/128K (``--quick``: 8K/32K, fewer steps).

Measured per context (every timed measurement follows a warm-up, so compilation is excluded):
* time to first token at batch 1, warm. Ours: a warm-up prefill of the same length first (Triton
  kernels are specialised per length), then ``Generator.generate_ids`` prefilling the prompt in one
  chunk. Dense: a short warm-up ``generate()``, then ``generate()`` with a streamer that stamps the
  first token;
* a TTFT breakdown for ours, from a separate instrumented pass (CUDA events around each call):
  the prefill attention op, the cache build from the first chunk, and the rest of the model;
* decode tokens/s at batch 1, steady state: from per-token timestamps, after the first decode
  steps (ours: the eager step and the CUDA-graph capture; dense: the first step);
* decode attention time per step, x layers, GPU time from CUDA-graph replays (launch overhead
  excluded): (a) the split-K decode kernel alone over the layer's slots (dense: SDPA of one query
  over L keys) and (b) ours' whole per-layer decode attention, cache update + kernel;
* KV memory per sequence and peak memory of the batch-1 run;
* the largest batch that fits (estimated from free memory and the per-sequence footprint, then
  tried, smaller on OOM) and aggregate decode tokens/s there: the batch-1 state of row 0 is
  replicated across the batch (decode cost does not depend on the cached values); ours decodes
  with the CUDA-graph step, dense with the model's forward over its DynamicCache, as
  ``generate()`` does.

A part that fails (OOM or anything else) prints one line and the run goes on with the next.
Prints markdown tables (results, TTFT breakdown, issue-4 targets) and writes them to ``--out``.
``--preset tiny --device cpu`` is a smoke test of the code paths (numbers meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import tempfile
import time

import torch

PRESETS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096),
}

# issue 4's targets, judged at the largest context measured (128K in the full run)
TTFT_RATIO, DECODE_RATIO, BATCH_RATIO, AGG_RATIO, ATTN_SPREAD = 2.5, 1.7, 15.0, 10.0, 0.15


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def attempt(label: str, fn, dev):
    """Run one part of the benchmark; on any failure print one line and return None."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing part must not end the run
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"  {label}: FAILED ({type(e).__name__}: {msg})", flush=True)
        release(dev)
        return None


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


def prompt_ids(model, length):
    return torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()


def steady_rate(stamps: list[float], skip: int) -> float:
    """Tokens/s between the token stamps after the first ``skip`` decode steps."""
    s = stamps[1 + skip:]
    return (len(s) - 1) / (s[-1] - s[0]) if len(s) >= 2 and s[-1] > s[0] else 0.0


def graph_time(fn, dev, inner: int = 10, outer: int = 5) -> tuple[float, str]:
    """Seconds per ``fn()`` call: GPU time from replays of a CUDA graph of ``inner`` calls (launch
    overhead excluded), after one eager warm-up call. Falls back to eager CUDA-event timing if the
    capture fails; on CPU, wall-clock of eager calls. Returns (seconds, how)."""
    fn()
    if dev.type != "cuda":
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) / inner, "cpu"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(outer):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / (inner * outer), "graph"
    except Exception as e:  # noqa: BLE001
        print(f"  (CUDA graph capture failed, eager timing: {type(e).__name__})", flush=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner * outer):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / (inner * outer), "eager"


# --- ours ------------------------------------------------------------------------------------------


def generate_ours(gen, prompts, steps, cache=None):
    """One ``generate_ids`` call; returns (result of row 0, cache, token stamps of row 0)."""
    from sparsek.runtime.sampling import SamplingConfig

    stamps: list[float] = []

    def on_token(row, tok, delta):
        if row == 0:
            stamps.append(time.perf_counter())

    res, cache = gen.generate_ids(prompts, SamplingConfig(max_new_tokens=steps), on_token=on_token, cache=cache)
    return res[0], cache, stamps


class _Span:
    """One timed call: CUDA events on GPU (no sync), wall-clock on CPU."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.b.record()
        else:
            self.t = time.perf_counter() - self.t

    def seconds(self) -> float:
        return self.a.elapsed_time(self.b) / 1000 if self.cuda else self.t


@contextlib.contextmanager
def instrumented(dev, method):
    """Time every prefill attention op and first-chunk cache build while the context is open."""
    from sparsek.runtime import modeling_sparsek
    from sparsek.runtime.cache_cca import CCALayer
    from sparsek.runtime.cache_sparsek import SparseKLayer

    spans: dict[str, list[_Span]] = {"attention op": [], "cache build": []}

    def wrap(fn, name, when):
        @functools.wraps(fn)
        def inner(*a, **kw):
            if not when(a, kw):
                return fn(*a, **kw)
            span = _Span(dev)
            out = fn(*a, **kw)
            span.stop()
            spans[name].append(span)
            return out

        return inner

    # the attention function is also the registered one: time only the inner call (no cache)
    patches = [(modeling_sparsek, "sparse_attention_forward",
                wrap(modeling_sparsek.sparse_attention_forward, "attention op", lambda a, kw: kw.get("sparse_cache") is None))]
    if method == "sparsek":
        patches.append((SparseKLayer, "_build_from_chunk", wrap(SparseKLayer._build_from_chunk, "cache build", lambda a, kw: True)))
    else:
        patches.append((CCALayer, "_update", wrap(CCALayer._update, "cache build", lambda a, kw: a[0].empty)))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, f in patches:
        setattr(obj, name, f)
    try:
        yield spans
    finally:
        for obj, name, f in saved:
            setattr(obj, name, f)


def ttft_breakdown(gen, model, length, dev, method):
    """TTFT of one instrumented prefill, split into attention op, cache build and the rest."""
    with instrumented(dev, method) as spans:
        res, cache, _ = generate_ours(gen, [prompt_ids(model, length)], 1)
        sync(dev)
    del cache
    parts = {name: sum(s.seconds() for s in lst) for name, lst in spans.items()}
    total = res.time_to_first_token_s
    return dict(ttft=total, attn=parts["attention op"], build=parts["cache build"],
                rest=total - parts["attention op"] - parts["cache build"], calls=len(spans["attention op"]))


def ours_attention_times(model, cache, dev, method, inner=10, outer=5):
    """Per decode step, x layers: (a) the split-K kernel alone over layer 0's slots, (b) layer 0's
    whole decode attention (cache update + kernel) captured and replayed. Layer 0's state is
    restored afterwards."""
    from sparsek.kernels import gated_decode_attention

    c = model.config
    layer = cache.layers[0]
    attn = model.model.layers[0].self_attn
    b = layer.count.shape[0]
    scale = c.head_dim**-0.5
    gen = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn(b, c.num_attention_heads, 1, c.head_dim, device=dev, dtype=model.dtype, generator=gen)
    k = torch.randn(b, c.num_key_value_heads, 1, c.head_dim, device=dev, dtype=model.dtype, generator=gen)
    # decode scores: newer than every cached key, with the same content spread as a real step
    scores = (layer.count.max().float() / 16 + torch.randn(b, c.num_key_value_heads, 1, device=dev, generator=gen))
    gates = getattr(layer, "gates", None)
    with torch.inference_mode():
        t_kernel, how_a = graph_time(lambda: gated_decode_attention(q, layer.kbuf, layer.vbuf, gates, layer.valid, scale),
                                     dev, inner=2 * inner, outer=outer)
        layer.reserve(inner * (outer + 2) + 8)  # no reallocation between capture and replays
        saved = {n: getattr(layer, n).clone() for n in layer._state_names() if getattr(layer, n) is not None}
        cols = layer.columns
        try:
            t_step, how_b = graph_time(lambda: layer.attend(attn, q, k, k, None, scale, scores if method == "sparsek" else None),
                                       dev, inner=inner, outer=outer)
        finally:
            for n, v in saved.items():
                setattr(layer, n, v)
            layer.columns, layer.budget = cols, 0
    n = c.num_hidden_layers
    return t_kernel * n, t_step * n, f"{how_a}/{how_b}"


def state_bytes_per_row(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in layer._state_names():
            t = getattr(layer, name)
            if t is not None:
                total += t.numel() * t.element_size() // max(1, t.shape[0])
    return total


def replicate_row0(cache, batch):
    """Every state tensor of a bounded cache becomes row 0 repeated ``batch`` times (in place)."""
    for layer in cache.layers:
        for name in layer._state_names():
            t = getattr(layer, name)
            if t is not None:
                setattr(layer, name, t[:1].repeat_interleave(batch, dim=0))
        layer.budget = 0


def batch_decode_ours(gen, cache, batch, steps, dev):
    replicate_row0(cache, batch)
    release(dev)
    start = torch.randint(0, gen.model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(2)).tolist()
    _, _, stamps = generate_ours(gen, start, steps, cache=cache)
    return batch * steady_rate(stamps, skip=2)


# --- dense ------------------------------------------------------------------------------------------


class _Stamps:
    """A ``generate()`` streamer that stamps each put (the prompt first, then every new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):  # the tokens arrive on the CPU (generate calls .cpu()): already synced
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_dense(model, length, steps, dev):
    """Warm TTFT and steady decode tok/s of ``generate()`` at batch 1; returns (row, cache)."""
    from sparsek.runtime.dense_switch import dense_attention
    from sparsek.runtime.transformers_compat import output_cache

    ids = torch.tensor([prompt_ids(model, length)], device=dev)
    with dense_attention(model), torch.inference_mode():
        model.generate(ids[:, : min(length, 256)], max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
        release(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        clock = _Stamps()
        sync(dev)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps, streamer=clock,
                             return_dict_in_generate=True)
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    tokens = clock.times[1:]  # [0] is the prompt
    row = dict(ttft=tokens[0] - t0, tps=steady_rate(tokens, skip=0) if len(tokens) > 2 else 0.0,
               kv=kv_bytes_dense(model, length), peak=peak)
    return row, output_cache(out)


def kv_bytes_dense(model, length, batch=1):
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * length * batch * next(model.parameters()).element_size()


def dense_attention_time(model, length, dev):
    """SDPA of one query over ``length`` keys (GQA), x layers, graph-timed."""
    c = model.config
    g = torch.Generator(device=dev).manual_seed(4)
    q = torch.randn(1, c.num_attention_heads, 1, c.head_dim, device=dev, dtype=model.dtype, generator=g)
    k = torch.randn(1, c.num_key_value_heads, length, c.head_dim, device=dev, dtype=model.dtype, generator=g)
    v = torch.randn_like(k)
    with torch.inference_mode():
        t, how = graph_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True), dev)
    return t * c.num_hidden_layers, how


def batch_decode_dense(model, dense_cache, batch, steps, dev):
    """Aggregate tok/s of the model's forward over its DynamicCache (row 0 replicated)."""
    from sparsek.runtime.dense_switch import dense_attention
    from sparsek.runtime.transformers_compat import with_cache

    for layer in dense_cache.layers:  # layer by layer: the peak is one layer above the result
        for name in ("keys", "values"):
            setattr(layer, name, getattr(layer, name)[:1].repeat_interleave(batch, dim=0))
    release(dev)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    past = dense_cache.get_seq_length()
    with dense_attention(model), torch.inference_mode():
        def loop(n, first):
            nonlocal tok
            for i in range(n):
                pos = torch.full((batch, 1), first + i, device=dev)
                logits = model(tok, position_ids=pos, logits_to_keep=1, **with_cache(model, dense_cache)).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)

        loop(1, past)
        sync(dev)
        t = time.perf_counter()
        loop(steps, past + 1)
        sync(dev)
    return batch * steps / (time.perf_counter() - t)


# --- largest batch ----------------------------------------------------------------------------------


def free_bytes(dev):
    release(dev)
    if dev.type != "cuda":
        return 8 * 2**30
    return torch.cuda.mem_get_info(dev)[0]


def largest_batch(label, estimate, measure, dev, tries=4):
    """Try ``estimate``, then smaller on failure; returns (batch that ran, aggregate tok/s)."""
    b = max(1, estimate)
    for _ in range(tries):
        print(f"  {label}: batch {b} ...", flush=True)
        agg = attempt(f"{label} batch {b}", functools.partial(measure, b), dev)
        if agg is not None:
            return b, agg
        if b == 1:
            break
        b = max(1, int(b * 0.8))
    return None, None


# --- report -----------------------------------------------------------------------------------------


def fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt(x, spec, scale=1.0):
    return "-" if x is None else format(x * scale, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def targets_table(rows, name):
    """Issue 4's targets at the largest context measured, and the decode attention spread."""
    last = rows[-1]
    o, d = last.get("ours") or {}, last.get("dense") or {}
    ctx = last["context"]
    checks = [
        (f"TTFT b=1 at {ctx}: dense / ours", ratio(d.get("ttft"), o.get("ttft")), TTFT_RATIO),
        (f"decode tok/s b=1 at {ctx}: ours / dense", ratio(o.get("tps"), d.get("tps")), DECODE_RATIO),
        (f"concurrent sequences at {ctx}: ours / dense", ratio(last.get("b_ours"), last.get("b_dense")), BATCH_RATIO),
        (f"aggregate decode tok/s at {ctx}: ours / dense", ratio(last.get("agg_ours"), last.get("agg_dense")), AGG_RATIO),
    ]
    lines = ["| target (issue 4) | measured | goal | met |", "|---|---|---|---|"]
    for label, value, goal in checks:
        met = "-" if value is None else ("yes" if value >= goal else "**no**")
        lines.append(f"| {label} | {fmt(value, '.2f')}x | >= {goal}x | {met} |")
    for key, label in (("attn_kernel", "decode kernel"), ("attn_step", "decode attention (update + kernel)")):
        vals = [(r["context"], r["ours"].get(key)) for r in rows if r.get("ours") and r["ours"].get(key)]
        if len(vals) < 2:
            lines.append(f"| {name} {label}/step spread over contexts | - | within +-15% of the first | - |")
            continue
        base = vals[0][1]
        spread = max(abs(v / base - 1) for _, v in vals)
        span = f"{vals[0][0]}..{vals[-1][0]}"
        met = "yes" if spread <= ATTN_SPREAD else "**no**"
        lines.append(f"| {name} {label}/step, {span}: max deviation from {vals[0][0]} | {spread * 100:.1f}% | "
                     f"within +-{ATTN_SPREAD * 100:.0f}% | {met} |")
    return lines


def render(rows, args, name, weights, dtype, dev, steps):
    head = (f"Generation benchmark: {args.preset} random weights ({fmt_bytes(weights)}), {dtype}, {dev} "
            f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), {name} "
            + (f"k={args.k} w={args.window}" if args.method == "sparsek" else f"g={args.group} s={args.cca_window}")
            + f", {steps} decode steps, CUDA graph {'off' if args.no_graph or dev.type != 'cuda' else 'on'}, "
            "warm measurements (compilation excluded)")
    lines = [
        head, "",
        "| context | runtime | TTFT b=1 (s) | decode tok/s b=1 | decode attn kernel/step (ms) | "
        "decode attn update+kernel/step (ms) | KV / seq | peak mem b=1 | largest batch | aggregate tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for label, key, bkey, akey in ((name, "ours", "b_ours", "agg_ours"), ("dense SDPA generate()", "dense", "b_dense", "agg_dense")):
            m = r.get(key)
            if m is None:
                lines.append(f"| {r['context']} | {label} | failed/skipped | | | | | | | |")
                continue
            lines.append(
                f"| {r['context']} | {label} | {fmt(m.get('ttft'), '.3f')} | {fmt(m.get('tps'), '.1f')} | "
                f"{fmt(m.get('attn_kernel'), '.3f', 1e3)} | {fmt(m.get('attn_step'), '.3f', 1e3)} | "
                f"{fmt_bytes(m.get('kv'))} | {fmt_bytes(m.get('peak'))} | {r.get(bkey) or '-'} | {fmt(r.get(akey), '.1f')} |"
            )
    lines += ["", f"TTFT breakdown of {name} (instrumented pass, CUDA events; s):", "",
              "| context | TTFT | prefill attention op | cache build (first chunk) | rest of the model |",
              "|---|---|---|---|---|"]
    for r in rows:
        bd = r.get("breakdown")
        if bd is None:
            lines.append(f"| {r['context']} | failed/skipped | | | |")
            continue
        lines.append(f"| {r['context']} | {bd['ttft']:.3f} | {bd['attn']:.3f} | {bd['build']:.3f} | {bd['rest']:.3f} |")
    lines += ["", *targets_table(rows, name)]
    return "\n".join(lines)


def write_atomic(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench_", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


# --- main -------------------------------------------------------------------------------------------


def measure_context(model, length, steps, dev, args):
    from sparsek.runtime.generation import Generator

    row: dict = dict(context=length)
    gen = Generator(model, None, prefill_chunk=args.prefill_chunk or length, cuda_graph=not args.no_graph)
    prompt = prompt_ids(model, length)
    cache = None

    def ours_b1():
        nonlocal cache
        generate_ours(gen, [prompt], 4)  # warm-up: same length (kernels specialise on it), decode + capture
        release(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        res, cache, stamps = generate_ours(gen, [prompt], steps)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
        return dict(ttft=res.time_to_first_token_s, tps=steady_rate(stamps, skip=2), kv=cache.kv_bytes(), peak=peak)

    print(f"context {length}: ours b=1 ...", flush=True)
    row["ours"] = attempt("ours b=1", ours_b1, dev)
    print(f"context {length}: ours TTFT breakdown ...", flush=True)
    row["breakdown"] = attempt("ours TTFT breakdown", lambda: ttft_breakdown(gen, model, length, dev, args.method), dev)
    if cache is not None and row["ours"] is not None:
        print(f"context {length}: ours decode attention ...", flush=True)
        times = attempt("ours decode attention", lambda: ours_attention_times(model, cache, dev, args.method), dev)
        if times is not None:
            row["ours"].update(attn_kernel=times[0], attn_step=times[1], attn_how=times[2])
        if not args.no_batch:
            per_seq = state_bytes_per_row(cache) * 1.1 + 16 * 2**20  # state + decode activations
            est = min(args.max_batch, int(0.9 * (free_bytes(dev) + state_bytes_per_row(cache)) / per_seq))
            row["b_ours"], row["agg_ours"] = largest_batch(
                "ours", est, lambda b: batch_decode_ours(gen, cache, b, steps, dev), dev)
    cache = None
    release(dev)

    if not args.no_dense:
        print(f"context {length}: dense b=1 ...", flush=True)
        got = attempt("dense b=1", lambda: run_dense(model, length, steps, dev), dev)
        dense_cache = None
        if got is not None:
            row["dense"], dense_cache = got
            t = attempt("dense decode attention", lambda: dense_attention_time(model, length, dev), dev)
            if t is not None:
                row["dense"]["attn_kernel"] = t[0]
            if not args.no_batch:
                kv = row["dense"]["kv"]
                per_seq = kv * 1.05 + 32 * 2**20
                est = min(args.max_batch, int(0.9 * (free_bytes(dev) + kv) / per_seq))
                row["b_dense"], row["agg_dense"] = largest_batch(
                    "dense", est, lambda b: batch_decode_dense(model, dense_cache, b, steps, dev), dev)
        dense_cache = None
        release(dev)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--method", default="sparsek", choices=["sparsek", "cca"])
    ap.add_argument("--contexts", default=None, help="comma-separated, e.g. 8192,32768,131072")
    ap.add_argument("--quick", action="store_true", help="8K and 32K only, fewer decode steps")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per measurement")
    ap.add_argument("--k", type=int, default=None, help="SparseK top-k (default 2048; tiny preset 24)")
    ap.add_argument("--window", type=int, default=None, help="SparseK window (default 512; tiny preset 16)")
    ap.add_argument("--group", type=int, default=None, help="CCA group (default 16; tiny preset 4)")
    ap.add_argument("--cca-window", type=int, default=None, help="CCA window (default 1024; tiny preset 32)")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="0: the whole prompt in one chunk")
    ap.add_argument("--no-graph", action="store_true", help="decode eagerly (no CUDA graph)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-batch", action="store_true", help="skip the largest-batch measurements")
    ap.add_argument("--max-batch", type=int, default=None, help="upper bound of the batch search (default 512; cpu 4)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    args = ap.parse_args()
    try:
        contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else None
    except ValueError:
        ap.exit(2, f"error: --contexts must be comma-separated integers, got {args.contexts!r}\n")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.exit(2, f"error: the folder of --out does not exist: {args.out}\n")
    tiny = args.preset == "tiny"
    for field, full, small in (("k", 2048, 24), ("window", 512, 16), ("group", 16, 4), ("cca_window", 1024, 32)):
        if getattr(args, field) is None:
            setattr(args, field, small if tiny else full)
    dev = torch.device(args.device)
    if args.max_batch is None:
        args.max_batch = 512 if dev.type == "cuda" else 4
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if contexts is None:
        if tiny:
            contexts = [64, 160]
        else:
            contexts = [8192, 32768] if args.quick else [8192, 32768, 131072]
    steps = args.steps or (8 if tiny else 32 if args.quick else 64)
    t_start = time.perf_counter()
    model = build_model(args.preset, args.method, dtype, dev, args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    name = "SparseK" if args.method == "sparsek" else "CCA"
    rows = []
    for length in contexts:
        row = measure_context(model, length, steps, dev, args)
        rows.append(row)
        print(f"context {length} done at {time.perf_counter() - t_start:.0f} s: {row}", flush=True)
    table = render(rows, args, name, weights, dtype, dev, steps)
    print(table)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        write_atomic(args.out, table)


if __name__ == "__main__":
    main()
