"""The `tatr` command. Each subcommand lives in its own module and is added here by name.

User mistakes surface as `TatrError` and are printed as one line on stderr (exit 2), never as a
traceback; `TATR_DEBUG=1` shows the traceback anyway. click's usage errors (a bad or missing option, an
unknown subcommand) are one line too, `tatr: error: ... (see 'tatr CMD --help')`, exit 2; Ctrl-C prints
`tatr: aborted` alone, exit 130. `tatr` with no arguments shows the help (stderr, exit 2).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from tatr.core.distributed import world
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
    "prepare-lm": "tatr.cli.prepare_lm",
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
    """Run `tatr`; every user error, click's usage errors included, is one line on stderr.

    The command is invoked here (`make_context` + `invoke`) rather than through click's `main`, which
    catches Ctrl-C itself and prints a blank line before any message of ours."""
    install_signal_handlers()
    world()  # under torchrun: the process group, each rank on its own GPU, before anything uses CUDA
    args = sys.argv[1:] if argv is None else list(argv)
    if "_TATR_COMPLETE" in os.environ:  # shell completion: click's own main answers it and exits
        return cli.main(args=args, prog_name="tatr")
    try:
        with cli.make_context("tatr", args) as ctx:
            cli.invoke(ctx)
    except TatrError as exc:
        if os.environ.get("TATR_DEBUG"):
            raise
        click.echo(f"tatr: error: {exc}", err=True)
        return 2
    except (KeyboardInterrupt, EOFError, click.exceptions.Abort):
        click.echo("tatr: aborted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `tatr` alone: the help, as click shows it (stderr, exit 2)
        return exc.exit_code
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else _command_path(args)
        click.echo(f"tatr: error: {_one_line(exc.format_message())} (see '{command} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"tatr: error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except BrokenPipeError:  # `tatr ... | head`: stop quietly, as click's main does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _command_path(args: list[str]) -> str:
    """`tatr CMD` for an error click raised without its context (e.g. "option requires an argument"):
    the group takes only flags, so its first other argument is the subcommand."""
    name = next((a for a in args if not a.startswith("-")), None)
    return f"tatr {name}" if name in COMMANDS else "tatr"


def _one_line(message: str) -> str:
    """click's message as one line in tatr's style: no line breaks, no final period, lower-case start,
    "; did you mean" as in tatr's own messages."""
    text = " ".join(message.split()).rstrip(".").replace(". Did you mean", "; did you mean")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


if __name__ == "__main__":
    sys.exit(main())
