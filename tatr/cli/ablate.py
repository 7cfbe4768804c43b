"""`tatr ablate`: run ablation files (or a folder of them) and append their rows to the results store."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="ablate", context_settings={"ignore_unknown_options": False})
@click.argument("items", nargs=-1, required=True, metavar="FILE_OR_FOLDER... [KEY=VALUE...]")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Results folder: rows go to <root>/store/.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip points whose test rows are already in the store, or in the committed report's rows "
    "(<root>/<benchmark>/rows.jsonl.xz, copied into the store first).",
)
@click.option("--no-wandb", is_flag=True, help="Do not mirror the points to W&B (the results store is always written).")
@click.option("--report", "then_report", is_flag=True, help="Run `tatr report` for the benchmark(s) afterwards.")
def command(items: tuple[str, ...], root: Path, resume: bool, no_wandb: bool, then_report: bool) -> None:
    """Run ablations, e.g. `tatr ablate experiments/ablations/ benchmark=testbed --report`.

    The testbed baselines are an ablation file too: `tatr ablate experiments/baselines/testbed.yaml`.

    Arguments with '=' are dotted overrides applied to every file (`ablation.seeds=[0]`,
    `benchmark=clip8`, `suite.model=ViT-B-32`); the others are ablation files or folders of them.
    """
    import time

    from tatr.runs import ablations
    from tatr.runs.ablation_spec import ablation_files, load_ablation

    overrides = [i for i in items if "=" in i]
    paths = [i for i in items if "=" not in i]
    if not paths:
        raise click.UsageError("name at least one ablation file or folder")
    files = list(ablation_files(paths))
    loaded = [(f, *load_ablation(f, overrides)) for f in files]  # all files are checked first
    if resume:
        from tatr.store.rows import SNAPSHOT, import_snapshot

        for benchmark in dict.fromkeys(config.benchmark for _, config, _ in loaded):
            if n := import_snapshot(root, benchmark):
                click.echo(f"--resume: the {n:,} rows of {root / benchmark / SNAPSHOT} are in the store")
    benchmarks = []
    for path, config, spec in loaded:
        start = time.perf_counter()
        click.echo(f"== {path} ({spec.kind} on {config.benchmark})")
        ablations.run(config, spec, root, resume=resume, log=click.echo, wandb=not no_wandb)
        click.echo(f"== {path}: done in {time.perf_counter() - start:.0f}s")
        if config.benchmark not in benchmarks:
            benchmarks.append(config.benchmark)
    if then_report:
        from tatr.report import build as report

        for done in report.generate(root, benchmarks=benchmarks):
            click.echo(f"{done.folder}/index.html: {len(done.tables)} tables, {len(done.figures)} figures")
