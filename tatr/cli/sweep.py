"""`tatr sweep`: an Optuna study over a merging configuration; see `tatr.runs.sweep.run`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="sweep", context_settings={"ignore_unknown_options": False})
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option(
    "--sweep",
    "sweep_file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Search space, e.g. sweeps/tatr.yaml.",
)
@click.option(
    "--sweep-set",
    "space_overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of the search space, as KEY=VALUE does for the experiment (e.g. params.lam.high=2).",
)
@click.option("--trials", type=int, default=50, show_default=True, help="Finished trials the study should hold.")
@click.option("--study", default=None, help="Study name [default: <experiment name>-<sweep file stem>].")
@click.option(
    "--storage",
    default=None,
    help="Optuna storage: sqlite:///FILE, FILE.journal, postgresql://USER@HOST:PORT/DB "
    "[default: <root>/optuna.db; <root>/optuna.journal with --workers > 1].",
)
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes on this machine.")
@click.option(
    "--sampler", type=click.Choice(["tpe", "random", "grid"]), default=None, help="Override the space's sampler."
)
@click.option(
    "--pruner", type=click.Choice(["median", "halving", "none"]), default=None, help="Override the space's pruner."
)
@click.option("--allow-test-tuning", is_flag=True, help="Allow tuning on the test split (split=test).")
@click.option("--no-wandb", is_flag=True, help="Do not mirror runs to W&B (the results store is always written).")
@click.option("--no-final", is_flag=True, help="Skip the final test evaluation (e.g. on extra machines of a study).")
@click.option("--create-only", is_flag=True, help="Create the study and the plan cache, run no trial.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Results folder: store/, wandb/ and the default Optuna storage.",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(
    experiment: Path,
    overrides: tuple[str, ...],
    sweep_file: Path,
    space_overrides: tuple[str, ...],
    trials: int,
    study: str | None,
    storage: str | None,
    workers: int,
    sampler: str | None,
    pruner: str | None,
    allow_test_tuning: bool,
    no_wandb: bool,
    no_final: bool,
    create_only: bool,
    root: Path,
    no_progress: bool,
) -> None:
    """Tune a merge on validation with Optuna, then evaluate the best trial on test.

    \b
    Example (the testbed, TA + trust region):
      tatr sweep experiments/testbed.yaml --sweep sweeps/tatr.yaml --trials 50
    """
    from tatr.runs.sweep.run import run_sweep

    result = run_sweep(
        experiment,
        sweep_file,
        overrides,
        space_overrides=space_overrides,
        trials=trials,
        study=study,
        storage=storage,
        workers=workers,
        sampler=sampler,
        pruner=pruner,
        allow_test_tuning=allow_test_tuning,
        wandb=not no_wandb,
        final=not no_final,
        create_only=create_only,
        results=root,
        progress=not no_progress,
        echo=click.echo,
    )
    if not create_only:
        click.echo(result.table())
