"""Bar figures of the report: the main per-task figure, every method per task, and ablation bars.

Every value axis starts at 0 and ends at 100 (or past the largest bar, rounded up to 10). A bar's
whisker is the 95% interval of its mean (`Table.low`, `Table.high`); where a table has none for a
cell (NaN, or no interval frames) that bar has no whisker and nothing stands in its place (no std).
Rows keep the table's order and the family colours of `tatr.report.style`, a family's rows side by
side with a small gap between families, so a method and its trust-region variants read as a group.
Where a bar's category is a method, bars are horizontal: long labels stay level and readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tatr.report.render import Table
from tatr.report.selection import AVERAGE, NORMALIZED
from tatr.report.style import (
    MIN_FONT,
    PAGE_WIDTH,
    STYLE,
    bar_style,
    family_of,
    fit_xticks,
    legend_columns,
    new_figure,
    parse_label,
    text_width,
    wrap,
)

FAMILY_GAP = 0.4  # extra space between two families' bars, in bars
MAIN_FAMILIES = {("pretrained", "off"), ("individual", "off"), ("ta", "off"), ("ta", "zero-shot")}
MAIN_FAMILIES |= {("ta", "exemplar"), ("ties-sum", "off"), ("ties-sum", "zero-shot")}
NOT_PLUGIN = {"pretrained", "individual", "ta", "ties-sum", "ties-mean"}  # the best plug-in pair is another method
WHISKERS = "whiskers: 95% interval"
_WHISKER_KW = {"fmt": "none", "ecolor": "black", "elinewidth": 0.8, "capsize": 2.5, "capthick": 0.8, "zorder": 3}


# --- shared pieces ---------------------------------------------------------------------------------
def positions(labels: Sequence[object]) -> np.ndarray:
    """One slot per row, `FAMILY_GAP` more where the family (or the model) changes."""
    out, at, before = [], 0.0, None
    for label in labels:
        parts = parse_label(label)
        key = (family_of(label) or parts.base, parts.model)
        at += FAMILY_GAP if before is not None and key != before else 0.0
        out.append(at)
        at, before = at + 1.0, key
    return np.asarray(out)


def bounds(table: Table, rows: Sequence[object], columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The 95% interval of each (row, column) mean, NaN where the table has none."""

    def aligned(frame: object) -> np.ndarray:
        if frame is None or getattr(frame, "empty", True):
            return np.full((len(rows), len(columns)), np.nan)
        return frame.reindex(index=list(rows), columns=list(columns)).to_numpy(dtype=float)

    return aligned(table.low), aligned(table.high)


def whiskers(ax: Axes, at: np.ndarray, mean: np.ndarray, low: np.ndarray, high: np.ndarray, horizontal: bool) -> bool:
    """Draw the intervals that exist; True when any was drawn."""
    ok = np.isfinite(mean) & np.isfinite(low) & np.isfinite(high)
    if not ok.any():
        return False
    err = np.vstack([np.clip(mean - low, 0, None), np.clip(high - mean, 0, None)])[:, ok]
    if horizontal:
        ax.errorbar(mean[ok], at[ok], xerr=err, **_WHISKER_KW)
    else:
        ax.errorbar(at[ok], mean[ok], yerr=err, **_WHISKER_KW)
    return True


def value_top(*arrays: np.ndarray) -> float:
    """100, or the largest value (bar or whisker end) rounded up to 10 when it is past 100."""
    values = np.concatenate([np.ravel(a) for a in arrays])
    values = values[np.isfinite(values)]
    top = float(values.max()) if values.size else 100.0
    return 100.0 if top <= 100.0 else 10.0 * math.ceil(top / 10.0)


def value_axis(ax: Axes, top: float, horizontal: bool, label: str, ticks: Sequence[float] | None = None) -> None:
    ticks = list(ticks) if ticks is not None else list(np.arange(0, top + 1e-9, 20.0))
    if horizontal:
        ax.set_xlim(0, top)
        ax.set_xticks(ticks)
        ax.set_xlabel(label)
        ax.grid(axis="y", visible=False)
    else:
        ax.set_ylim(0, top)
        ax.set_yticks(ticks)
        ax.set_ylabel(label)
        ax.grid(axis="x", visible=False)


