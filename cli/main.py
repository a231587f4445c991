"""The ``sparsek`` command line: parses, calls into convert/runtime, prints.

Each command lives in its own ``cmd_*.py`` module that exposes ``register(app)``; only commands
whose module is present are listed. Usage errors and bad input end with one line on stderr and
exit code 2; a check that falls short (``validate`` thresholds) exits 1.
"""

from __future__ import annotations

import importlib
import sys

import typer

from sparsek.runtime.errors import CheckFailed, UserError

from .version import package_version

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as _click_exc
except ImportError:  # older typer uses click itself
    from click import exceptions as _click_exc

_UsageError = _click_exc.UsageError
_ClickException = _click_exc.ClickException
_NoArgsIsHelp = getattr(_click_exc, "NoArgsIsHelpError", ())
_Abort = getattr(_click_exc, "Abort", ())

COMMANDS = ("convert", "adapt", "validate", "push", "chat", "generate")

app = typer.Typer(
    name="sparsek",
    help="Turn dense Hugging Face causal LMs into long-context sparse-attention models (SparseK, CCA) and ship them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sparsek {package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Turn dense Hugging Face causal LMs into long-context sparse-attention models and ship them.

    Typical flow: sparsek convert MODEL -o OUT, sparsek validate OUT, sparsek push OUT you/name.
    """


def _load_commands() -> None:
    for name in COMMANDS:
        module_name = f"sparsek.cli.cmd_{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        module.register(app)


_load_commands()


def error(message: str, code: int = 2) -> None:
    """Print ``sparsek: error: message`` (one line) to stderr and exit."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    typer.echo(f"sparsek: error: {first}", err=True)
    raise SystemExit(code)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="sparsek", standalone_mode=False)
    except _NoArgsIsHelp as e:
        typer.echo(e.ctx.get_help() if e.ctx else "", err=False)
        raise SystemExit(0) from None
    except _UsageError as e:
        hint = f" (see 'sparsek {e.ctx.info_name} --help')" if e.ctx and e.ctx.info_name != "sparsek" else ""
        error(f"{e.format_message()}{hint}")
    except _Abort:
        typer.echo("\naborted", err=True)
        raise SystemExit(130) from None
    except _ClickException as e:
        error(e.format_message())
    except UserError as e:
        error(str(e))
    except CheckFailed as e:
        error(str(e), code=1)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise SystemExit(130) from None
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    run(sys.argv[1:])
