"""`tatr report`: the results store → tables, figures and one static `index.html` per benchmark.

Why it reads only the store (or W&B's mirror of it): the store is the source of truth, so a report
is a pure function of its rows. Nothing here reads the clock or the machine, so the same store
gives byte-identical files, and a diff of `results/<benchmark>/` means the numbers moved.

Output (under `<out>/<benchmark>/`, default `results/<benchmark>/`):
    tables/<name>.{md,tex,csv}   the paper-layout table, each ablation, the published reference
    figures/<name>.{png,pdf}     λ × q heatmap, mask-ratio curve, component bars, exemplar curve, …
    index.html                   everything above on one page that works offline
The `tables/` and `figures/` folders and `index.html` are built in a temporary folder and moved
into place only once complete; other files in the benchmark folder are left alone.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tatr import figures as F
from tatr import tables as T
from tatr.errors import TatrError
from tatr.store import COLUMNS, read_store, store_dir

DEFAULT_PUBLISHED = Path("results/reference/published.csv")

# which experiment file fills each ablation, for the "missing" hints
ABLATION_FILES = {
    T.COMPONENTS: "experiments/ablations/components.yaml",
    T.TRUST_REGION: "experiments/ablations/trust_region.yaml",
    T.SENSITIVITY: "experiments/ablations/sensitivity.yaml",
    T.MASK_RATIO: "experiments/ablations/mask_ratio.yaml",
    T.EXEMPLAR_COUNT: "experiments/ablations/exemplar_count.yaml",
    T.PLUGIN: "experiments/ablations/plugin.yaml",
    T.GRADIENT_CORRELATION: "experiments/ablations/gradient_correlation.yaml",
}


@dataclass
class FigureSpec:
    name: str
    title: str
    build: Callable[[], object]  # returns a Figure or None


@dataclass
class Section:
    """One block of the page: a heading, its tables and figures, or why it is missing."""

    title: str
    tables: list[T.Table] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    missing: str = ""


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
    """The published reference numbers, or None when the file is absent or unreadable as CSV."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, comment="#")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None


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
    """Every table and figure of the report for one benchmark's rows (already `tables.prepare`d)."""
    main = T.main_table(rows)
    sections = [
        Section(
            "Main results",
            [main],
            [FigureSpec("methods_per_task", "Test accuracy per task and method", lambda: F.methods_per_task(main))],
            "" if not main.empty else "no test rows of baselines, sweep finals or the plug-in ablation",
        ),
        Section(
            "Sweep: validation accuracy over λ × q",
            [],
            [FigureSpec("sweep_heatmap", "Validation accuracy over λ × (1−q)", lambda: F.sweep_heatmap(rows))],
            "" if F.sweep_grid(rows) is not None else "no sweep trials and no (q, λ) validation grid in the store",
        ),
    ]
    ablation = dict(zip(T.ABLATIONS, T.ablation_tables(rows), strict=True))
    figure_of: dict[str, Callable[[], object]] = {
        T.COMPONENTS: lambda: F.variant_bars(ablation[T.COMPONENTS]),
        T.TRUST_REGION: lambda: F.variant_bars(ablation[T.TRUST_REGION]),
        T.SENSITIVITY: lambda: F.variant_bars(ablation[T.SENSITIVITY]),
        T.MASK_RATIO: lambda: F.mask_ratio_curve(rows),
        T.EXEMPLAR_COUNT: lambda: F.exemplar_curve(rows),
        T.PLUGIN: lambda: F.variant_bars(ablation[T.PLUGIN]),
        T.GRADIENT_CORRELATION: lambda: F.correlation_heatmap(rows),
    }
    for name in T.ABLATIONS:
        table = ablation[name]
        hint = f"no rows yet: run `tatr ablate {ABLATION_FILES[name]}`" if table.empty else ""
        spec = FigureSpec(name.replace("-", "_"), T.ABLATION_TITLES[name], figure_of[name])
        sections.append(Section(f"Ablation: {T.ABLATION_TITLES[name]}", [table], [spec], hint))
    reference = T.reference_table(rows, published, benchmark)
    why = "" if not reference.empty else f"no published numbers for '{benchmark}' in {DEFAULT_PUBLISHED}"
    sections.append(Section("Reference: published numbers", [reference], [], why))
    return sections


