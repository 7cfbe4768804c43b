"""`tatr report`: tables, figures and index.html for each benchmark in the results store."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="report")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Results folder whose store/ is read.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where <benchmark>/ folders are written [default: the --root folder].",
)
@click.option("--benchmark", "benchmarks", multiple=True, help="Only this benchmark (repeatable) [default: all].")
@click.option(
    "--published",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("results/reference/published.csv"),
    show_default=True,
    help="Published reference numbers for the comparison table (skipped when absent).",
)
@click.option("--tables-only", is_flag=True, help="Skip the figures (seconds instead of tens of seconds).")
@click.option("--from-wandb", "wandb_path", metavar="ENTITY/PROJECT", help="Read the rows from W&B runs instead.")
def command(
    root: Path,
    out: Path | None,
    benchmarks: tuple[str, ...],
    published: Path,
    tables_only: bool,
    wandb_path: str | None,
) -> None:
    """Write results/<benchmark>/{tables,figures,index.html,baselines.csv} from the results store."""
    from tatr.report import build as report

    rows = report.rows_from_wandb(wandb_path) if wandb_path else None
    for done in report.generate(root, out, benchmarks or None, published, rows=rows, figures=not tables_only):
        click.echo(
            f"{done.folder}/index.html: {len(done.tables)} tables, {len(done.figures)} figures"
            + (f", {len(done.skipped)} parts without data" if done.skipped else "")
        )
        for line in done.skipped:
            click.echo(f"  skipped {line}")
