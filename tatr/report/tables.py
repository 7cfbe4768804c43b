"""Tables from the results store: pure pandas in, `Table` out (rendered by `tatr.report.render`).

Why a module of its own: the report, the notebooks and the tests all need the *same* numbers, and
the numbers must not depend on how they are drawn. Everything here is a function of the store's
rows only (no clock, no environment), so the same store always gives the same tables. Which rows a
table uses (the latest run per configuration and seed) is `tatr.report.selection`; what rows are
called is `tatr.report.labels`.

A run's average is the mean over its tasks; across seeds, tables show mean ± sample std (ddof=1) of
the per-seed values. One seed: the mean alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from tatr.core.components import COMPONENT_ORDER, components_label
from tatr.core.methods import METHODS, get_method
from tatr.report import open_checks
from tatr.report.comparisons import (
    METHOD_NOTE,
    Comparison,
    against,
    against_ta,
    compare,
    exemplar_label,
    level_intervals,
    n_comparisons,
    without_tr,
    zero_shot_label,
)
from tatr.report.labels import ABLATION_TITLES, drop_text, label_rank, method_rank, missing
from tatr.report.render import Table, empty_table
from tatr.report.selection import (
    AVERAGE,
    NORMALIZED,
    SOURCES,
    ablation_rows,
    latest_runs,
    main_rows,
    main_source,
    per_seed,
    prefer_seeded,
    prepare,
    summarize,
    task_order,
)
from tatr.store.schema import PAIR_SEPARATOR, AblationKind

__all__ = [  # imported here for notebooks and tests, beside the table builders defined below
    "ABLATION_TITLES",
    "AVERAGE",
    "NORMALIZED",
    "Table",
    "prepare",
    "summarize",
]


# --- statistics ------------------------------------------------------------------------------------
def _plain(v: float) -> str:
    return f"{v:g}"


def _three_decimals(v: float) -> str:
    """A learned λ's mean (in [0, 1]): three decimals say what it is; a grid value is shown whole."""
    return f"{v:.3f}"


def _learned(methods: pd.Series) -> bool:
    """Whether a variant's λ were learned (AdaMerging) rather than chosen from a grid."""
    return any(m in METHODS and get_method(m).learned for m in methods.dropna().unique())


def _values(series: pd.Series, fmt: Callable[[float], str] = _plain) -> str:
    """Distinct numbers of a column as 'a/b' (the hyperparameter each seed's tuning chose)."""
    vals = sorted({float(v) for v in series.dropna()})
    return "/".join(fmt(v) for v in vals) if vals else "–"


# --- the tables -------------------------------------------------------------------------------------
def main_table(df: pd.DataFrame) -> Table:
    """The paper layout: rows methods, columns the tasks, the average and the normalized average.

    Each method's row comes from one source, the first that has it among sweep finals, baselines,
    the plug-in and the trust-region ablation (tuned differently, so never mixed), then its latest
    run per seed; seed-less rows only where the method has no seeded ones (`prefer_seeded`).
    """
    rows = main_rows(df)
    rows = rows.assign(source=main_source(rows))
    rows = rows[rows["source"] == rows.groupby("label")["source"].transform("min")]
    rows = latest_runs(prefer_seeded(rows), ["label", "seed_key"])
    tasks = task_order(rows)
    if rows.empty:
        return empty_table("main", "Test accuracy (%) of merged models")
    wide = per_seed(rows, ["label"], tasks)
    ranks = rows.drop_duplicates("label").set_index("label")
    order = sorted(
        ranks.index, key=lambda lbl: (method_rank(ranks.at[lbl, "method"], ranks.at[lbl, "trust_region"]), lbl)
    )
    mean, std, seeds = summarize(wide, "label", [*tasks, AVERAGE, NORMALIZED], order)
    title = "Test accuracy (%) per task; Normalized: accuracy ÷ the task's fine-tuned model (%)"
    used = rows.drop_duplicates("label").set_index("label")["source"].reindex(mean.index)
    origin = "; ".join(
        f"{SOURCES[src]}: {', '.join(str(lbl) for lbl in used.index[used == src])}" for src in sorted(set(used))
    )
    table = Table("main", title, mean, std, seeds, note=f"Rows from {origin}. {_seed_note(seeds)}".strip())
    return with_statistics(table, rows, "label", tasks, _method_blocks(rows, "label"))


