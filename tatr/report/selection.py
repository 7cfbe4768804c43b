"""Which rows of the store a table uses: typing the store, the latest run of each configuration,
the rows that give a method's final number, and the rows of one ablation.

Why a module of its own: every table and figure must select runs the same way, or two views of one
store would disagree. Everything here is a function of the store's rows only (no clock, no
environment), so the same store always gives the same selection.

* A *run* is one `run_id`: one configuration evaluated on a set of tasks (one row per task).
* When the store holds several runs of the same configuration and seed (a re-run), the latest one
  counts (largest timestamp, then largest run id): the store is append-only, so a fix is a new run,
  never an edit.
* `per_seed` and `summarize` turn the selected rows into one row per (configuration, seed), then mean,
  std and seed count per configuration: what every table shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from tatr.core.fisher import DEFAULT_FISHER_ESTIMATOR
from tatr.report.labels import method_label, missing, model_key
from tatr.store.schema import COLUMNS, AblationKind

AVERAGE = "Average"
NORMALIZED = "Normalized"


def prepare(store: pd.DataFrame) -> pd.DataFrame:
    """The store with typed numbers, a display `label`, the ablation kind and a comparable `seed_key`.

    Rows stored before the schema had an `ablation` column kept the kind in `experiment`; for those
    (job_type "ablation", no `ablation`) the kind is read from there, so old stores report the same.
    """
    df = store.reindex(columns=[*COLUMNS, *(c for c in store.columns if c not in COLUMNS)])
    for col in ("q", "lam", "ties_k", "exemplars", "accuracy", "normalized_accuracy", "timestamp", "seed", "trial"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    legacy = (df["job_type"] == "ablation") & df["ablation"].map(missing)
    df["ablation"] = df["ablation"].astype(object).where(~legacy, df["experiment"])
    df["label"] = [method_label(m, t) for m, t in zip(df["method"], df["trust_region"], strict=True)]
    estimator = df["fisher_estimator"].map(
        lambda e: "" if missing(e) or e == DEFAULT_FISHER_ESTIMATOR else f" [{e} Fisher]"
    )
    df["label"] = df["label"] + estimator  # two estimators' Fisher rows are two rows, not a re-run
    df["label"] = df["label"] + df["exemplar_selection"].map(selection_suffix)  # nor two exemplar draws' rows
    df["model_key"] = df["model"].map(model_key)
    if df["model_key"].nunique() > 1:  # several models of one benchmark: never mix them in a row
        suffix = df["model"].map(lambda m: "" if missing(m) else f" [{m}]")
        df["label"] = df["label"] + suffix
    df["seed_key"] = df["seed"].fillna(-1).astype("int64")
    df["run_time"] = df.groupby("run_id")["timestamp"].transform("max").fillna(0.0)
    return df


def exemplar_selection(value: object) -> str:
    """How a row's exemplars were drawn: its `exemplar_selection`, "random" where null (rows from before
    the option, and rows of merges that read none)."""
    return "random" if missing(value) else str(value)


def selection_suffix(value: object) -> str:
    """What a row's label says of its exemplar draw: nothing for the default, " [balanced exemplars]" else."""
    chosen = exemplar_selection(value)
    return "" if chosen == "random" else f" [{chosen} exemplars]"


def task_order(df: pd.DataFrame) -> list[str]:
    """Tasks in the order the earliest run listed them (the suite's order), then any others."""
    ordered = df.sort_values(["run_time", "run_id"], kind="stable")
    return list(dict.fromkeys(ordered["task"].astype(str)))


def latest_runs(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows of the latest run for each combination of `keys` (a re-run replaces, never adds)."""
    if df.empty:
        return df
    keys = list(keys)
    heads = df[[*keys, "run_id", "run_time"]].drop_duplicates()
    heads = heads.sort_values([*keys, "run_time", "run_id"], kind="stable")
    chosen = heads.groupby(keys, dropna=False, sort=False).tail(1)[[*keys, "run_id"]]
    return df.merge(chosen, on=[*keys, "run_id"], how="inner")


def per_seed(df: pd.DataFrame, keys: Sequence[str], tasks: Sequence[str], value: str = "accuracy") -> pd.DataFrame:
    """One row per (keys, seed): each task's value, the task average and the normalized average."""
    keys = list(keys)
    wide = df.groupby([*keys, "seed_key", "task"], sort=False, dropna=False)[value].mean().unstack("task")
    wide = wide.reindex(columns=[t for t in tasks if t in wide.columns])
    wide[AVERAGE] = wide.mean(axis=1, skipna=True)
    norm = df.groupby([*keys, "seed_key"], dropna=False)["normalized_accuracy"].mean()
    wide[NORMALIZED] = norm.reindex(wide.index)
    wide.columns.name = None
    return wide.reset_index()


def summarize(
    wide: pd.DataFrame,
    row_key: str,
    columns: Sequence[str],
    order: Sequence[object] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Mean, std (ddof=1) and seed count over the per-seed rows of `wide`, one row per `row_key`."""
    grouped = wide.groupby(row_key, sort=False)[list(columns)]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    seeds = wide.groupby(row_key, sort=False)["seed_key"].nunique()
    if order is not None:
        index = [o for o in order if o in mean.index]
        mean, std, seeds = mean.reindex(index), std.reindex(index), seeds.reindex(index)
    return mean, std, seeds


# The ablations whose tuned test rows the main table may show, by the rank of their source.
_MAIN_KINDS = {AblationKind.BASELINES: 1, AblationKind.PLUGIN: 2, AblationKind.TRUST_REGION: 3}
SOURCES = {0: "sweep finals", 1: "baselines", 2: "plug-in ablation", 3: "trust-region ablation"}


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Test rows that give a method's final number: sweep finals, baselines (the reference models and
    the baselines file's tuned merges), and the tuned rows of the plug-in and trust-region ablations
    (the latter adds TA+TR with exemplars)."""
    test = df[df["split"] == "test"]
    final = test["job_type"].isin(["baseline", "final"])
    ablation = (test["job_type"] == "ablation") & test["ablation"].isin(list(_MAIN_KINDS))
    return test[final | ablation]


def main_source(rows: pd.DataFrame) -> pd.Series:
    """The rank of a row's source (see `SOURCES`): each method's row uses its best-ranked source."""
    ranks = rows["job_type"].map({"final": 0, "baseline": 1})
    kinds = rows["ablation"].map(lambda kind: _MAIN_KINDS.get(kind, 4) if isinstance(kind, str) else 4)
    return ranks.fillna(kinds).astype(int)


def prefer_seeded(rows: pd.DataFrame) -> pd.DataFrame:
    """Drop a label's seed-less rows where it has seeded ones, so a mean over seeds never counts them.

    Why: a baselines file writes Pretrained and Individual for each build seed, and other ablation files'
    `baselines: true` write them once more without a seed, for their one build; that is not another seed."""
    if rows.empty:
        return rows
    has_seeded = rows.groupby("label", dropna=False)["seed_key"].transform("max") >= 0
    return rows[~has_seeded | (rows["seed_key"] >= 0)]


def ablation_rows(df: pd.DataFrame, kind: str, split: str = "test") -> pd.DataFrame:
    """The rows one kind of ablation wrote on `split`."""
    return df[(df["job_type"] == "ablation") & (df["ablation"] == kind) & (df["split"] == split)]
