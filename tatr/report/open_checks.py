"""The tables of the three checks the paper leaves open that are not plain variant tables.

Why a module of its own: both need more than a variant or a curve table (`tatr.report.tables`, which
dispatches to these), and that module is already long. Everything here is a function of the store's rows only.

* `selection_table` (exemplar selection): rows the exemplar counts, one column per selection (per method
  where the file compared several), each cell the mean over draws of the average test accuracy with its
  95% interval; the comparison is balanced against random at the same count, paired by seed (the same
  seed draws both, on the same build) and example.
* `with_gap_closed` (zero-shot proxy): a variant table with the share of the exemplar − zero-shot gap each
  proxy closes at the tuned points, (proxy − zero-shot)/(exemplar − zero-shot) of the average test
  accuracy, with its interval from the joint bootstrap of the three rows (`tatr.report.paired.gap_bootstrap`).
  A row that reads no exemplars (zero-shot, a proxy) runs once per build, under the first seed; its
  outcomes are the same for every exemplar draw of that build, so it is paired with each of the exemplar
  row's draws, and the gap holds the exemplar row's spread over draws.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tatr.report.comparisons import (
    METHOD_NOTE,
    Comparison,
    Outcomes,
    compare,
    level_intervals,
    n_comparisons,
    outcomes,
    zero_shot_label,
)
from tatr.report.labels import ABLATION_TITLES, method_label, missing
from tatr.report.paired import gap_bootstrap
from tatr.report.render import Table, empty_table
from tatr.report.selection import (
    AVERAGE,
    ablation_rows,
    exemplar_selection,
    latest_runs,
    per_seed,
    summarize,
    task_order,
)
from tatr.store.schema import AblationKind

_POINT = "\x00"  # joins a series and a count's text into one row key for `compare`
GAP = "Gap closed [95% CI]"
GAP_NOTE = (
    "Gap closed: (proxy − zero-shot)/(exemplar − zero-shot) of the average test accuracy at the tuned points, "
    "with its 95% interval from 10,000 joint bootstrap resamples of the three rows (the exemplar draws, then the "
    "test examples of each task); rows that read no exemplars run once per build and are paired with every draw. "
    "Where the exemplar − zero-shot difference's own interval holds 0 the ratio is unbounded: read its interval so."
)


# --- exemplar selection ------------------------------------------------------------------------------
def selection_table(df: pd.DataFrame) -> Table:
    """Exemplar counts × selections: the mean average test accuracy over draws, its interval, and balanced
    against random at each count (one Holm family for the table)."""
    kind = AblationKind.EXEMPLAR_SELECTION
    name, title, header = f"ablation_{kind.replace('-', '_')}", ABLATION_TITLES[kind], "Exemplars per task"
    rows = ablation_rows(df, kind)
    rows = rows[rows["exemplars"].notna()]  # a variant without exemplars has no selection to compare
    if rows.empty:
        return empty_table(name, title, header)
    chosen = rows["exemplar_selection"].map(exemplar_selection)
    base = pd.Series(
        [method_label(m, t) for m, t in zip(rows["method"], rows["trust_region"], strict=True)], rows.index
    )
    base = (
        base + rows["model"].map(lambda m: "" if missing(m) else f" [{m}]") if rows["model_key"].nunique() > 1 else base
    )
    single = base.nunique() == 1
    series = chosen.str.capitalize() if single else base + " (" + chosen + ")"
    rows = rows.assign(series=series, base=base, chosen=chosen, row=rows["exemplars"].map(lambda v: f"{int(v)}"))
    rows = latest_runs(rows, ["series", "row", "seed_key"])
    rows = rows.assign(point=rows["series"] + _POINT + rows["row"])
    tasks = task_order(rows)
    wide = per_seed(rows, ["series", "row"], tasks)
    order = [f"{int(v)}" for v in sorted(rows["exemplars"].unique())]
    labels = sorted(
        set(rows["series"]), key=lambda s: (str(rows.loc[rows["series"] == s, "base"].iloc[0]), s != "Random")
    )
    means, stds, counts = [], [], []
    for label in labels:
        m, s, n = summarize(wide[wide["series"] == label], "row", [AVERAGE], order)
        means.append(m.rename(columns={AVERAGE: label}))
        stds.append(s.rename(columns={AVERAGE: label}))
        counts.append(n)
    mean = pd.concat(means, axis=1).reindex(order)
    seeds = pd.concat(counts, axis=1).max(axis=1).reindex(order).fillna(0).astype(int)
    note = (
        "Average test accuracy (%) over the tasks; λ (and q) chosen on validation at each point; mean ± std over "
        "exemplar draws (seeds). Balanced: the classes in turn, seeded; random: a seeded uniform draw."
    )
    table = Table(name, title, mean, pd.concat(stds, axis=1).reindex(order), seeds, row_header=header, note=note)
    low, high = level_intervals(rows, "point", sorted(set(rows["point"])), tasks, AVERAGE)
    table.low = pd.DataFrame(np.nan, index=mean.index, columns=labels)
    table.high = table.low.copy()
    for point in low.index:
        label, x = str(point).split(_POINT, 1)
        table.low.at[x, label], table.high.at[x, label] = low.at[point, AVERAGE], high.at[point, AVERAGE]
    blocks = _selection_blocks(rows, order)
    if blocks:
        table.comparisons = [Comparison(c.name, _by_count(c.frame), c.family) for c in compare(rows, "point", blocks)]
        table.note = f"{table.note} {METHOD_NOTE.format(m=n_comparisons(table.comparisons))}"
    return table


def _selection_blocks(rows: pd.DataFrame, order: list[str]) -> dict[str, dict[str, str]]:
    """Per method: each other selection against random, count by count."""
    blocks: dict[str, dict[str, str]] = {}
    have = set(rows["point"])
    for _, group in rows.groupby("base", sort=False):
        named = group.drop_duplicates("chosen").set_index("chosen")["series"]
        if "random" not in named.index:
            continue
        for chosen, series in named.items():
            if chosen == "random":
                continue
            pairs = {f"{series}{_POINT}{x}": f"{named['random']}{_POINT}{x}" for x in order}
            pairs = {a: b for a, b in pairs.items() if a in have and b in have}
            if pairs:
                blocks[f"{series} vs {named['random']}"] = pairs
    return blocks


def _by_count(frame: pd.DataFrame) -> pd.DataFrame:
    """A comparison's rows keyed by the count alone (the block names the series)."""
    out = frame.copy()
    out.index = [str(i).split(_POINT, 1)[1] for i in out.index]
    out["reference"] = out["reference"].map(lambda r: str(r).split(_POINT, 1)[0])
    return out