def _method_blocks(rows: pd.DataFrame, key: str) -> dict[str, dict[str, str]]:
    """A method with the trust region against itself without; every merge against TA."""
    return {"vs no-TR": without_tr(rows, key), "vs TA": against_ta(rows, key)}


def with_statistics(
    table: Table, rows: pd.DataFrame, key: str, tasks: Sequence[str], blocks: dict[str, dict[str, str]]
) -> Table:
    """`table` with the intervals of its means and the paired comparisons of its rows (`rows`: the
    selected test rows it was built from, `key` the column naming its rows)."""
    shown = set(map(str, table.mean.index))
    blocks = {n: {r: ref for r, ref in refs.items() if r in shown and ref in shown} for n, refs in blocks.items()}
    blocks = {n: refs for n, refs in blocks.items() if refs}
    table.low, table.high = level_intervals(rows, key, table.mean.index, tasks, AVERAGE)
    if blocks:
        table.comparisons = compare(rows, key, blocks)
        table.note = f"{table.note} {METHOD_NOTE.format(m=n_comparisons(table.comparisons))}".strip()
    return table


def _seed_note(seeds: pd.Series) -> str:
    several = int((seeds > 1).sum()) if len(seeds) else 0
    return "Mean ± std over seeds (exemplar draws) where a row has several." if several else ""


def variant_key(df: pd.DataFrame, kind: str) -> pd.Series:
    """The row label an ablation compares: the components, the method, or the trust-region mode."""
    if kind == AblationKind.COMPONENTS:
        lam_neg = df["lam_neg"] if "lam_neg" in df else pd.Series([None] * len(df), index=df.index)
        label = pd.Series(
            [components_label(c, n) for c, n in zip(df["components"], lam_neg, strict=True)], index=df.index
        )
        if df["model_key"].nunique() > 1:
            label = label + df["model"].map(lambda m: "" if missing(m) else f" [{m}]")
        return label
    return df["label"]


def variant_table(df: pd.DataFrame, kind: str) -> Table:
    """Ablations that compare a few variants (components, trust region, sensitivity, plug-in)."""
    title = ABLATION_TITLES[kind]
    rows = ablation_rows(df, kind)
    header = "Components" if kind == AblationKind.COMPONENTS else "Method"
    if rows.empty:
        return empty_table(f"ablation_{_stem(kind)}", title, header)
    rows = rows.assign(variant=variant_key(rows, kind))
    rows = latest_runs(rows, ["variant", "seed_key"])
    tasks = task_order(rows)
    wide = per_seed(rows, ["variant"], tasks)
    if kind == AblationKind.COMPONENTS:
        order = [c for c in COMPONENT_ORDER if c in set(wide["variant"])]
        order += sorted(set(wide["variant"]) - set(order))
    else:
        first = rows.drop_duplicates("variant").set_index("variant")
        order = sorted(first.index, key=lambda v: (method_rank(first.at[v, "method"], first.at[v, "trust_region"]), v))
    mean, std, seeds = summarize(wide, "variant", [*tasks, AVERAGE, NORMALIZED], order)
    info = pd.DataFrame(index=mean.index)
    by_variant = rows.groupby("variant", sort=False)
    learned = [_learned(by_variant.get_group(v)["method"]) for v in mean.index]
    info["λ"] = [
        _values(by_variant.get_group(v)["lam"], _three_decimals if ada else _plain)
        for v, ada in zip(mean.index, learned, strict=True)
    ]
    tuned_q = [_values(by_variant.get_group(v)["q"]) for v in mean.index]
    if any(q != "–" for q in tuned_q):
        info["q"] = tuned_q
    note = "λ (and q) chosen on the validation split per variant and seed; test accuracy (%). "
    if any(learned):
        note += "AdaMerging learns its λ: the λ shown is the mean of the learned coefficients. "
    note += _seed_note(seeds)
    table = Table(f"ablation_{_stem(kind)}", title, mean, std, seeds, info, header, note=note.strip())
    return with_statistics(table, rows, "variant", tasks, _variant_blocks(rows, kind, [str(v) for v in mean.index]))


