"""``sparsek adapt``: parse the options, call ``sparsek.convert.adapt_train.run_adapt``, print a summary."""

from __future__ import annotations

import typer

HELP = """Adapt a converted model to its sparse attention with a short fine-tune.

MODEL is a converted folder (or Hub id). OUT becomes a converted folder like `sparsek convert` writes (same code, config and tokenizer files, trained weights), loadable with plain transformers.

Objectives: lm (next-token loss), distill (KL to the same weights run dense, in the same process, no second model copy) or mix. --scorer-loss W adds the SparseK scorer loss (SPEC 1.6) that teaches the top-k to follow the dense attention. --train scorer|attention|all chooses what trains; frozen parameters get no optimizer state.

Data: --data takes .txt/.jsonl/.parquet files or folders (default: the embedded corpus, Python's help topics); rows never mix documents. Held-out data: --eval-data, or every 1/--eval-fraction-th document.

Examples:
  sparsek adapt smollm2-sparsek -o smollm2-sparsek-adapted --steps 1000 --seq-len 2048 --scorer-loss 1
  sparsek adapt model-cca -o model-cca-adapted --train attention --objective mix --data corpus/
  torchrun --nproc-per-node 2 -m sparsek.cli adapt model -o out --config run.yaml

Flags override --config run.yaml. Checkpoints go to OUT.adapt-run/ every --checkpoint-every steps; --resume continues exactly from the last one. Several processes (torchrun) shard the model with FSDP2; only rank 0 logs and writes.
"""

def register(app: typer.Typer) -> None:
    @app.command("adapt", help=HELP, no_args_is_help=True)
    def adapt_command(
        model: str = typer.Argument(..., metavar="MODEL", help="Converted model folder or Hub id."),
        out: str = typer.Option(None, "--out", "-o", help="Output folder (must not exist).", show_default=False),
        config: str = typer.Option(None, "--config", help="YAML file of options; flags override it.", show_default=False),
        steps: int = typer.Option(None, "--steps", help="Optimizer steps [1000].", show_default=False),
        data: list[str] = typer.Option(None, "--data", help="Training text: .txt/.jsonl/.parquet files or folders (repeatable) [embedded corpus].", show_default=False),
        eval_data: list[str] = typer.Option(None, "--eval-data", help="Held-out text (repeatable) [a split of --data].", show_default=False),
        eval_fraction: float = typer.Option(None, "--eval-fraction", help="Share of documents held out when no --eval-data [0.05].", show_default=False),
        text_field: str = typer.Option(None, "--text-field", help="Text field of .jsonl/.parquet rows [text].", show_default=False),
        seq_len: int = typer.Option(None, "--seq-len", help="Tokens per training row [min(2048, model max)].", show_default=False),
        objective: str = typer.Option(None, "--objective", help="lm, distill or mix [distill].", show_default=False),
        mix_weight: float = typer.Option(None, "--mix-weight", help="Share of the distill loss in mix [0.5].", show_default=False),
        temperature: float = typer.Option(None, "--temperature", help="Distillation temperature [1].", show_default=False),
        scorer_loss: float = typer.Option(None, "--scorer-loss", help="Weight of the SparseK scorer loss (SPEC 1.6) [0].", show_default=False),
        scorer_queries: int = typer.Option(None, "--scorer-queries", help="Sampled queries per row for the scorer loss [64].", show_default=False),
        train: str = typer.Option(None, "--train", help="What trains: scorer (SparseK only), attention or all [scorer].", show_default=False),
        lr: float = typer.Option(None, "--lr", help="Peak learning rate [1e-3].", show_default=False),
        scorer_lr: float = typer.Option(None, "--scorer-lr", help="Peak learning rate of the scorer [--lr].", show_default=False),
        min_lr_ratio: float = typer.Option(None, "--min-lr-ratio", help="Final lr as a share of --lr [0.1].", show_default=False),
        warmup: int = typer.Option(None, "--warmup", help="Linear warm-up steps [20].", show_default=False),
        schedule: str = typer.Option(None, "--schedule", help="cosine, linear or constant after warm-up [cosine].", show_default=False),
        weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay [0].", show_default=False),
        batch_size: int = typer.Option(None, "--batch-size", help="Rows per micro-batch per process [1].", show_default=False),
        grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [1].", show_default=False),
        clip: float = typer.Option(None, "--clip", help="Gradient-norm clipping, 0 for none [1].", show_default=False),
        seed: int = typer.Option(None, "--seed", help="Seed of data order and sampling [0].", show_default=False),
        device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ... [auto].", show_default=False),
        autocast: str = typer.Option(None, "--autocast", help="auto (bf16 on CUDA), bf16 or off [auto].", show_default=False),
        gradient_checkpointing: bool = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute layer activations in backward [on].", show_default=False),
        eval_every: int = typer.Option(None, "--eval-every", help="Steps between evaluations [100].", show_default=False),
        eval_batches: int = typer.Option(None, "--eval-batches", help="Held-out batches per evaluation [8].", show_default=False),
        checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints [100].", show_default=False),
        work_dir: str = typer.Option(None, "--work-dir", help="Checkpoints and logs [OUT.adapt-run].", show_default=False),
        resume: bool = typer.Option(None, "--resume", help="Continue the run in the work folder from its last checkpoint.", show_default=False),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        flags = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
        from sparsek.convert.adapt_config import resolve_config
        from sparsek.convert.adapt_train import run_adapt

        if quiet:
            flags["progress"] = False
        cfg = resolve_config(flags, config)
        result = run_adapt(cfg)
        if result.out is None:  # not rank 0
            return
        typer.echo(f"adapted model written to {result.out}")
        if result.losses:
            typer.echo(f"training loss: {result.losses[0]:.4f} (step {result.start_step + 1}) -> "
                       f"{result.losses[-1]:.4f} (step {cfg.steps}); {result.tokens_per_s:,.0f} tokens/s")
        if len(result.evals) >= 1:
            first, last = result.evals[0], result.evals[-1]
            for name, rec in (("before", first), ("after", last)):
                line = f"eval {name} (step {rec['step']}): sparse loss {rec['sparse_loss']:.4f}, dense {rec['dense_loss']:.4f}"
                if "recall" in rec:
                    line += f", selection recall {rec['recall']:.3f}"
                typer.echo(line)