def write_report(
    rows: pd.DataFrame, benchmark: str, out: Path, published: pd.DataFrame | None, figures: bool = True
) -> Written:
    """Render one benchmark's report into `out/<benchmark>/`, replacing the previous report whole."""
    prepared = T.prepare(rows)
    sections = build_sections(prepared, benchmark, published)
    final = out / benchmark
    final.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=final))
    try:
        written_tables, written_figures, skipped = [], [], []
        (tmp / "tables").mkdir()
        (tmp / "figures").mkdir()
        shown: dict[int, list[str]] = {}
        for i, section in enumerate(sections):
            for table in section.tables:
                if table.empty:
                    continue
                for ext, text in (("md", table.to_markdown()), ("tex", table.to_latex()), ("csv", table.to_csv())):
                    (tmp / "tables" / f"{table.name}.{ext}").write_text(text, encoding="utf-8")
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
                F.save(fig, tmp / "figures" / spec.name)
                written_figures.append(spec.name)
                shown.setdefault(i, []).append(spec.name)
        page = render_index(benchmark, prepared, sections, shown)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Written(final, written_tables, written_figures, sorted(set(skipped), key=skipped.index))


def _install(tmp: Path, final: Path) -> None:
    """Swap the new `tables/`, `figures/` and `index.html` in; the old ones go only after."""
    for name in ("tables", "figures"):
        target = final / name
        old = None
        if target.exists():
            old = final / f".old-{name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp / name, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp / "index.html", final / "index.html")


def generate(
    root: str | Path = "results",
    out: str | Path | None = None,
    benchmarks: Iterable[str] | None = None,
    published: str | Path | None = DEFAULT_PUBLISHED,
    rows: pd.DataFrame | None = None,
    figures: bool = True,
) -> list[Written]:
    """Write a report for each benchmark (all in the store by default); `rows` replaces the store."""
    rows = load_store(root) if rows is None else rows
    if rows.empty:
        raise TatrError("no results to report")
    chosen = list(benchmarks) if benchmarks else benchmarks_in(rows)
    if not chosen:
        raise TatrError("the store's rows name no benchmark")
    reference = load_published(published)
    target = Path(out) if out is not None else Path(root)
    return [write_report(select_benchmark(rows, b), b, target, reference, figures) for b in chosen]