def _variant_blocks(rows: pd.DataFrame, kind: str, labels: list[str]) -> dict[str, dict[str, str]]:
    """Each ablation variant against the variant the ablation starts from: every component choice
    against all components (plain merging), each sensitivity against the full exemplar one, and in the
    method ablations a method with the trust region against itself without, and against TA."""
    if kind == AblationKind.COMPONENTS:
        return {"vs all": against(labels, "all")}
    if kind in (AblationKind.SENSITIVITY, AblationKind.CONFLICT_SCORE):
        return {"vs exemplar": against(labels, exemplar_label())}
    if kind == AblationKind.ZERO_SHOT_PROXY:
        return {"vs zero-shot": against(labels, zero_shot_label())}
    return _method_blocks(rows, "variant")


def curve_rows(df: pd.DataFrame, kind: str, x: str) -> pd.DataFrame:
    """The test rows a curve shows: the latest run per (series label, x, seed), with the x column."""
    rows = ablation_rows(df, kind)
    if rows.empty:
        return rows
    rows = rows.assign(**{x: _x_value(rows, x)})
    return latest_runs(rows, ["label", x, "seed_key"])


def curve_frame(df: pd.DataFrame, kind: str, x: str) -> pd.DataFrame:
    """Per (series label, x, seed): the average and normalized average test accuracy."""
    rows = curve_rows(df, kind, x)
    if rows.empty:
        return pd.DataFrame(columns=["label", x, "seed_key", AVERAGE, NORMALIZED])
    return per_seed(rows, ["label", x], task_order(rows))


def _x_value(rows: pd.DataFrame, x: str) -> pd.Series:
    if x == "drop":
        return (1.0 - rows["q"]).round(12)
    return rows[x]


def curve_table(df: pd.DataFrame, kind: str, x: str, x_header: str, fmt: Callable[[float], str]) -> Table:
    """Mask ratio and exemplar count: rows the x values, one column per method (average accuracy)."""
    title = ABLATION_TITLES[kind]
    wide = curve_frame(df, kind, x)
    if wide.empty:
        return empty_table(f"ablation_{_stem(kind)}", title, x_header)
    wide = wide.assign(row=wide[x].map(fmt))
    labels = list(dict.fromkeys(wide.sort_values("label", key=lambda s: s.map(label_rank))["label"]))
    xs = sorted(wide[x].unique())
    order = [fmt(v) for v in xs]
    means, stds, seeds = [], [], []
    for label in labels:
        sub = wide[wide["label"] == label]
        m, s, n = summarize(sub, "row", [AVERAGE], order)
        means.append(m.rename(columns={AVERAGE: label}))
        stds.append(s.rename(columns={AVERAGE: label}))
        seeds.append(n)
    mean = pd.concat(means, axis=1).reindex(order)
    std = pd.concat(stds, axis=1).reindex(order)
    seed_count = pd.concat(seeds, axis=1).max(axis=1).reindex(order).fillna(0).astype(int)
    note = "Average test accuracy (%) over the tasks; λ chosen on validation at each point. " + _seed_note(seed_count)
    table = Table(f"ablation_{_stem(kind)}", title, mean, std, seed_count, row_header=x_header, note=note.strip())
    reference = 0.0 if kind == AblationKind.MASK_RATIO else max(xs)  # q = 1 (no drop); the most exemplars
    unit = " dropped" if kind == AblationKind.MASK_RATIO else " exemplars"
    rows = curve_rows(df, kind, x).assign(row=lambda r: r[x].map(fmt))
    return _curve_statistics(table, rows, fmt(reference), unit)


