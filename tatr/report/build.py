"""`tatr report`: the results store → tables, figures and one static `index.html` per benchmark.

Why it reads only the store (or W&B's mirror of it): the store is the source of truth, so a report
is a pure function of its rows. Nothing here reads the clock or the machine, so the same store
gives byte-identical files, and a diff of `results/<benchmark>/` means the numbers moved.

Output (under `<out>/<benchmark>/`, default `results/<benchmark>/`):
    tables/<name>.{md,tex,csv}   the paper-layout table, each ablation, the published reference
    figures/<name>.{png,pdf}     λ × q heatmap, mask-ratio curve, component bars, exemplar curve, …
    index.html                   everything above on one page that works offline
The `tables/` and `figures/` folders and `index.html` are built as `.tatr-tmp-*` siblings
(`tatr.core.outputs.atomic_dir`/`atomic_write`) and renamed into place only once all are complete;
other files in the benchmark folder are left alone, and nothing this report did not write is
deleted. The benchmark names a folder, so it must be a safe name, and `<out>/<benchmark>` must
not lead out of `<out>` through a symlink; the store and the published CSV must not lie among the
outputs. Each is one line, checked before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tatr.core.errors import TatrError
from tatr.core.outputs import atomic_dir, atomic_write, inside, safe_name, same_file, writing
from tatr.report import figures as F
from tatr.report import tables as T
from tatr.report.findings import findings, resolution_table
from tatr.report.index_page import FigureSpec, Section, render_index
from tatr.report.reference import reference_table
from tatr.report.render import Table
from tatr.report.selection import prepare
from tatr.report.wandb_rows import rows_from_wandb, wandb_run_rows
from tatr.store.rows import SNAPSHOT, read_store, snapshot_bytes, store_dir
from tatr.store.schema import ABLATION_KINDS, AblationKind

__all__ = ["generate", "rows_from_wandb", "wandb_run_rows", "write_report"]

DEFAULT_PUBLISHED = Path("results/reference/published.csv")

# which experiment file fills each ablation, for the "missing" hints; a kind without one (the
# testbed's baselines file) gets a section only when the store has its rows
# what a report writes into results/<benchmark>/, in write_report's order; nothing else there is touched
REPORT_OUTPUTS = ("tables", "figures", "index.html", "baselines.csv", SNAPSHOT)

ABLATION_FILES = {
    AblationKind.COMPONENTS: "experiments/ablations/components.yaml",
    AblationKind.TRUST_REGION: "experiments/ablations/trust_region.yaml",
    AblationKind.SENSITIVITY: "experiments/ablations/sensitivity.yaml",
    AblationKind.MASK_RATIO: "experiments/ablations/mask_ratio.yaml",
    AblationKind.EXEMPLAR_COUNT: "experiments/ablations/exemplar_count.yaml",
    AblationKind.PLUGIN: "experiments/ablations/plugin.yaml",
    AblationKind.GRADIENT_CORRELATION: "experiments/ablations/gradient_correlation.yaml",
    AblationKind.EXEMPLAR_SELECTION: "experiments/ablations/exemplar_selection.yaml",
    AblationKind.CONFLICT_SCORE: "experiments/ablations/conflict_score.yaml",
    AblationKind.ZERO_SHOT_PROXY: "experiments/ablations/zero_shot_proxy.yaml",
}
# a benchmark with ablation files of its own, named as the generic ones (others, and the kinds its folder lacks,
# run the generic file with `benchmark=`)
REPO = Path(__file__).resolve().parents[2]
ABLATION_FOLDERS = {"text": "experiments/text", "lm": "experiments/lm"}


def ablation_command(kind: str, benchmark: str) -> str:
    """The `tatr ablate` command that fills `kind` on `benchmark`, for the "no rows yet" hints."""
    path = ABLATION_FILES[kind]
    own = Path(ABLATION_FOLDERS[benchmark], Path(path).name) if benchmark in ABLATION_FOLDERS else None
    if own is not None and (REPO / own).is_file():
        return f"tatr ablate {own}"
    return f"tatr ablate {path}" + ("" if benchmark == "testbed" else f" benchmark={benchmark}")


@dataclass
class Written:
    folder: Path
    tables: list[str]
    figures: list[str]
    skipped: list[str]


# --- reading -----------------------------------------------------------------------------------------
def load_store(root: str | Path) -> pd.DataFrame:
    """The local store as a DataFrame; a clear error when there is nothing to report."""
    rows = read_store(root)
    if rows.empty:
        raise TatrError(
            f"no results in {store_dir(root)}: run `tatr sweep …` or `tatr ablate experiments/ablations/…` first"
        )
    return rows


def load_published(path: str | Path | None) -> pd.DataFrame | None:
    """The published reference numbers, or None when no file is given or the default one is absent.

    A file that exists but cannot be read as CSV is one line: a silently empty reference column would
    read as "no published numbers"."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, comment="#")
    except OSError as exc:
        raise TatrError(f"{path}: cannot read the published numbers ({exc.strerror or type(exc).__name__})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise TatrError(f"{path}: the published numbers are not a readable CSV ({detail})") from None


def benchmarks_in(rows: pd.DataFrame) -> list[str]:
    return sorted(str(b) for b in rows["benchmark"].dropna().unique())


def select_benchmark(rows: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    found = benchmarks_in(rows)
    chosen = rows[rows["benchmark"].astype(str) == benchmark]
    if chosen.empty:
        raise TatrError(f"no rows for benchmark '{benchmark}' in the store (it has: {', '.join(found) or 'none'})")
    usable = chosen.dropna(subset=["accuracy", "task", "split", "run_id"])
    if usable.empty:
        raise TatrError(f"the store's rows for '{benchmark}' have no accuracy, task, split or run id to report")
    return usable


# --- building -----------------------------------------------------------------------------------------
def build_sections(rows: pd.DataFrame, benchmark: str, published: pd.DataFrame | None) -> list[Section]:
    """Every table and figure of the report for one benchmark's rows (already `selection.prepare`d)."""
    main = T.main_table(rows)
    n_test, n_val = _sizes(rows, "test"), _sizes(rows, "validation")
    subset = ", ".join(F.main_subset(main)) if not main.empty else ""
    sections = [
        Section(
            "Main results",
            [main],
            [
                FigureSpec(
                    "methods_per_task",
                    "Test accuracy per task: the headline methods",
                    lambda: F.methods_per_task(main),
                    f"Test accuracy per task and averaged, for {subset}. "
                    + _bar_caption(main, n_test, "methods_per_task"),
                ),
                FigureSpec(
                    "methods_per_task_all",
                    "Test accuracy per task: every method of the main table",
                    lambda: F.methods_per_task_all(main),
                    "Every row of the main table, in its order. " + _bar_caption(main, n_test, "methods_per_task_all"),
                ),
            ],
            "" if not main.empty else "no test rows of baselines, sweep finals or the plug-in ablation",
        ),
        Section(
            "Sweep: validation accuracy over λ × q",
            [],
            [
                FigureSpec(
                    "sweep_heatmap",
                    "Validation accuracy over λ × (1−q)",
                    lambda: F.sweep_heatmap(rows),
                    "Average validation accuracy (%) of each (λ, q) tried; the star marks the best. "
                    + (f"{n_val} validation examples per task." if n_val else ""),
                )
            ],
            "" if F.sweep_grid(rows) is not None else "no sweep trials and no (q, λ) validation grid in the store",
        ),
    ]
    curves: dict[str, Callable[[], object]] = {
        AblationKind.MASK_RATIO: lambda: F.mask_ratio_curve(rows),
        AblationKind.EXEMPLAR_COUNT: lambda: F.exemplar_curve(rows),
        AblationKind.GRADIENT_CORRELATION: lambda: F.correlation_heatmap(rows),
        AblationKind.EXEMPLAR_SELECTION: lambda: F.selection_curve(rows),
    }
    for kind in ABLATION_KINDS:
        table = T.ablation_table(rows, kind)
        if table.empty and kind not in ABLATION_FILES:
            continue
        hint = f"no rows yet: run `{ablation_command(kind, benchmark)}`" if table.empty else ""
        figure = curves.get(kind, lambda table=table: F.variant_bars(table))
        name = kind.replace("-", "_")
        spec = FigureSpec(name, T.ABLATION_TITLES[kind], figure, _ablation_caption(kind, table, n_test, name))
        sections.append(Section(f"Ablation: {T.ABLATION_TITLES[kind]}", [table], [spec], hint))
    reference = reference_table(rows, published, benchmark)
    why = "" if not reference.empty else f"no published numbers for '{benchmark}' in {DEFAULT_PUBLISHED}"
    sections.append(Section("Reference: published numbers", [reference], [], why))
    shown = [t for s in sections for t in s.tables]
    resolution = resolution_table(rows, shown)
    why = "" if not resolution.empty else "no per-example predictions in the store (it predates them)"
    sections.insert(0, Section("What this benchmark can resolve", [resolution], [], why))
    return sections


def _sizes(rows: pd.DataFrame, split: str) -> str:
    """'160–320' examples per task of a split, from the store's prediction counts ('' in an old store)."""
    sub = rows[(rows["split"] == split) & rows["n_examples"].notna()]
    if sub.empty:
        return ""
    sizes = sub.groupby(sub["task"].astype(str))["n_examples"].max().astype(int)
    return f"{sizes.min()}–{sizes.max()}" if sizes.min() != sizes.max() else str(sizes.min())


def _seeds_text(table: Table) -> str:
    seeds = int(table.seeds.max()) if not table.empty else 0
    return "one seed" if seeds <= 1 else f"the mean over {seeds} seeds"


def _bar_caption(table: Table, n_test: str, name: str) -> str:
    whiskers = (
        "Whiskers: 95% bootstrap intervals (10,000 resamples; the seeds, then the test examples of each task)."
        if not table.low.empty and table.low.notna().any().any()
        else "No whiskers: the store has no per-example predictions for these rows."
    )
    parts = [
        f"Bars: {_seeds_text(table)}" + (f", on {n_test} test examples per task." if n_test else "."),
        whiskers,
        F.axis_note(name) or "The accuracy axis starts at 0.",
        "Colour: the method family; the trust-region variants in the same hue, darker (zero-shot) or hatched"
        " (exemplar).",
    ]
    return " ".join(parts)


def _ablation_caption(kind: str, table: Table, n_test: str, name: str) -> str:
    if kind == AblationKind.GRADIENT_CORRELATION:
        return f"Spearman correlation of the tasks' mean |gradient| at θ_0, {_seeds_text(table)}."
    if kind in (AblationKind.MASK_RATIO, AblationKind.EXEMPLAR_COUNT, AblationKind.EXEMPLAR_SELECTION):
        bands = (
            "Whiskers: 95% bootstrap intervals of each point (the seeds, then the test examples)."
            if not table.low.empty and table.low.notna().any().any()
            else "No intervals: the store has no per-example predictions for these rows."
        )
        n = f" on {n_test} test examples per task" if n_test else ""
        return f"Average test accuracy, {_seeds_text(table)}{n}. {bands} {F.axis_note(name)}".strip()
    return "Average test accuracy per variant. " + _bar_caption(table, n_test, name)


def findings_markdown(sections: list[Section]) -> str:
    """The Findings as Markdown (`tables/findings.md`), the same sentences as the page's opening."""
    found = findings([t for s in sections for t in s.tables])
    lines = ["**Findings** (generated from the store by `tatr report`)", ""]
    for where, sentences in found:
        lines += [f"In the {where}:", "", *(f"- {s}" for s in sentences), ""]
    if not found:
        lines.append("No trust-region comparisons in the store yet.")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    rows: pd.DataFrame,
    benchmark: str,
    out: Path,
    published: pd.DataFrame | None,
    figures: bool = True,
    inputs: Iterable[Path] = (),
    snapshot: bytes | None = None,
) -> Written:
    """Render one benchmark's report into `out/<benchmark>/`, replacing the previous report whole:
    `tables/`, `figures/`, `index.html`, `baselines.csv` (the baselines' test numbers in long form)
    and `rows.jsonl.xz` (`snapshot`: every store row of the benchmark, so each committed number can be
    recomputed from the rows, and `tatr ablate --resume` continues from them on another machine).

    `benchmark` comes from the store's rows, so it must be a safe name and `out/<benchmark>` must
    stay inside `out` (a symlink leading out is refused). `tables/`, `figures/` and `index.html`
    are built as `.tatr-tmp-*` siblings and renamed into place only when all are complete; nothing
    else in the folder is touched, and nothing is deleted that this report did not write. `inputs`
    (the store, the published CSV) must not lie among the outputs.
    """
    final = report_folder(out, benchmark)
    outputs = [final / name for name in REPORT_OUTPUTS]
    _refuse_overwriting(outputs, inputs)
    prepared = prepare(rows)
    sections = build_sections(prepared, benchmark, published)
    written_tables, written_figures, skipped = [], [], []
    long = T.baselines_long(prepared)
    with (
        atomic_dir(outputs[0]) as tables_dir,
        atomic_dir(outputs[1]) as figures_dir,
        atomic_write(outputs[2], suffix=".html") as page,
        atomic_write(outputs[3], suffix=".csv") as baselines_csv,
        atomic_write(outputs[4], suffix=".xz") as rows_file,
    ):
        rows_file.write_bytes(snapshot if snapshot is not None else snapshot_bytes(rows))
        baselines_csv.write_text(long.to_csv(index=False), encoding="utf-8")  # the header alone without baselines
        with writing(outputs[0] / "findings.md"):
            (tables_dir / "findings.md").write_text(findings_markdown(sections), encoding="utf-8")
        shown: dict[int, list[str]] = {}
        for i, section in enumerate(sections):
            for table in section.tables:
                if table.empty:
                    continue
                for ext, text in (("md", table.to_markdown()), ("tex", table.to_latex()), ("csv", table.to_csv())):
                    name = f"{table.name}.{ext}"
                    with writing(outputs[0] / name):  # a full disk names this file, not the innermost writer's
                        (tables_dir / name).write_text(text, encoding="utf-8")
                written_tables.append(table.name)
            nothing = bool(section.missing) and all(t.empty for t in section.tables)
            if nothing:
                skipped.append(f"{section.title}: {section.missing}")
            for spec in section.figures if figures else []:
                fig = spec.build()
                if fig is None:
                    if not nothing:
                        skipped.append(f"figure {spec.name}: no data in the store")
                    continue
                F.save(fig, figures_dir / spec.name)
                written_figures.append(spec.name)
                shown.setdefault(i, []).append(spec.name)
        index = render_index(benchmark, prepared, sections, shown)
        with writing(outputs[2]):
            page.write_text(index, encoding="utf-8")
    return Written(final, written_tables, written_figures, sorted(set(skipped), key=skipped.index))


def report_folder(out: Path, benchmark: object) -> Path:
    """`out/<benchmark>`, refused with one line when the name is unsafe or the folder leads out."""
    return inside(Path(out), safe_name(benchmark, "benchmark"))


def _refuse_overwriting(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """One line when an input of the report (the store, the published CSV) is, or is in, an output."""
    for item in inputs:
        resolved = Path(item).resolve()
        for output in outputs:
            target = output.resolve()
            if same_file(item, output) or target in resolved.parents:
                raise TatrError(f"{item}: an input of the report lies in its output {output}; choose another --out")


def generate(
    root: str | Path = "results",
    out: str | Path | None = None,
    benchmarks: Iterable[str] | None = None,
    published: str | Path | None = DEFAULT_PUBLISHED,
    rows: pd.DataFrame | None = None,
    figures: bool = True,
) -> list[Written]:
    """Write a report for each benchmark (all in the store by default); `rows` replaces the store."""
    chosen = [safe_name(b, "benchmark") for b in benchmarks] if benchmarks else None
    rows = load_store(root) if rows is None else rows
    if rows.empty:
        raise TatrError("no results to report")
    chosen = chosen or [safe_name(b, "benchmark in the store") for b in benchmarks_in(rows)]
    if not chosen:
        raise TatrError("the store's rows name no benchmark")
    reference = load_published(published)
    target = Path(out) if out is not None else Path(root)
    inputs = [store_dir(root)] + ([Path(published)] if published is not None else [])
    for b in chosen:  # every folder is checked before any is written
        _refuse_overwriting([report_folder(target, b) / n for n in REPORT_OUTPUTS], inputs)
    return [
        write_report(select_benchmark(rows, b), b, target, reference, figures, inputs, snapshot_of(rows, b))
        for b in chosen
    ]


def snapshot_of(rows: pd.DataFrame, benchmark: str) -> bytes:
    """Every row of `benchmark` as `rows.jsonl.xz` holds it, the rows the report leaves out included."""
    return snapshot_bytes(rows[rows["benchmark"].astype(str) == benchmark])