def family_legend(fig: Figure, labels: list[str]) -> None:
    """Above the plot: one column per family (the baselines share one), so a method's trust-region
    variants sit under it; entries in rows when those columns would not fit across the page."""
    columns: list[list[str]] = []
    for label in labels:
        family = family_of(label) or parse_label(label).base
        key = "baseline" if family in ("pretrained", "individual") else (family, parse_label(label).model)
        if columns and columns[-1][0] == key:
            columns[-1].append(label)
        else:
            columns.append([key, label])
    groups = [c[1:] for c in columns]
    width = sum(max(text_width(s) for s in g) + 4.5 * MIN_FONT for g in groups)
    if width <= PAGE_WIDTH * 72 - 12:
        depth = max(len(g) for g in groups)
        entries = [g[i] if i < len(g) else None for g in groups for i in range(depth)]
        ncols = len(groups)
    else:
        entries, ncols = list(labels), legend_columns(labels)
    handles = [
        Rectangle((0, 0), 1, 1, **bar_style(s).kwargs()) if s else Rectangle((0, 0), 0, 0, visible=False)
        for s in entries
    ]
    fig.legend(handles, [s or "" for s in entries], loc="outside upper center", ncols=ncols)


# --- the main figure ---------------------------------------------------------------------------------
def main_subset(table: Table) -> list[str]:
    """The rows the main figure shows, in table order: Pretrained, Individual, TA and its zero-shot and
    exemplar trust region, TIES (dis-sum) ± TR, and the best plug-in pair: of the other methods, the one
    whose trust-region row (zero-shot, else its first) has the highest Average, with the method itself.
    With several models (" [model]" labels) each model gets its own pair. Empty for an empty table."""
    rows = [str(r) for r in table.mean.index]
    parts, families = [parse_label(r) for r in rows], [family_of(r) for r in rows]
    chosen = {i for i, (f, p) in enumerate(zip(families, parts, strict=True)) if (f, p.mode) in MAIN_FAMILIES}
    average = table.mean[AVERAGE].to_numpy(dtype=float) if AVERAGE in table.mean else np.full(len(rows), np.nan)
    trust_region: dict[tuple[str, str], int] = {}  # each other method's trust-region row: zero-shot, else its first
    for i, (family, p) in enumerate(zip(families, parts, strict=True)):
        if family is None or family in NOT_PLUGIN or p.mode == "off":
            continue
        key = (family, p.model)
        if key not in trust_region or (p.mode == "zero-shot" and parts[trust_region[key]].mode != "zero-shot"):
            trust_region[key] = i
    best: dict[str, int] = {}  # per model, the highest Average (the first in table order on a tie)
    for (_, model), i in trust_region.items():
        if np.isfinite(average[i]) and (model not in best or average[i] > average[best[model]]):
            best[model] = i
    for i in best.values():
        same = [j for j in range(len(rows)) if families[j] == families[i] and parts[j].model == parts[i].model]
        chosen |= {i, *(j for j in same if parts[j].mode == "off")}
    return [rows[i] for i in sorted(chosen)]


def methods_per_task(table: Table, skip: Sequence[str] = ()) -> Figure | None:
    """Grouped bars of the main subset (`main_subset`; all rows when it finds none): the tasks and their
    average on x, one bar per row (its mean over seeds) with its 95% interval, accuracy from 0."""
    if table.empty:
        return None
    rows = [r for r in (main_subset(table) or map(str, table.mean.index)) if r not in skip]
    tasks = [c for c in table.mean.columns if c not in (AVERAGE, NORMALIZED)]
    if not rows or not tasks:
        return None
    index = {str(r): r for r in table.mean.index}
    keys = [index[r] for r in rows]
    columns = [*tasks, AVERAGE] if AVERAGE in table.mean.columns else tasks
    means = table.mean.reindex(index=keys, columns=columns).to_numpy(dtype=float)
    low, high = bounds(table, keys, columns)
    fig, ax = new_figure(3.6)
    with matplotlib.rc_context(STYLE):
        slots = positions(rows)
        width = 0.84 / (slots[-1] + 1)
        offsets = -0.42 + (slots + 0.5) * width
        drawn = False
        for i, row in enumerate(rows):
            at = np.arange(len(columns)) + offsets[i]
            ax.bar(at, means[i], width, label=row, **bar_style(row).kwargs())
            drawn |= whiskers(ax, at, means[i], low[i], high[i], horizontal=False)
        if AVERAGE in columns:
            ax.axvline(len(columns) - 1.5, color="0.6", linewidth=0.6, linestyle="--")
        value_axis(ax, value_top(means, high), False, "test accuracy (%)" + (f"; {WHISKERS}" if drawn else ""))
        ax.set_xlim(-0.55, len(columns) - 0.45)
        family_legend(fig, rows)
        fit_xticks(fig, ax, np.arange(len(columns)), [str(c) for c in columns])
    return fig