_POINT = "\x00"  # joins a series label and a point's x text into one row key for `compare`


def _curve_statistics(table: Table, rows: pd.DataFrame, reference: str, unit: str) -> Table:
    """Each series' point against the same series at the reference x (one Holm family for the table),
    and the interval of each point's average (`low`/`high`: rows the x texts, columns the series)."""
    rows = rows.assign(point=rows["label"].astype(str) + _POINT + rows["row"])
    labels = [str(c) for c in table.mean.columns]
    blocks = {
        f"{label} vs {reference}{unit}": {
            f"{label}{_POINT}{x}": f"{label}{_POINT}{reference}"
            for x in map(str, table.mean.index)
            if x != reference and not pd.isna(table.mean.at[x, label])
        }
        for label in labels
        if reference in table.mean.index and not pd.isna(table.mean.at[reference, label])
    }
    blocks = {n: refs for n, refs in blocks.items() if refs}
    points = sorted(set(rows["point"]))
    low, high = level_intervals(rows, "point", points, task_order(rows), AVERAGE)
    table.low = pd.DataFrame(index=table.mean.index, columns=labels, dtype=float)
    table.high = table.low.copy()
    for point in points:
        label, x = point.split(_POINT, 1)
        if label in labels and x in table.low.index:
            table.low.at[x, label], table.high.at[x, label] = low.at[point, AVERAGE], high.at[point, AVERAGE]
    if blocks:
        compared = compare(rows, "point", blocks)
        table.comparisons = [Comparison(c.name, _by_x(c.frame), c.family) for c in compared]
        table.note = f"{table.note} {METHOD_NOTE.format(m=n_comparisons(table.comparisons))}".strip()
    return table


def _by_x(frame: pd.DataFrame) -> pd.DataFrame:
    """A curve comparison's rows keyed by the x text alone (the block names the series)."""
    out = frame.copy()
    out.index = [str(i).split(_POINT, 1)[1] for i in out.index]
    out["reference"] = out["reference"].map(lambda r: str(r).split(_POINT, 1)[1])
    return out


def _stem(kind: str) -> str:
    return kind.replace("-", "_")