# --- zero-shot proxies ------------------------------------------------------------------------------
def with_gap_closed(table: Table, df: pd.DataFrame) -> Table:
    """`table` (the zero-shot-proxy variant table of `df`'s rows) with the share of the exemplar − zero-shot
    gap each other TA trust-region row closes, as a text column; 0 and 1 on the two reference rows."""
    zero, exemplar = zero_shot_label(), method_label("ta", "exemplar")
    labels = [str(v) for v in table.mean.index]
    if table.empty or zero not in labels or exemplar not in labels:
        return table
    rows = ablation_rows(df, AblationKind.ZERO_SHOT_PROXY)
    rows = latest_runs(rows.assign(variant=rows["label"]), ["variant", "seed_key"])  # as `variant_table` selects
    found = outcomes(rows, "variant")
    modes = rows.drop_duplicates("variant").set_index("variant")[["method", "trust_region"]]
    column = []
    for label in labels:
        method, mode = modes.loc[label] if label in modes.index else ("", "")
        if label in (zero, exemplar):
            column.append("0 (reference)" if label == zero else "1 (reference)")
        elif method == "ta" and not missing(mode) and mode != "off":
            column.append(_gap_text(found, label, zero, exemplar))
        else:
            column.append("")
    table.info[GAP] = column
    table.note = f"{table.note} {GAP_NOTE}".strip()
    return table


def _gap_text(found: Outcomes, proxy: str, zero: str, exemplar: str) -> str:
    """'0.42 [0.10, 0.81]', or '–' where the three rows do not pair (no predictions, other runs)."""
    paired = gap_inputs(found, proxy, zero, exemplar)
    if paired is None:
        return "–"
    gap, low, high = gap_bootstrap(*paired)
    if not np.isfinite(gap):
        return "–"
    interval = f" [{_two(low)}, {_two(high)}]" if np.isfinite(low) else ""
    return f"{_two(gap)}{interval}"


def _two(value: float) -> str:
    """Two decimals, never '-0.00'."""
    return f"{round(float(value), 2) + 0.0:.2f}"


def gap_inputs(found: Outcomes, proxy: str, zero: str, exemplar: str) -> tuple[list, list, list, list] | None:
    """Per exemplar draw: (proxy, zero-shot, exemplar) correct vectors and strata, in sorted task order; a row
    with one seed (it reads no exemplars) stands for every draw. None where they cannot be paired."""
    seeds = {row: sorted(s for (r, s) in found if r == row) for row in (proxy, zero, exemplar)}
    if not all(seeds.values()):
        return None
    draws = seeds[exemplar]

    def at(row: str, seed: int) -> tuple[str, dict[str, np.ndarray]] | None:
        if (row, seed) in found:
            return found[(row, seed)]
        return found[(row, seeds[row][0])] if len(seeds[row]) == 1 else None

    parts: tuple[list, list, list, list] = ([], [], [], [])
    for seed in draws:
        got = [at(row, seed) for row in (proxy, zero, exemplar)]
        if any(g is None for g in got) or len({g[0] for g in got}) != 1:  # type: ignore[index]
            return None
        per_task = [g[1] for g in got]  # type: ignore[index]
        tasks = sorted(per_task[0])
        if any(set(p) != set(tasks) or any(len(p[t]) != len(per_task[0][t]) for t in tasks) for p in per_task):
            return None
        for i, p in enumerate(per_task):
            parts[i].append(np.concatenate([p[t] for t in tasks]))
        parts[3].append(np.concatenate([np.full(len(per_task[0][t]), k) for k, t in enumerate(tasks)]))
    return parts
