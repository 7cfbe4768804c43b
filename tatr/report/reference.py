"""The comparison with published numbers (`results/reference/published.csv`): our main table's average
beside each method's published one.

Why a module of its own: it reads a file someone else wrote (names, models, and whose fine-tuned
checkpoints a number used), and it must never compare across checkpoints: FusionBench's re-trained
encoders are another experiment than the task_vectors release the papers used. `tatr.report.labels`
owns the names (`reference_label`, `checkpoints_key`); this module owns the matching.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tatr.report.labels import DEFAULT_CHECKPOINTS, checkpoints_key, model_key, reference_label
from tatr.report.render import Table, empty_table
from tatr.report.selection import AVERAGE, main_rows
from tatr.report.tables import main_table

PAPER_BENCHMARK = "clip8"  # the benchmark the published numbers are about, unless the CSV says


def reference_table(
    df: pd.DataFrame, published: pd.DataFrame | None, benchmark: str, checkpoints: str | None = None
) -> Table:
    """Our average test accuracy next to the published one, per method (and model where given).

    Numbers on different fine-tuned checkpoints are never compared (FusionBench's re-trained encoders
    are not task_vectors'): where the CSV has a `checkpoints` column, only the rows on one kind are kept,
    `checkpoints` if given, else the store's own `checkpoints` column where it names one kind, else
    `DEFAULT_CHECKPOINTS` (task_vectors', which clip8's paper setups load). A row with no value there
    is the default kind's (the file's convention before the column); a CSV without the column is one kind.
    """

    title = "Average test accuracy (%): this harness vs the published numbers"
    empty = empty_table("reference", title)
    if published is None or published.empty:
        return empty
    pub = published.copy()
    pub.columns = [str(c).strip().lower() for c in pub.columns]
    if "benchmark" in pub.columns:
        pub = pub[pub["benchmark"].astype(str) == benchmark]
    elif benchmark != PAPER_BENCHMARK:
        return empty  # numbers without a benchmark column are the paper's (CLIP, 8 tasks)
    if "accuracy" not in pub.columns and "average" in pub.columns:
        pub = pub.rename(columns={"average": "accuracy"})  # one row per method, the average only
    if pub.empty or "method" not in pub.columns or "accuracy" not in pub.columns:
        return empty
    kind, left_out = None, ""
    if "checkpoints" in pub.columns:  # one kind of checkpoints only: never across them
        kind = checkpoints_key(checkpoints)
        if kind is None and "checkpoints" in df.columns:
            stored = {k for k in df["checkpoints"].map(checkpoints_key) if k is not None}
            if len(stored) > 1:
                return empty  # a store on several kinds: no single set of published rows to compare with
            kind = stored.pop() if stored else None
        kind = kind or DEFAULT_CHECKPOINTS
        kinds = pub["checkpoints"].map(checkpoints_key).fillna(DEFAULT_CHECKPOINTS)
        others = sorted(set(kinds[kinds != kind]))
        left_out = f" Other checkpoints' published rows ({', '.join(others)}) are left out." if others else ""
        pub = pub[kinds == kind]
    task_col = "task" if "task" in pub.columns else None
    if task_col is not None:
        pub = pub[pub[task_col].astype(str).str.lower().isin(["average", "avg", "mean"])]
    pub = pub.assign(
        method=pub["method"].map(reference_label), accuracy=pd.to_numeric(pub["accuracy"], errors="coerce")
    )
    pub = pub.dropna(subset=["accuracy"])
    model = pub["model"].astype(str) if "model" in pub.columns else pd.Series("", index=pub.index)
    pub = pub.assign(model=model, label=(model + " " + pub["method"]).str.strip())
    ours = main_table(df)
    main = main_rows(df)
    mine_models = {k for k in main["model_key"].dropna().unique()}
    if mine_models:  # compare only the models this store has results for
        pub = pub[pub["model"].map(model_key).isin(mine_models)]
    several = len(mine_models) > 1
    rows = []
    for (label, method, name), group in pub.groupby(["label", "method", "model"], sort=False):
        keys = [method]
        if several:  # main-table labels are "TA+TR [<the store's model name>]"
            keys = [
                k
                for k in ours.mean.index
                if k.startswith(f"{method} [") and model_key(k[len(method) + 2 : -1]) == model_key(name)
            ]
        key = keys[0] if keys else None
        mine = ours.mean.at[key, AVERAGE] if not ours.empty and key in ours.mean.index else np.nan
        src = "; ".join(sorted(set(group["source"].dropna().astype(str)))) if "source" in group else ""
        rows.append((label, float(group["accuracy"].mean()), mine, src))
    if not rows:
        return empty
    mean = pd.DataFrame({"Published": [r[1] for r in rows], "Ours": [r[2] for r in rows]}, index=[r[0] for r in rows])
    mean["Δ"] = mean["Ours"] - mean["Published"]
    std = pd.DataFrame(np.nan, index=mean.index, columns=mean.columns)
    info = pd.DataFrame({"Source": [r[3] or "–" for r in rows]}, index=mean.index)
    if kind is not None:
        info["Checkpoints"] = kind
    seeds = pd.Series(1, index=mean.index)
    note = "Ours: the main table's average for the same method; – where this store has no such row."
    if kind is not None:
        note += f" Published: only the rows on the {kind} fine-tuned checkpoints.{left_out}"
    return Table("reference", title, mean, std, seeds, info, note=note)
