"""``sparsek convert``: parse the options, call ``sparsek.convert.convert``, print the summary."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Convert a dense Hugging Face causal LM into a sparse-attention model folder.

SOURCE is a local model folder, a Hub id (owner/name), or nothing for the embedded default model (SmolLM2-135M-Instruct). OUT gets the dense weights unchanged, the new scorer tensors (SparseK), a config recording the method, the modeling code and the tokenizer; it loads with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True). Architectures: llama, mistral, qwen2, qwen3. Weights must be safetensors (pickle .bin files are refused).

Examples:
  sparsek convert -o smollm2-sparsek
  sparsek convert ./my-llama -o my-llama-sk --k 512 --window 256
  sparsek convert Qwen/Qwen3-0.6B -o qwen3-cca --method cca --group 16
  sparsek convert ./my-llama -o my-llama-sk --dtype bfloat16 --force

Defaults: SparseK k=2048, window=512 for models with >= 32K context (k=256, window=256 below), alpha=1/16; CCA group=16, window=1024. OUT is written to a temporary folder beside it and renamed at the end, so a failed run never leaves a half-written OUT; --force replaces an existing OUT only once the new one is complete.
"""


def register(app: typer.Typer) -> None:
    @app.command("convert", help=HELP, no_args_is_help=False)
    def convert_command(
        source: str = typer.Argument(None, metavar="SOURCE", help="Model folder or Hub id; omit for the embedded default.", show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (must not exist, unless --force).", show_default=False),
        method: str = typer.Option("sparsek", "--method", "-m", help="Sparse attention method: sparsek or cca."),
        k: int = typer.Option(None, "--k", help="SparseK: number of selected older keys per query.", show_default=False),
        window: int = typer.Option(None, "--window", "-w", help="Local window (SparseK w, or CCA s).", show_default=False),
        alpha: float = typer.Option(None, "--alpha", help="SparseK: recency slope of the scores (default 1/16).", show_default=False),
        group: int = typer.Option(None, "--group", "-g", help="CCA: tokens pooled into one core token.", show_default=False),
        dtype: str = typer.Option("auto", "--dtype", help="Weight dtype: auto (the source's), float32, bfloat16, float16."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new folder is complete)."),
        revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) of SOURCE.", show_default=False),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        from sparsek.convert import ConvertOptions, convert

        options = ConvertOptions(
            method=method, topk=k, window=window, alpha=alpha, group=group, dtype=dtype,
            force=force, revision=revision, progress=not quiet,
        )
        summary = convert(source, out, options)
        for line in summary.lines():
            typer.echo(line)
