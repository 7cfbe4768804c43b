"""The `tatr` command. Each subcommand lives in its own module and is added here by name.

User mistakes surface as `TatrError` and are printed as one line on stderr (exit 2), never as a
traceback; `TATR_DEBUG=1` shows the traceback anyway.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from tatr.core.errors import TatrError
from tatr.core.outputs import install_signal_handlers

# subcommand name -> module defining a click command called `command`
COMMANDS = {
    "merge": "tatr.cli.merge",
    "evaluate": "tatr.cli.evaluate",
    "sweep": "tatr.cli.sweep",
    "dashboard": "tatr.cli.dashboard",
    "ablate": "tatr.cli.ablate",
    "report": "tatr.cli.report",
    "convert": "tatr.cli.convert",
    "prepare-text": "tatr.cli.prepare_text",
}


class LazyGroup(click.Group):
    """Import a subcommand's module only when it runs, so `tatr merge` never loads optuna or wandb."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, module in COMMANDS.items() if importlib.util.find_spec(module) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or importlib.util.find_spec(COMMANDS[name]) is None:
            return None
        return importlib.import_module(COMMANDS[name]).command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tatr")
def cli() -> None:
    """tatr: Task Arithmetic in Trust Region, and a harness to sweep, evaluate and report it."""


def main(argv: list[str] | None = None) -> int:
    install_signal_handlers()
    try:
        cli.main(args=argv, prog_name="tatr", standalone_mode=False)
    except TatrError as exc:
        if os.environ.get("TATR_DEBUG"):
            raise
        click.echo(f"tatr: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("tatr: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