# --- the page ------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.85em}caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{padding:.25em .6em;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
thead th{border-bottom:2px solid #444}tbody th{text-align:left}
.fig{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}.fig img{width:480px;max-width:100%;
border:1px solid #eee}.fig p,.note,.links{font-size:.8em;color:#555}.missing{color:#a33}
.scroll{overflow-x:auto}
"""


def render_index(benchmark: str, rows: pd.DataFrame, sections: list[Section], shown: dict[int, list[str]]) -> str:
    """One self-contained page; images and downloads are relative links into the same folder."""
    e = html.escape
    runs = rows["run_id"].nunique()
    commits = sorted(str(c) for c in rows["git_commit"].dropna().unique())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tatr report: {e(benchmark)}</title><style>{_CSS}</style></head><body>",
        f"<h1>tatr report: {e(benchmark)}</h1>",
        f"<p>{len(rows)} rows from {runs} runs of the results store"
        + (f"; code commits {e(', '.join(commits))}" if commits else "")
        + ". Regenerate with <code>tatr report</code>.</p>",
    ]
    for i, section in enumerate(sections):
        parts.append(f"<h2>{e(section.title)}</h2>")
        has_table = False
        for table in section.tables:
            if table.empty:
                continue
            has_table = True
            parts.append(f"<div class='scroll'>{table.to_html()}</div>")
            links = " · ".join(f"<a href='tables/{e(table.name)}.{x}'>{x.upper()}</a>" for x in ("csv", "tex", "md"))
            parts.append(f"<p class='links'>Download: {links}</p>")
        for name in shown.get(i, []):
            spec = next(s for s in section.figures if s.name == name)
            parts.append(
                f"<div class='fig'><img src='figures/{e(name)}.png' alt='{e(spec.title)}'>"
                f"<p>{e(spec.title)} (<a href='figures/{e(name)}.pdf'>PDF</a>)</p></div>"
            )
        if not has_table and not shown.get(i) and section.missing:
            parts.append(f"<p class='missing'>Not available: {e(section.missing)}.</p>")
        elif not shown.get(i) and section.figures and not has_table:
            parts.append("<p class='missing'>Not available: no data for this figure in the store.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --- W&B ---------------------------------------------------------------------------------------------
def rows_from_wandb(path: str, api: object | None = None) -> pd.DataFrame:
    """Rebuild store rows from the runs of W&B project `ENTITY/PROJECT` (see `wandb_run_rows`)."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise TatrError(f"--from-wandb wants ENTITY/PROJECT, got '{path}'")
    if api is None:
        try:
            import wandb
        except ImportError:
            raise TatrError("--from-wandb needs the wandb package (pip install wandb)") from None
        try:
            api = wandb.Api(timeout=60)
        except Exception as exc:  # wandb raises its own types for auth/network problems
            raise TatrError(f"cannot reach W&B ({type(exc).__name__}: {exc}); run `wandb login` first") from None
    try:
        runs = list(api.runs(path))  # type: ignore[attr-defined]
    except Exception as exc:
        raise TatrError(f"cannot list the runs of W&B project '{path}' ({type(exc).__name__}: {exc})") from None
    with tempfile.TemporaryDirectory(prefix="tatr-wandb-") as tmp:
        records = [row for run in runs for row in wandb_run_rows(run, Path(tmp))]
    if not records:
        raise TatrError(f"W&B project '{path}' has no runs with per-task accuracies (<split>/accuracy/<task>)")
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


_GRADIENT_MODES = ("exemplar", "gradient-only")


def wandb_run_rows(run: object, scratch: Path) -> list[dict]:
    """The store rows one W&B run mirrors (the layout `tatr.tracking` logs).

    The run's config is the resolved experiment (`merge.*`, `exemplars.*`, `seed`, `benchmark`,
    `name`) plus `study`, `trial`, `config_hash` and, for ablations, `experiment`; its summary has
    `<split>/accuracy/<task>`, and normalized accuracies either as `<split>/normalized_accuracy/<task>`
    or in the logged `accuracy_table` (fetched from the run's files when needed).
    """
    summary = _as_dict(getattr(run, "summary", {}))
    config = _flatten(_as_dict(getattr(run, "config", {})))
    accuracy: dict[tuple[str, str], float] = {}
    normalized: dict[tuple[str, str], float] = {}
    for key, value in summary.items():
        parts = str(key).split("/")
        if len(parts) == 3 and parts[1] == "accuracy":
            accuracy[(parts[0], parts[2])] = value
        elif len(parts) == 3 and parts[1] == "normalized_accuracy":
            normalized[(parts[0], parts[2])] = value
    if not accuracy:
        return []
    if len(normalized) < len(accuracy):
        normalized = {**_table_normalized(run, summary.get("accuracy_table"), scratch), **normalized}
    merge = {k.removeprefix("merge."): v for k, v in config.items() if k.startswith("merge.")}
    mode, method = merge.get("trust_region"), merge.get("method")
    components = merge.get("components")
    uses_exemplars = mode in _GRADIENT_MODES or components is not None
    timing = {"merge_seconds": summary.get("time/merge_seconds"), "eval_seconds": summary.get("time/eval_seconds")}
    base = {
        "run_id": getattr(run, "id", None) or getattr(run, "name", None),
        "study": config.get("study", getattr(run, "group", None)),
        "trial": config.get("trial"),
        "job_type": getattr(run, "job_type", None),
        "experiment": config.get("experiment", config.get("name")),
        "benchmark": config.get("benchmark"),
        "model": config.get("model", config.get("suite.model")),
        "method": method,
        "trust_region": mode,
        "q": None if mode == "off" else merge.get("q"),
        "lam": merge.get("lam"),
        "ties_k": merge.get("ties_k") if method == "ties" else None,
        "components": list(components) if components is not None else None,
        "exemplars": config.get("exemplars.n") if uses_exemplars else None,
        "seed": config.get("seed"),
        "git_commit": getattr(run, "commit", None),
        "config_hash": config.get("config_hash"),
        "timestamp": _epoch(getattr(run, "created_at", None)),
        **timing,
    }
    return [
        {**base, "split": split, "task": task, "accuracy": acc, "normalized_accuracy": normalized.get((split, task))}
        for (split, task), acc in accuracy.items()
    ]


def _table_normalized(run: object, ref: object, scratch: Path) -> dict[tuple[str, str], float]:
    """(split, task) → normalized accuracy from a logged `accuracy_table` (a table-file reference)."""
    import json

    ref = _as_dict(ref) if ref is not None else {}
    path = ref.get("path")
    if not path or not hasattr(run, "file"):
        return {}
    try:
        folder = scratch / str(getattr(run, "id", "run"))
        run.file(path).download(root=str(folder), replace=True)  # type: ignore[attr-defined]
        table = json.loads((folder / path).read_text())
    except Exception:  # a missing or unreadable file leaves the column empty, as the store allows
        return {}
    cols = table.get("columns", [])
    if not {"task", "split", "normalized_accuracy"} <= set(cols):
        return {}
    at = {c: i for i, c in enumerate(cols)}
    return {(r[at["split"]], r[at["task"]]): r[at["normalized_accuracy"]] for r in table.get("data", [])}


def _epoch(value: object) -> float | None:
    """W&B's `created_at` (ISO text, UTC) as seconds since the epoch, for "latest run wins"."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    stamp = pd.Timestamp(str(value))
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.timestamp()


def _as_dict(obj: object) -> dict:
    if isinstance(obj, dict):
        return obj
    for attr in ("_json_dict", "as_dict"):
        value = getattr(obj, attr, None)
        if callable(value):
            value = value()
        if isinstance(value, dict):
            return value
    try:
        return dict(obj)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return {}


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"value"}:
            value = value["value"]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
