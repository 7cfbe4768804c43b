"""Tables from the results store: pure pandas in, `Table` out, rendered as Markdown, LaTeX, CSV, HTML.

Why a module of its own: the report, the notebooks and the tests all need the *same* numbers, and
the numbers must not depend on how they are drawn. Everything here is a function of the store's
rows only (no clock, no environment), so the same store always gives the same tables.

Conventions every table follows:
* A *run* is one `run_id`: one configuration evaluated on a set of tasks (one row per task).
* When the store holds several runs of the same configuration and seed (a re-run), the latest
  one counts (largest timestamp, then largest run id): the store is append-only, so a fix is a
  new run, never an edit.
* A run's average is the mean over its tasks; across seeds, tables show mean ± sample std
  (ddof=1) of the per-seed values. One seed: the mean alone.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tatr.core.methods import METHODS

AVERAGE = "Average"
NORMALIZED = "Normalized"

# display names; anything unknown is shown as stored
_METHOD_LABELS = {
    "pretrained": "Pretrained",
    "zeroshot": "Pretrained",
    "zero-shot": "Pretrained",
    "individual": "Individual",
    "finetuned": "Individual",
    "fine-tuned": "Individual",
    **{name: METHODS.get(name).label for name in METHODS},  # the one place a method's label lives
    "ties": METHODS.get("ties-mean").label,  # rows stored before the split: they were the disjoint mean
}
_METHOD_ORDER = [
    "pretrained",
    "zeroshot",
    "zero-shot",
    "individual",
    "finetuned",
    "fine-tuned",
    "average",
    "ta",
    "ties-sum",
    "ties-mean",
    "ties",
]
_TR_SUFFIX = {
    "off": "",
    "zero-shot": "+TR",
    "exemplar": "+TR (exemplar)",
    "gradient-only": "+TR (gradient-only)",
    "magnitude-only": "+TR (magnitude-only)",
}
_TR_ORDER = list(_TR_SUFFIX)
COMPONENT_ORDER = ("positive", "negative", "orthogonal", "all")

# ablation experiments as written to the store's `experiment` column by tatr.runs.ablations
COMPONENTS = "components"
TRUST_REGION = "trust-region"
SENSITIVITY = "sensitivity"
MASK_RATIO = "mask-ratio"
EXEMPLAR_COUNT = "exemplar-count"
PLUGIN = "plugin"
GRADIENT_CORRELATION = "gradient-correlation"
ABLATIONS = (COMPONENTS, TRUST_REGION, SENSITIVITY, MASK_RATIO, EXEMPLAR_COUNT, PLUGIN, GRADIENT_CORRELATION)
ABLATION_TITLES = {
    COMPONENTS: "Components of the task vectors outside the trust region",
    TRUST_REGION: "Zero-shot vs exemplar trust region",
    SENSITIVITY: "Sensitivity: full, gradient-only, magnitude-only",
    MASK_RATIO: "Mask ratio: average test accuracy against the dropped fraction 1−q",
    EXEMPLAR_COUNT: "Exemplar count: average test accuracy against exemplars per task",
    PLUGIN: "Plug-in: the trust region on top of TA and TIES",
    GRADIENT_CORRELATION: "Spearman correlation between tasks' mean |gradient|",
}
PAPER_BENCHMARK = "clip8"  # the benchmark the published numbers are about, unless the CSV says
PAIR_SEPARATOR = "|"  # gradient-correlation rows name a task pair as "a|b"


# --- labels --------------------------------------------------------------------------------------
def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def method_label(method: object, trust_region: object = None) -> str:
    """'TA', 'TA+TR', 'TIES+TR (exemplar)', 'Pretrained', … for a store row."""
    name = "?" if _missing(method) else str(method)
    label = _METHOD_LABELS.get(name.lower(), name)
    if _missing(trust_region):
        return label
    return label + _TR_SUFFIX.get(str(trust_region), f"+TR ({trust_region})")


def method_rank(method: object, trust_region: object) -> tuple[int, int, str]:
    """Sort key: baselines first, then averaging, TA, TIES, each followed by its TR variants."""
    name = "" if _missing(method) else str(method).lower()
    m = _METHOD_ORDER.index(name) if name in _METHOD_ORDER else len(_METHOD_ORDER)
    tr = "off" if _missing(trust_region) else str(trust_region)
    t = _TR_ORDER.index(tr) if tr in _TR_ORDER else len(_TR_ORDER)
    return (m, t, name)


def components_label(value: object) -> str:
    """Stored components (list, '+'-joined text or None) as 'positive', 'orthogonal', 'all', …"""
    if _missing(value):
        return "all"
    parts = value if isinstance(value, list | tuple) else str(value).replace(",", "+").split("+")
    chosen = {str(p).strip() for p in parts if str(p).strip()}
    if chosen >= {"positive", "negative", "orthogonal"}:
        return "all"
    return "+".join(c for c in COMPONENT_ORDER if c in chosen)


# --- selecting runs --------------------------------------------------------------------------------
def prepare(store: pd.DataFrame) -> pd.DataFrame:
    """The store with typed numbers, a display `label` and a comparable `seed_key`."""
    from tatr.runs.store import COLUMNS

    df = store.reindex(columns=[*COLUMNS, *(c for c in store.columns if c not in COLUMNS)])
    for col in ("q", "lam", "ties_k", "exemplars", "accuracy", "normalized_accuracy", "timestamp", "seed", "trial"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["label"] = [method_label(m, t) for m, t in zip(df["method"], df["trust_region"], strict=True)]
    df["model_key"] = df["model"].map(model_key)
    if df["model_key"].nunique() > 1:  # several models of one benchmark: never mix them in a row
        suffix = df["model"].map(lambda m: "" if _missing(m) else f" [{m}]")
        df["label"] = df["label"] + suffix
    df["seed_key"] = df["seed"].fillna(-1).astype("int64")
    df["run_time"] = df.groupby("run_id")["timestamp"].transform("max").fillna(0.0)
    return df


def model_key(model: object) -> str | None:
    """'ViT-B/32' and open_clip's 'ViT-B-32' name the same model: compare lower-case alphanumerics."""
    return None if _missing(model) else re.sub(r"[^a-z0-9]", "", str(model).lower())


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


