"""``sparsek push MODEL REPO_ID``: upload a converted folder to the Hub (parsing and printing only)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("push")
    def push(
        model: str = typer.Argument(..., help="Converted model folder."),
        repo_id: str = typer.Argument(..., help="Hub repository, owner/name (created if missing)."),
        private: bool = typer.Option(False, "--private", help="Create the repository as private."),
        revision: str = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
        create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of pushing to main."),
        commit_message: str = typer.Option(None, "--commit-message", help="Commit message."),
        endpoint: str = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)."),
        token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the saved login). Never printed."),
    ) -> None:
        """Upload MODEL with a generated model card, then verify every remote file's size and hash."""
        from sparsek.convert.push import push as do_push

        result = do_push(model, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, endpoint=endpoint, token=token)
        typer.echo(f"uploaded and verified {result.files} files ({result.bytes / 2**20:.1f} MiB) to {result.repo_id}")
        typer.echo(f"commit: {result.commit_url}")
        if result.pr_url:
            typer.echo(f"pull request: {result.pr_url}")
