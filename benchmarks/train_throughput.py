"""Training tokens/s of `sparsek adapt`'s step: sparse (SparseK, CCA) vs the same model dense (SDPA).

A ~1B-parameter Llama-shaped model with random weights (hidden 2048, 16 layers, 32 heads, 8 KV
heads, MLP 8192, vocab 32000, untied embeddings: 1.1B parameters), built on the GPU, one
row of L tokens per step. The step is exactly what `adapt` runs: ``AdaptObjective`` (chunked LM
head, next-token loss), bf16 autocast, float32 parameters, gradient checkpointing, AdamW over the
parameters that ``--train`` names. Dense runs the same weights with ``attn_implementation="sdpa"``.

Timing: CUDA-synchronised wall clock around whole steps, warm-up steps first (Triton compilation,
allocator), then the median of ``--steps`` steps. Targets (issue 6): sparse at least as fast as
dense at 8K and at least 1.5x faster at 32K, on one H100.

    python benchmarks/train_throughput.py --out docs/train_throughput.md
    python benchmarks/train_throughput.py --lengths 8192 32768 --methods dense sparsek cca --train all
    python benchmarks/train_throughput.py --tiny        # CPU smoke test of the script

Prints a markdown table last; ``--out FILE`` writes it (plus the settings and the GPU) there.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def build_model(method: str, args):
    from sparsek.runtime.configuration_sparsek import SparseKLlamaConfig
    from sparsek.runtime.modeling_sparsek import SparseKLlamaForCausalLM

    cfg = SparseKLlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.mlp, vocab_size=args.vocab, head_dim=args.hidden // args.heads,
        max_position_embeddings=max(args.lengths), tie_word_embeddings=False, rope_theta=500000.0,
        sparse_method="cca" if method == "cca" else "sparsek", sparsek_topk=args.k, sparsek_window=args.window,
        cca_group=args.group, cca_window=args.cca_window,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = SparseKLlamaForCausalLM(cfg)
    with torch.no_grad():  # random, not zero, scores: a realistic selection
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "scorer"):
                layer.self_attn.scorer.weight.normal_(0, 0.02)
    return model


def measure(method: str, length: int, args) -> dict:
    from sparsek.convert.adapt_objective import AdaptObjective
    from sparsek.convert.adapt_train import select_trainable
    from sparsek.runtime.dense_switch import dense_attention

    model = build_model(method, args)
    n_params = sum(p.numel() for p in model.parameters())
    train = args.train if not (method != "sparsek" and args.train == "scorer") else "attention"
    select_trainable(model, train)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    objective = AdaptObjective(model, args.objective, 0.5, 1.0, autocast=True)
    if args.objective != "lm":
        objective.freeze_teacher()
    params = [p for p in objective.parameters() if p.requires_grad]
    cuda = args.device == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    ids = torch.randint(0, args.vocab, (args.batch, length), device=args.device)
    mask = torch.ones_like(ids)
    qidx = None
    if method == "sparsek" and args.scorer_loss > 0:
        from sparsek.kernels.sparsek_scorer_loss import sample_queries

        qidx = sample_queries(length, args.scorer_queries, args.k, args.window, torch.Generator().manual_seed(0),
                              args.device)
    tokens = args.batch * length
    times, fwd_bwd = [], []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ctx = dense_attention(model) if method == "dense" else contextlib.nullcontext()
    try:
        with ctx:
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                loss, _ = objective(ids, mask, loss_scale=1.0 / tokens, scorer_scale=args.scorer_loss,
                                    query_index=qidx)
                loss.backward()
                sync()
                t1 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                t2 = time.perf_counter()
                if i >= args.warmup:
                    times.append(t2 - t0)
                    fwd_bwd.append(t1 - t0)
        if args.profile:
            profile_step(objective, opt, ids, mask, qidx, tokens, args)
        step = statistics.median(times)
        return {"method": method, "length": length, "params": n_params, "step_s": step,
                "fwd_bwd_s": statistics.median(fwd_bwd), "tokens_per_s": tokens / step,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}
    except torch.cuda.OutOfMemoryError:
        return {"method": method, "length": length, "params": n_params, "oom": True}
    finally:
        del objective, model, opt
        if cuda:
            torch.cuda.empty_cache()


def profile_step(objective, opt, ids, mask, qidx, tokens: int, args) -> None:
    """One more step under torch.profiler: where the step's time goes (GPU kernels and CPU ops)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        loss, _ = objective(ids, mask, loss_scale=1.0 / tokens, scorer_scale=args.scorer_loss, query_index=qidx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=60), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)