# --- the table object -----------------------------------------------------------------------------
@dataclass
class Table:
    """Means and stds over seeds, one row per label; `info` holds text columns (λ, q, …)."""

    name: str
    title: str
    mean: pd.DataFrame
    std: pd.DataFrame
    seeds: pd.Series
    info: pd.DataFrame = field(default_factory=pd.DataFrame)
    row_header: str = "Method"
    digits: int = 1
    note: str = ""

    @property
    def empty(self) -> bool:
        return self.mean.empty

    def cell(self, row: object, col: str) -> str:
        m = self.mean.at[row, col]
        if pd.isna(m):
            return "–"
        s = self.std.at[row, col] if col in self.std else np.nan
        text = f"{m:.{self.digits}f}"
        if self.seeds.get(row, 1) > 1 and not pd.isna(s):
            text += f" ± {s:.{self.digits}f}"
        return text

    def header(self) -> list[str]:
        return [self.row_header, *map(str, self.info.columns), *map(str, self.mean.columns)]

    def text_rows(self) -> list[list[str]]:
        rows = []
        for row in self.mean.index:
            info = [str(self.info.at[row, c]) for c in self.info.columns]
            rows.append([str(row), *info, *(self.cell(row, c) for c in self.mean.columns)])
        return rows

    # --- renderers ----------------------------------------------------------------------------
    def to_markdown(self) -> str:
        head = self.header()
        align = ["---"] + ["---:"] * (len(head) - 1)
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(_md(h) for h in head) + " |")
        lines.append("| " + " | ".join(align) + " |")
        lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in self.text_rows()]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        head = self.header()
        spec = "l" + "r" * (len(head) - 1)
        body = [" & ".join(_tex(c) for c in r) + r" \\" for r in self.text_rows()]
        lines = [
            "% generated by `tatr report`; needs \\usepackage{booktabs}",
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            rf"\caption{{{_tex(self.title)}}}",
            rf"\label{{tab:{self.name}}}",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(_tex(h) for h in head) + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
        ]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """Machine-readable: the mean in each column, its std in `<column>_std`, and `seeds`."""
        out = pd.DataFrame(index=self.mean.index)
        out.index.name = self.row_header
        for c in self.info.columns:
            out[str(c)] = self.info[c]
        for c in self.mean.columns:
            out[str(c)] = self.mean[c].map(_num)
            out[f"{c}_std"] = self.std[c].map(_num) if c in self.std else ""
        out["seeds"] = self.seeds.reindex(self.mean.index).fillna(0).astype(int)
        return out.to_csv(lineterminator="\n")

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header())
        body = []
        for r in self.text_rows():
            cells = f"<th>{html.escape(r[0])}</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in r[1:])
            body.append(f"<tr>{cells}</tr>")
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return (
            f"<table id='{html.escape(self.name)}'><caption>{html.escape(self.title)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"
        )


