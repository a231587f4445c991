"""``sparsek generate``: batch generation from a JSONL file, resumable."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Generate answers for every prompt of a JSONL file, appending one JSON line per finished prompt.

MODEL is a converted folder or a Hub id. Each input line is an object with an "id" and either a "prompt" (a string, sent as one user message through the chat template unless --no-chat-template) or "messages" (a list of {"role", "content"}). Each output line has the id, the text, prompt_tokens, completion_tokens, finish_reason ("stop" or "length"), time_to_first_token_s, total_s and decode_tokens_per_s.

Output is appended and flushed after every finished prompt, and ids already in OUTPUT are skipped: re-run the same command after an interruption and it resumes. A malformed input line is reported with its line number on stderr and skipped. A progress bar shows prompts done and tokens/s.

Examples:
  sparsek generate smollm2-sparsek --input prompts.jsonl --output out.jsonl
  sparsek generate you/qwen3-cca -i prompts.jsonl -o out.jsonl --batch-size 8 --max-new-tokens 256
  sparsek generate ./model -i p.jsonl -o o.jsonl --temperature 0.8 --top-p 0.95 --seed 0

Input lines look like:
  {"id": "q1", "prompt": "Summarise the plot of Hamlet."}
  {"id": 2, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
"""


def register(app: typer.Typer) -> None:
    @app.command("generate", help=HELP)
    def generate_command(
        model: str = typer.Argument(..., metavar="MODEL", help="Converted model folder or Hub id.", show_default=False),
        input: Path = typer.Option(..., "--input", "-i", help="JSONL file of requests.", show_default=False),
        output: Path = typer.Option(..., "--output", "-o", help="JSONL file to append results to.", show_default=False),
        batch_size: int = typer.Option(1, "--batch-size", "-b", help="Prompts generated together."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens per answer."),
        temperature: float = typer.Option(0.0, "--temperature", "-t", help="Sampling temperature; 0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
        repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
        stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable).", show_default=False),
        seed: int = typer.Option(None, "--seed", help="Random seed for sampling.", show_default=False),
        system: str = typer.Option(None, "--system", "-s", help="System prompt for requests without one.", show_default=False),
        no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Feed 'prompt' as raw text."),
        prefill_chunk: int = typer.Option(4096, "--prefill-chunk", help="Prompt tokens per forward pass."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (as saved), float32, bfloat16, float16."),
        revision: str = typer.Option(None, "--revision", help="Hub revision of MODEL.", show_default=False),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        from sparsek.runtime.errors import UserError
        from sparsek.runtime.generation import Generator, run_jsonl_job
        from sparsek.runtime.loading import load_model, load_tokenizer
        from sparsek.runtime.sampling import SamplingConfig

        if not input.is_file():
            raise UserError(f"input file not found: {input}")
        if output.exists() and not output.is_file():
            raise UserError(f"output {output} exists and is not a file")
        if output.resolve() == input.resolve():
            raise UserError("--output must differ from --input")
        if batch_size < 1 or prefill_chunk < 1:
            raise UserError("--batch-size and --prefill-chunk must be >= 1")
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, stop_strings=tuple(stop or ()), seed=seed)
        try:
            cfg.validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        m = load_model(model, device=device, dtype=dtype, revision=revision)
        tok = load_tokenizer(model, revision=revision)
        gen = Generator(m, tok, prefill_chunk=prefill_chunk)
        cfg.stop_token_ids = gen.default_stop_ids()
        stats = run_jsonl_job(
            gen, input, output, cfg, batch_size=batch_size, system=system, chat_template=not no_chat_template,
            warn=lambda msg: typer.echo(f"sparsek: warning: {input}: {msg}", err=True), progress=not quiet,
        )
        typer.echo(
            f"{stats['generated']} generated, {stats['skipped_done']} already in {output}, "
            f"{stats['new_tokens']} new tokens in {stats['seconds']:.1f}s"
        )
