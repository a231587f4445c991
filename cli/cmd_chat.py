"""``sparsek chat``: an interactive conversation with a converted model, streamed."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

import typer

HELP = """Chat with a converted (sparse-attention) model in the terminal; answers stream as they come.

MODEL is a converted folder (from `sparsek convert`) or a Hub id (owner/name; downloaded once with a progress bar, then used offline from the cache). The conversation goes through the model's chat template and is kept between turns in a bounded cache: SparseK holds window + k keys per head and layer at any length, CCA the raw window plus one core per group.

Commands inside the chat:
  /reset   start a new conversation (keeps --system)
  /stats   speed of the last answer (time to first token, tokens/s), prompt and cache sizes
  /exit    leave (Ctrl-D works too)
Ctrl-C stops the current answer, not the session.

Examples:
  sparsek chat smollm2-sparsek
  sparsek chat you/qwen3-cca --system "You are terse." --max-new-tokens 512
  sparsek chat ./my-llama-sk --temperature 0.7 --top-p 0.9 --device cuda --dtype bfloat16
"""


@contextmanager
def _ctrl_c_requests_stop():
    """While an answer streams, Ctrl-C sets a flag that the generation loop checks after every token.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and one raised inside a
    finaliser or a callback is printed and dropped ("Exception ignored in ..."): the answer then never
    stops. A flag cannot be lost, and the loop stops between two steps, so the cache stays consistent
    and the conversation continues from the partial answer. A second Ctrl-C (e.g. during a long
    prefill, which checks no flag) raises KeyboardInterrupt as before.
    """
    stop = threading.Event()

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: keep the default behaviour
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def register(app: typer.Typer) -> None:
    @app.command("chat", help=HELP)
    def chat_command(
        model: str = typer.Argument(..., metavar="MODEL", help="Converted model folder or Hub id.", show_default=False),
        system: str = typer.Option(None, "--system", "-s", help="System prompt.", show_default=False),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Most tokens per answer."),
        temperature: float = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature; 0 = greedy."),
        top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
        repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
        seed: int = typer.Option(None, "--seed", help="Random seed for sampling.", show_default=False),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (as saved), float32, bfloat16, float16."),
        revision: str = typer.Option(None, "--revision", help="Hub revision of MODEL.", show_default=False),
    ) -> None:
        from sparsek.runtime.errors import UserError
        from sparsek.runtime.generation import ChatSession, Generator
        from sparsek.runtime.loading import load_model, load_tokenizer
        from sparsek.runtime.sampling import SamplingConfig

        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, seed=seed)
        try:
            cfg.validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        typer.echo(f"loading {model} ...", err=True)
        m = load_model(model, device=device, dtype=dtype, revision=revision)
        tok = load_tokenizer(model, revision=revision)
        gen = Generator(m, tok)
        cfg.stop_token_ids = gen.default_stop_ids()
        session = ChatSession(gen, cfg, system=system)
        typer.echo(f"{m.sparse_settings.describe()} on {gen.device}. /reset /stats /exit; Ctrl-C stops an answer.", err=True)
        interactive = sys.stdin.isatty()
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                typer.echo("")
                break
            except KeyboardInterrupt:
                typer.echo("\n(use /exit or Ctrl-D to leave)")
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.reset()
                typer.echo("[conversation reset]")
                continue
            if text == "/stats":
                for key, value in session.stats().items():
                    typer.echo(f"  {key}: {value}")
                continue
            if text.startswith("/"):
                typer.echo(f"unknown command {text.split()[0]}; commands: /reset /stats /exit")
                continue
            try:
                with _ctrl_c_requests_stop() as stop:
                    res = session.reply(text, on_text=lambda d: (sys.stdout.write(d), sys.stdout.flush()),
                                        should_stop=stop.is_set)
                typer.echo("\n[interrupted]" if res.finish_reason == "interrupted" else "")
            except KeyboardInterrupt:
                typer.echo("\n[interrupted]")