def _num(value: object) -> str:
    return "" if pd.isna(value) else repr(round(float(value), 6))


def _md(text: str) -> str:
    return text.replace("|", "\\|")


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex(text: str) -> str:
    out = "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)
    return out.replace(" ± ", r" $\pm$ ").replace("λ", r"$\lambda$").replace("–", "--").replace("−", "-")


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


def _values(series: pd.Series, fmt: Callable[[float], str] = lambda v: f"{v:g}") -> str:
    """Distinct numbers of a column as 'a/b' (the hyperparameter each seed's tuning chose)."""
    vals = sorted({float(v) for v in series.dropna()})
    return "/".join(fmt(v) for v in vals) if vals else "–"


# --- the tables -------------------------------------------------------------------------------------
def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Test rows that give a method's final number: sweep finals, baselines, and the tuned rows of
    the plug-in and trust-region ablations (the latter adds TA+TR with exemplars)."""
    test = df[df["split"] == "test"]
    final = test["job_type"].isin(["baseline", "final"])
    ablation = (test["job_type"] == "ablation") & test["experiment"].isin([PLUGIN, TRUST_REGION])
    return test[final | ablation]


_SOURCES = {0: "sweep finals", 1: "baselines", 2: "plug-in ablation", 3: "trust-region ablation"}


def main_source(rows: pd.DataFrame) -> pd.Series:
    """The rank of a row's source (see `_SOURCES`): each method's row uses its best-ranked source."""
    ranks = rows["job_type"].map({"final": 0, "baseline": 1})
    return ranks.fillna(rows["experiment"].map({PLUGIN: 2, TRUST_REGION: 3})).fillna(4).astype(int)


def main_table(df: pd.DataFrame) -> Table:
    """The paper layout: rows methods, columns the tasks, the average and the normalized average.

    Each method's row comes from one source, the first that has it among sweep finals, baselines,
    the plug-in and the trust-region ablation (tuned differently, so never mixed), then its latest
    run per seed.
    """
    rows = main_rows(df)
    rows = rows.assign(source=main_source(rows))
    rows = rows[rows["source"] == rows.groupby("label")["source"].transform("min")]
    rows = latest_runs(rows, ["label", "seed_key"])
    tasks = task_order(rows)
    if rows.empty:
        return _empty("main", "Test accuracy (%) of merged models")
    wide = per_seed(rows, ["label"], tasks)
    ranks = rows.drop_duplicates("label").set_index("label")
    order = sorted(
        ranks.index, key=lambda lbl: (method_rank(ranks.at[lbl, "method"], ranks.at[lbl, "trust_region"]), lbl)
    )
    mean, std, seeds = summarize(wide, "label", [*tasks, AVERAGE, NORMALIZED], order)
    title = "Test accuracy (%) per task; Normalized: accuracy ÷ the task's fine-tuned model (%)"
    used = rows.drop_duplicates("label").set_index("label")["source"].reindex(mean.index)
    origin = "; ".join(
        f"{_SOURCES[src]}: {', '.join(str(lbl) for lbl in used.index[used == src])}" for src in sorted(set(used))
    )
    return Table("main", title, mean, std, seeds, note=f"Rows from {origin}. {_seed_note(seeds)}".strip())


def _seed_note(seeds: pd.Series) -> str:
    several = int((seeds > 1).sum()) if len(seeds) else 0
    return "Mean ± std over seeds (exemplar draws) where a row has several." if several else ""


def _empty(name: str, title: str, row_header: str = "Method") -> Table:
    return Table(name, title, pd.DataFrame(), pd.DataFrame(), pd.Series(dtype="int64"), row_header=row_header)


def ablation_rows(df: pd.DataFrame, experiment: str, split: str = "test") -> pd.DataFrame:
    return df[(df["job_type"] == "ablation") & (df["experiment"] == experiment) & (df["split"] == split)]


def variant_key(df: pd.DataFrame, experiment: str) -> pd.Series:
    """The row label an ablation compares: the components, the method, or the trust-region mode."""
    if experiment == COMPONENTS:
        label = df["components"].map(components_label)
        if df["model_key"].nunique() > 1:
            label = label + df["model"].map(lambda m: "" if _missing(m) else f" [{m}]")
        return label
    return df["label"]


def variant_table(df: pd.DataFrame, experiment: str) -> Table:
    """Ablations that compare a few variants (components, trust region, sensitivity, plug-in)."""
    title = ABLATION_TITLES[experiment]
    rows = ablation_rows(df, experiment)
    header = "Components" if experiment == COMPONENTS else "Method"
    if rows.empty:
        return _empty(f"ablation_{_stem(experiment)}", title, header)
    rows = rows.assign(variant=variant_key(rows, experiment))
    rows = latest_runs(rows, ["variant", "seed_key"])
    tasks = task_order(rows)
    wide = per_seed(rows, ["variant"], tasks)
    if experiment == COMPONENTS:
        order = [c for c in COMPONENT_ORDER if c in set(wide["variant"])]
        order += sorted(set(wide["variant"]) - set(order))
    else:
        first = rows.drop_duplicates("variant").set_index("variant")
        order = sorted(first.index, key=lambda v: (method_rank(first.at[v, "method"], first.at[v, "trust_region"]), v))
    mean, std, seeds = summarize(wide, "variant", [*tasks, AVERAGE, NORMALIZED], order)
    info = pd.DataFrame(index=mean.index)
    by_variant = rows.groupby("variant", sort=False)
    info["λ"] = [_values(by_variant.get_group(v)["lam"]) for v in mean.index]
    tuned_q = [_values(by_variant.get_group(v)["q"]) for v in mean.index]
    if any(q != "–" for q in tuned_q):
        info["q"] = tuned_q
    note = "λ (and q) chosen on the validation split per variant and seed; test accuracy (%). " + _seed_note(seeds)
    return Table(f"ablation_{_stem(experiment)}", title, mean, std, seeds, info, header, note=note.strip())


def curve_frame(df: pd.DataFrame, experiment: str, x: str) -> pd.DataFrame:
    """Per (series label, x, seed): the average and normalized average test accuracy."""
    rows = ablation_rows(df, experiment)
    if rows.empty:
        return pd.DataFrame(columns=["label", x, "seed_key", AVERAGE, NORMALIZED])
    rows = rows.assign(**{x: _x_value(rows, x)})
    rows = latest_runs(rows, ["label", x, "seed_key"])
    return per_seed(rows, ["label", x], task_order(rows))


def _x_value(rows: pd.DataFrame, x: str) -> pd.Series:
    if x == "drop":
        return (1.0 - rows["q"]).round(12)
    return rows[x]


def curve_table(df: pd.DataFrame, experiment: str, x: str, x_header: str, fmt: Callable[[float], str]) -> Table:
    """Mask ratio and exemplar count: rows the x values, one column per method (average accuracy)."""
    title = ABLATION_TITLES[experiment]
    wide = curve_frame(df, experiment, x)
    if wide.empty:
        return _empty(f"ablation_{_stem(experiment)}", title, x_header)
    wide = wide.assign(row=wide[x].map(fmt))
    labels = list(dict.fromkeys(wide.sort_values("label", key=lambda s: s.map(_label_rank))["label"]))
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
    return Table(f"ablation_{_stem(experiment)}", title, mean, std, seed_count, row_header=x_header, note=note.strip())


def _label_rank(label: str) -> tuple[int, str]:
    base = label.split("+", 1)[0]
    known = [method_label(m) for m in _METHOD_ORDER]
    return (known.index(base) if base in known else len(known), label)


def _stem(experiment: str) -> str:
    return experiment.replace("-", "_")


def drop_text(drop: float) -> str:
    """A dropped fraction as a short percentage: 0.0001 → '0.01%'."""
    return f"{100 * drop:.4g}%"


def correlation_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Symmetric task × task matrices (mean, std over seeds) of Spearman ρ, and the seed count."""
    rows = ablation_rows(df, GRADIENT_CORRELATION, split="train")
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
    title = ABLATION_TITLES[GRADIENT_CORRELATION]
    mean, std, seeds = correlation_frame(df)
    if mean.empty:
        return _empty(f"ablation_{_stem(GRADIENT_CORRELATION)}", title, "Task")
    count = pd.Series(seeds, index=mean.index)
    note = "Rank correlation over all merged coordinates (or a seeded subsample on large models). "
    return Table(
        f"ablation_{_stem(GRADIENT_CORRELATION)}",
        title,
        mean,
        std,
        count,
        row_header="Task",
        digits=2,
        note=(note + _seed_note(count)).strip(),
    )