def methods_per_task_all(table: Table) -> Figure | None:
    """Every row of the table, one small panel per task and one for the average (horizontal bars from 0,
    method names once per line of panels, the table's order top to bottom, 95% interval whiskers)."""
    if table.empty:
        return None
    columns = [c for c in table.mean.columns if c != NORMALIZED]
    if not columns:
        return None
    keys = list(table.mean.index)
    rows = [str(r) for r in keys]
    means = table.mean.reindex(columns=columns).to_numpy(dtype=float)
    low, high = bounds(table, keys, columns)
    top = value_top(means, high)
    label_width = max(text_width(r) for r in rows) / 72 + 0.35
    titles = [str(c) for c in columns]
    word = max(text_width(w, MIN_FONT) for t in titles for w in t.replace("-", "- ").split()) / 72
    panel = max(0.6, word + 0.1) + 0.25  # inches, the gap between panels included
    per_line = max(1, min(len(columns), int((PAGE_WIDTH - label_width) // panel)))
    lines = math.ceil(len(columns) / per_line)
    per_line = math.ceil(len(columns) / lines)
    slots = positions(rows)
    height = lines * ((slots[-1] + 1) * 0.16 + 1.0)
    fig, axes = new_figure(height, nrows=lines, ncols=per_line, sharey=True)
    axes = np.atleast_1d(axes).ravel()
    chars = max(4, int((PAGE_WIDTH - label_width) / per_line * 72 / (0.62 * MIN_FONT)))
    with matplotlib.rc_context(STYLE):
        fig.get_layout_engine().set(wspace=0.25 * (per_line - 1) / PAGE_WIDTH)
        drawn = False
        for j in range(len(columns)):
            ax = axes[j]
            for i, row in enumerate(rows):
                ax.barh(slots[i], means[i, j], 0.8, **bar_style(row).kwargs())
            drawn |= whiskers(ax, slots, means[:, j], low[:, j], high[:, j], horizontal=True)
            value_axis(ax, top, True, "", ticks=[0, top])
            ax.set_xticks([top / 2], minor=True)
            ax.grid(axis="x", which="minor", visible=True)
            ax.set_title(wrap(titles[j], chars), fontsize=MIN_FONT)
            ax.tick_params(axis="y", length=0)
        axes[0].set_yticks(slots, rows)
        axes[0].set_ylim(slots[-1] + 0.7, -0.7)  # the table's first row on top
        for ax in axes[len(columns) :]:
            ax.set_visible(False)
        fig.supxlabel("test accuracy (%)" + (f"; {WHISKERS}" if drawn else ""), fontsize=STYLE["axes.labelsize"])
    return fig


# --- ablation bars -----------------------------------------------------------------------------------
def variant_bars(table: Table, column: str = AVERAGE, ylabel: str = "avg test accuracy (%)") -> Figure | None:
    """One horizontal bar per row of an ablation table, in its order, from 0, with its 95% interval and
    its value written beside it. `ylabel` names the value axis (kept from when bars were vertical)."""
    if table.empty or column not in table.mean:
        return None
    keys = list(table.mean.index)
    rows = [str(r) for r in keys]
    mean = table.mean[column].to_numpy(dtype=float)
    low, high = (b[:, 0] for b in bounds(table, keys, [column]))
    slots = positions(rows)
    fig, ax = new_figure(max(2.0, (slots[-1] + 1) * 0.22 + 1.0))
    with matplotlib.rc_context(STYLE):
        for i, row in enumerate(rows):
            ax.barh(slots[i], mean[i], 0.75, **bar_style(row, fallback=i).kwargs())
        drawn = whiskers(ax, slots, mean, low, high, horizontal=True)
        ends = np.fmax(mean, np.where(np.isfinite(low) & np.isfinite(high), high, mean))  # past the whisker
        for at, m, end in zip(slots, mean, ends, strict=True):
            if np.isfinite(m):
                ax.annotate(f"{m:.{table.digits}f}", (end, at), xytext=(4, 0), textcoords="offset points", va="center")
        value_axis(ax, value_top(mean, high), True, ylabel + (f"; {WHISKERS}" if drawn else ""))
        ax.set_yticks(slots, rows)
        ax.set_ylim(slots[-1] + 0.7, -0.7)
        ax.set_ylabel(table.row_header)
        ax.tick_params(axis="y", length=0)
    return fig
