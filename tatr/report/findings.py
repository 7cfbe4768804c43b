"""The report's opening: its findings in sentences, and what the benchmark can resolve at all.

Why generated: a sentence a person writes goes stale the moment the store changes, and a reader of a
paper's claims wants each one with its interval. Every sentence here is a table's comparison
(`tatr.report.comparisons`) read aloud: the headline comparisons are each method with the trust
region against the same method without it, in the main table and in the plug-in ablation. A
difference whose Holm-corrected interval holds 0 is said to be not distinguishable from 0.

The resolution table gives, per split, the examples per task and the half-width of a 95% interval
(`tatr.core.resolution`) for one accuracy, for two independent ones, and for a paired difference at
the disagreement rate the store's comparisons actually show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tatr.core.resolution import level_half_width, resolvable_difference
from tatr.report.render import Table, signed

HEADLINE = "vs no-TR"  # the comparison block whose rows the findings read
SOURCES = (("main", "main table"), ("ablation_plugin", "plug-in ablation"))


def sentence(row: str, frame_row: pd.Series) -> str:
    """'TA+TR over TA: +1.6 points [+0.9, +2.3], 3 seeds, significant after Holm (p = 0.004).'"""
    ref = frame_row["reference"]
    if pd.isna(frame_row["delta"]):
        return f"{row} over {ref}: no interval (the store has no per-example predictions for this pair)."
    seeds = int(frame_row["seeds"])
    head = (
        f"{row} over {ref}: {signed(frame_row['delta'])} points [{signed(frame_row['low'])},"
        f" {signed(frame_row['high'])}],"
        f" {seeds} seed{'s' if seeds != 1 else ''}"
    )
    p = float(frame_row["p_holm"])
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    if bool(frame_row["significant"]):
        return f"{head}, significant after Holm ({p_text})."
    return f"{head}, not distinguishable from 0 after Holm ({p_text})."


def findings(tables: Sequence[Table]) -> list[tuple[str, list[str]]]:
    """(where, sentences) for the main table and the plug-in ablation, in table order; empty where a
    table has no trust-region pairs. A plug-in pair the main table already states (its row comes from
    the plug-in ablation: the same runs, the same difference) is said once, in the main table."""
    by_name = {t.name: t for t in tables if not t.empty}
    out, said = [], set()
    for name, where in SOURCES:
        table = by_name.get(name)
        if table is None:
            continue
        block = next((c.frame for c in table.comparisons if c.name == HEADLINE), None)
        if block is None or block.empty:
            continue
        sentences = []
        for row in (r for r in map(str, table.mean.index) if r in block.index):
            r = block.loc[row]
            key = (row, r["reference"], None if pd.isna(r["delta"]) else round(float(r["delta"]), 9), r["seeds"])
            if key in said:
                continue
            said.add(key)
            sentences.append(sentence(row, r))
        if sentences:
            out.append((where, sentences))
    return out


def observed_discordance(tables: Sequence[Table]) -> float | None:
    """The median fraction of test examples on which compared rows disagree, over every comparison."""
    rates = [float(v) for t in tables for c in t.comparisons for v in c.frame["discordant"].dropna() if np.isfinite(v)]
    return float(np.median(rates)) if rates else None


def resolution_table(rows: pd.DataFrame, tables: Sequence[Table]) -> Table:
    """Per split: tasks, examples per task, seeds of the main table, and the 95% half-widths."""
    columns = ["Tasks", "Examples per task", "Seeds", "One accuracy ±", "Unpaired difference ±"]
    rate = observed_discordance(tables)
    paired = f"Paired difference ± (at {rate:.1%} disagreement)" if rate is not None else None
    seeds = max((int(t.seeds.max()) for t in tables if t.name == "main" and not t.empty), default=1)
    records, index = [], []
    for split in ("test", "validation"):
        sub = rows[(rows["split"] == split) & rows["n_examples"].notna()]
        if sub.empty:
            continue
        sizes = sub.groupby(sub["task"].astype(str))["n_examples"].max().astype(int).tolist()
        shown = f"{min(sizes)}–{max(sizes)}" if min(sizes) != max(sizes) else str(sizes[0])
        for s in sorted({1, max(seeds, 1)}):
            index.append(f"{split}, {s} seed{'s' if s > 1 else ''}")
            record = [len(sizes), shown, s, level_half_width(sizes, s), resolvable_difference(sizes, seeds=s)]
            if paired is not None:
                record.append(resolvable_difference(sizes, rate, s))
            records.append(record)
    if paired is not None:
        columns.append(paired)
    title = "What this benchmark can resolve: 95% half-widths of the average accuracy (points)"
    note = (
        "From the binomial variance (tatr/core/resolution.py): one accuracy at p = 0.5; two methods measured "
        "independently; two methods measured on the same examples that disagree on the median fraction the "
        "tables' comparisons show. Differences smaller than these cannot be told from sampling noise."
    )
    frame = pd.DataFrame(records, index=index, columns=columns)
    info = frame[["Tasks", "Examples per task", "Seeds"]].astype(str)
    mean = frame.drop(columns=["Tasks", "Examples per task", "Seeds"]).astype(float)
    std = pd.DataFrame(np.nan, index=mean.index, columns=mean.columns)
    return Table("resolution", title, mean, std, pd.Series(1, index=mean.index), info, row_header="Split", note=note)