def correlation_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Symmetric task × task matrices (mean, std over seeds) of Spearman ρ, and the seed count."""
    rows = ablation_rows(df, AblationKind.GRADIENT_CORRELATION, split="train")
    rows = rows[rows["task"].astype(str).str.contains(PAIR_SEPARATOR, regex=False)]
    if rows.empty:
        return pd.DataFrame(), pd.DataFrame(), 0
    rows = latest_runs(rows.assign(pair=rows["task"]), ["pair", "seed_key"])
    pairs = rows["task"].astype(str).str.split(PAIR_SEPARATOR, n=1, expand=True)
    rows = rows.assign(a=pairs[0], b=pairs[1])
    tasks = list(
        dict.fromkeys([*rows.sort_values(["run_time", "run_id"], kind="stable")[["a", "b"]].to_numpy().ravel()])
    )
    stats = rows.groupby(["a", "b"], sort=False)["accuracy"].agg(["mean", "std"])
    mean = pd.DataFrame(np.eye(len(tasks)), index=tasks, columns=tasks)
    std = pd.DataFrame(np.zeros((len(tasks), len(tasks))), index=tasks, columns=tasks)
    for (a, b), (m, s) in stats.iterrows():
        mean.at[a, b] = mean.at[b, a] = m
        std.at[a, b] = std.at[b, a] = s
    return mean, std, int(rows["seed_key"].nunique())


def correlation_table(df: pd.DataFrame) -> Table:
    title = ABLATION_TITLES[AblationKind.GRADIENT_CORRELATION]
    mean, std, seeds = correlation_frame(df)
    if mean.empty:
        return empty_table(f"ablation_{_stem(AblationKind.GRADIENT_CORRELATION)}", title, "Task")
    count = pd.Series(seeds, index=mean.index)
    note = "Rank correlation over all merged coordinates (or a seeded subsample on large models). "
    return Table(
        f"ablation_{_stem(AblationKind.GRADIENT_CORRELATION)}",
        title,
        mean,
        std,
        count,
        row_header="Task",
        digits=2,
        note=(note + _seed_note(count)).strip(),
    )


def ablation_table(df: pd.DataFrame, kind: str) -> Table:
    """The table of one ablation kind, empty when the store has none (so callers can say so): a curve
    for mask ratio and exemplar count, the correlation matrix for gradient correlation, variants side
    by side for the others (`tatr.report.open_checks`: exemplar selection's curve pairs, the zero-shot
    proxies' share of the exemplar gap)."""
    if kind == AblationKind.MASK_RATIO:
        return curve_table(df, kind, "drop", "Dropped 1−q", drop_text)
    if kind == AblationKind.EXEMPLAR_COUNT:
        return curve_table(df, kind, "exemplars", "Exemplars per task", lambda v: f"{int(v)}")
    if kind == AblationKind.GRADIENT_CORRELATION:
        return correlation_table(df)
    if kind == AblationKind.EXEMPLAR_SELECTION:
        return open_checks.selection_table(df)
    if kind == AblationKind.ZERO_SHOT_PROXY:
        return open_checks.with_gap_closed(variant_table(df, kind), df)
    return variant_table(df, kind)


BASELINES_LONG = (
    "seed",
    "row",
    "method",
    "trust_region",
    "q",
    "lam",
    "task",
    "test_accuracy",
    "test_normalized_accuracy",
)


def baselines_long(df: pd.DataFrame) -> pd.DataFrame:
    """The baselines' test numbers in long form, one line per (seed, row, task), `row` naming the method: the
    `baselines.csv` beside a benchmark's report, for a reader's own statistics (the tables hold mean ± std).

    Rows: Pretrained and Individual (`job_type="baseline"`, of the seeds the baselines file ran), and the
    baselines file's tuned merges, the latest run of each (row, seed)."""
    tuned = ablation_rows(df, AblationKind.BASELINES)
    if tuned.empty:
        return pd.DataFrame(columns=list(BASELINES_LONG))
    test = df[df["split"] == "test"]
    # the reference models of the baselines' seeds, seed-less ones only where a model has none (`prefer_seeded`)
    refs = test[(test["job_type"] == "baseline") & test["seed_key"].isin({*tuned["seed_key"], -1})]
    refs = prefer_seeded(refs)
    rows = latest_runs(pd.concat([refs, tuned]), ["label", "seed_key"])
    out = pd.DataFrame(
        {
            "seed": rows["seed"].astype("Int64"),
            "row": rows["label"],
            "method": rows["method"].where(rows["job_type"] != "baseline"),
            "trust_region": rows["trust_region"].where(rows["job_type"] != "baseline"),
            "q": rows["q"],
            "lam": rows["lam"],
            "task": rows["task"],
            "test_accuracy": rows["accuracy"].round(3),
            "test_normalized_accuracy": rows["normalized_accuracy"].round(3),
        }
    )
    order = {label: i for i, label in enumerate(dict.fromkeys(["Pretrained", "Individual", *tuned["label"]]))}
    tasks = {task: i for i, task in enumerate(task_order(rows))}
    keys = out.assign(_r=out["row"].map(order), _t=out["task"].map(tasks))
    keys = keys.sort_values(["seed", "_r", "_t"], kind="stable", na_position="first")
    return keys.drop(columns=["_r", "_t"]).reset_index(drop=True)