def target_for(length: int) -> float | None:
    """Issue 6: sparse at least as fast as dense at 8K, at least 1.5x faster at 32K."""
    return {8192: 1.0, 32768: 1.5}.get(length)


def table(rows: list[dict], args) -> str:
    lines = ["| length | method | tokens/s | step (s) | fwd+bwd (s) | speed-up vs dense | target | met | peak GiB |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    dense = {r["length"]: r for r in rows if r["method"] == "dense" and not r.get("oom")}
    for r in rows:
        if r.get("oom") or r.get("skipped"):
            lines.append(f"| {r['length']} | {r['method']} | {'OOM' if r.get('oom') else 'skipped (time budget)'} "
                         "| | | | | | |")
            continue
        d = dense.get(r["length"])
        ratio = d["step_s"] / r["step_s"] if d else None
        target = target_for(r["length"]) if r["method"] != "dense" else None
        met = "n/a" if target is None or ratio is None else ("yes" if ratio >= target else "no")
        lines.append(f"| {r['length']} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
                     f"{r['fwd_bwd_s']:.3f} | {f'{ratio:.2f}x' if ratio else 'n/a'} | "
                     f"{f'>= {target:g}x' if target else ''} | {met} | {r['peak_gib']:.1f} |")
    return "\n".join(lines)


TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "mlp": 128, "vocab": 256, "lengths": [256],
        "k": 32, "window": 32, "group": 8, "cca_window": 64, "steps": 2, "warmup": 1, "device": "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--methods", nargs="+", default=["dense", "sparsek", "cca"], choices=["dense", "sparsek", "cca"])
    p.add_argument("--train", default="all", choices=["scorer", "attention", "all"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--objective", default="lm", choices=["lm", "distill", "mix"])
    p.add_argument("--scorer-loss", type=float, default=0.0, help="SPEC 1.6 scorer loss weight (SparseK)")
    p.add_argument("--scorer-queries", type=int, default=64, help="sampled queries for the scorer loss")
    p.add_argument("--profile", type=int, default=0, help="after timing, profile one step: print the top N ops")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=2048, help="SparseK top-k (SPEC 1.7 default for long context)")
    p.add_argument("--window", type=int, default=512, help="SparseK window")
    p.add_argument("--group", type=int, default=16, help="CCA group")
    p.add_argument("--cca-window", type=int, default=1024, help="CCA window s")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test the script")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--budget-s", type=float, default=0, help="skip the remaining measurements past this many seconds")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: a 2-layer model at 256 tokens")
    args = p.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_throughput.py needs a CUDA GPU (--device cpu only smoke-tests it)")
    rows = []
    started = time.perf_counter()
    for length in args.lengths:
        for method in args.methods:
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                rows.append({"method": method, "length": length, "skipped": True})
                continue
            r = measure(method, length, args)
            rows.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    md = table(rows, args)
    header = (f"Training step of `sparsek adapt` (--train {args.train}, {args.objective} objective"
              f"{f', scorer loss {args.scorer_loss:g}' if args.scorer_loss else ''}, bf16 autocast, fp32 params, "
              f"activation checkpointing, AdamW), batch {args.batch} row(s), random {rows[0].get('params', 0) / 1e9:.2f}B-parameter "
              f"Llama-shaped model, {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}. SparseK k={args.k}, "
              f"w={args.window}; CCA g={args.group}, s={args.cca_window}. Median of {args.steps} steps after "
              f"{args.warmup} warm-up steps.\n\n")
    print("\n" + header + md)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(header + md + "\n")


if __name__ == "__main__":
    main()
