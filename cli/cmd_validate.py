"""``sparsek validate MODEL``: the sparse model against its dense self (parsing and printing only)."""

from __future__ import annotations

import typer

from sparsek.runtime.errors import CheckFailed


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate(
        model: str = typer.Argument(..., help="Converted model folder or Hub id (owner/name)."),
        revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) to pin."),
        dense: str = typer.Option(None, "--dense", help="A separate dense reference (default: the same weights run dense)."),
        data: list[str] = typer.Option(None, "--data", help="Held-out text: .txt/.jsonl/.parquet files or folders (repeatable; default: embedded corpus)."),
        seq_len: list[str] = typer.Option(None, "--seq-len", help="Sequence length(s) for perplexity, speed (repeatable or comma separated; 4k = 4096)."),
        num_sequences: int = typer.Option(None, "--num-sequences", help="Sequences per length (default 8, quick 2)."),
        batch_size: int = typer.Option(1, "--batch-size", help="Sequences per forward pass."),
        passkey_lengths: list[str] = typer.Option(None, "--passkey-lengths", help="Passkey prompt lengths (default: the --seq-len values and the context)."),
        passkey_depths: list[str] = typer.Option(None, "--passkey-depths", help="Passkey depths in [0, 1] (comma separated)."),
        passkey_trials: int = typer.Option(None, "--passkey-trials", help="Trials per length and depth."),
        no_passkey: bool = typer.Option(False, "--no-passkey", help="Skip passkey retrieval."),
        no_consistency: bool = typer.Option(False, "--no-consistency", help="Skip the prefill/decode consistency check."),
        no_speed: bool = typer.Option(False, "--no-speed", help="Skip speed and memory."),
        no_recall: bool = typer.Option(False, "--no-recall", help="Skip SparseK selection recall."),
        decode_steps: int = typer.Option(None, "--decode-steps", help="Decode steps timed per length."),
        device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        dtype: str = typer.Option(None, "--dtype", help="auto, float32, bfloat16, float16."),
        quick: bool = typer.Option(False, "--quick", help="Small preset: 1K tokens, 2 sequences, 3 depths, 1 trial."),
        max_ppl_increase: float = typer.Option(None, "--max-ppl-increase", help="Exit 1 if sparse perplexity is more than this fraction above dense (0.05 = 5%)."),
        min_passkey: float = typer.Option(None, "--min-passkey", help="Exit 1 if sparse passkey accuracy is below this (0..1)."),
        json_path: str = typer.Option(None, "--json", help="Write the machine-readable report here."),
        plot: str = typer.Option(None, "--plot", help="Write PNG figures into this folder (needs matplotlib)."),
        no_save: bool = typer.Option(False, "--no-save", help="Do not save validation.json into the model folder."),
        seed: int = typer.Option(0, "--seed", help="Seed of the passkey keys."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    ) -> None:
        """Measure MODEL sparse vs dense: perplexity, KL, top-1, passkey, decode consistency, speed, recall."""
        from sparsek.runtime.report import format_report
        from sparsek.runtime.validate import (
            ValidateOptions,
            failed_checks_message,
            parse_float_list,
            parse_int_list,
            run_validation,
        )

        opts = ValidateOptions(
            source=model,
            revision=revision,
            dense_source=dense,
            data=list(data or []),
            seq_lens=parse_int_list(seq_len),
            num_sequences=num_sequences,
            batch_size=batch_size,
            passkey_lengths=parse_int_list(passkey_lengths),
            passkey_depths=parse_float_list(passkey_depths),
            passkey_trials=passkey_trials,
            passkey=not no_passkey,
            consistency=not no_consistency,
            speed=not no_speed,
            recall=not no_recall,
            decode_steps=decode_steps,
            device=device,
            dtype=dtype,
            quick=quick,
            max_ppl_increase=max_ppl_increase,
            min_passkey=min_passkey,
            json_path=json_path,
            plot_dir=plot,
            save_report=not no_save,
            seed=seed,
            progress=not no_progress,
        )
        result = run_validation(opts)
        typer.echo(format_report(result))
        for path in result.get("_written", []):
            typer.echo(f"wrote {path}")
        if result.get("_saved_in_model"):
            typer.echo(f"saved {result['_saved_in_model']} (used by `sparsek push` for the model card)")
        message = failed_checks_message(result)
        if message:
            raise CheckFailed(f"validation failed: {message}")
