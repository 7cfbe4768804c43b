"""`tatr dashboard`: optuna-dashboard on a sweep's storage, on the loopback interface by default."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="dashboard")
@click.option(
    "--storage", default=None, help="sqlite:///FILE, FILE.journal or an RDB URL [default: the sweep's under --root]."
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Results folder holding optuna.db / optuna.journal.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True)
def command(storage: str | None, root: Path, host: str, port: int) -> None:
    """Serve optuna-dashboard for the studies in a sweep storage (Ctrl-C stops it)."""
    from tatr.runs.sweep.dashboard import serve

    serve(storage, root, host, port, echo=click.echo)