def ablation_tables(df: pd.DataFrame) -> list[Table]:
    """Every ablation table, in the order of the spec; empty ones are kept so callers can say so."""
    return [
        variant_table(df, COMPONENTS),
        variant_table(df, TRUST_REGION),
        variant_table(df, SENSITIVITY),
        curve_table(df, MASK_RATIO, "drop", "Dropped 1−q", drop_text),
        curve_table(df, EXEMPLAR_COUNT, "exemplars", "Exemplars per task", lambda v: f"{int(v)}"),
        variant_table(df, PLUGIN),
        correlation_table(df),
    ]


# --- the published reference -----------------------------------------------------------------------
_TIES_SUM = METHODS.get("ties-sum").label
_REFERENCE_ALIASES = {
    "task arithmetic": "TA",
    "task-arithmetic": "TA",
    "ta": "TA",
    # published TIES rows come from AdaMerging's script: the disjoint sum (`ties-sum`)
    "ties": _TIES_SUM,
    "ties-merging": _TIES_SUM,
    "ties merging": _TIES_SUM,
    "ties-sum": _TIES_SUM,
    "ties (dis-sum)": _TIES_SUM,
    "ties-mean": METHODS.get("ties-mean").label,
    "ties (dis-mean)": METHODS.get("ties-mean").label,
    "tatr": "TA+TR",
    "ta+tatr": "TA+TR",
    "ta+tr": "TA+TR",
    "task arithmetic+tatr": "TA+TR",
    "ties+tatr": _TIES_SUM + "+TR",
    "ties+tr": _TIES_SUM + "+TR",
    "weight averaging": "Averaging",
    "averaging": "Averaging",
    "average": "Averaging",
    "individual": "Individual",
    "fine-tuned": "Individual",
    "finetuned": "Individual",
    "pretrained": "Pretrained",
    "zero-shot": "Pretrained",
    "zeroshot": "Pretrained",
}


def reference_label(method: str) -> str:
    key = " ".join(str(method).strip().lower().split())
    return _REFERENCE_ALIASES.get(key, str(method).strip())


def reference_table(df: pd.DataFrame, published: pd.DataFrame | None, benchmark: str) -> Table:
    """Our average test accuracy next to the published one, per method (and model where given)."""
    title = "Average test accuracy (%): this harness vs the published numbers"
    empty = _empty("reference", title)
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
    seeds = pd.Series(1, index=mean.index)
    note = "Ours: the main table's average for the same method; – where this store has no such row."
    return Table("reference", title, mean, std, seeds, info, note=note)
