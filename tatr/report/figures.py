"""Paper figures from the store's tables: matplotlib (no pyplot, no GUI), page-wide, byte-for-byte repeatable.

Why fixed rcParams and no timestamps: figures are committed, and a re-run on the same store must
produce the same bytes so that a diff means the numbers changed. Each function takes prepared
pandas data (see `tatr.report.selection` and `tatr.report.tables`) and returns a `Figure`, or None
when the store has nothing to draw; saving is the caller's job (`save`), so notebooks can show the
same figure interactively.

How they look is `tatr.report.style` (7 in wide at 200 dpi, fonts of 8 pt and more, one colour per
method family, its trust-region variants in a darker tone of it); the bar figures are
`tatr.report.figures_bars`, re-exported here. Bar charts start their value axis at 0. The curves
(mask ratio, exemplar count) zoom their value axis onto the data, since their differences are
fractions of a point: `ZOOMED` names those figures and `axis_note` gives the caption's sentence.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure

from tatr.core.cache import atomic_write
from tatr.report.figures_bars import main_subset, methods_per_task, methods_per_task_all, variant_bars
from tatr.report.labels import drop_text, label_rank
from tatr.report.render import Table
from tatr.report.selection import AVERAGE
from tatr.report.style import (
    COLUMN_WIDTH,
    DPI,
    MIN_FONT,
    PAGE_WIDTH,
    PALETTE,
    STYLE,
    fit_xticks,
    legend_columns,
    line_style,
    new_figure,
)
from tatr.report.tables import ablation_table, correlation_frame, curve_frame
from tatr.store.schema import AblationKind

__all__ = [
    "COLUMN_WIDTH",
    "DPI",
    "PAGE_WIDTH",
    "PALETTE",
    "STYLE",
    "ZOOMED",
    "axis_note",
    "correlation_heatmap",
    "exemplar_curve",
    "main_subset",
    "mask_ratio_curve",
    "methods_per_task",
    "methods_per_task_all",
    "new_figure",
    "save",
    "selection_curve",
    "sweep_grid",
    "sweep_heatmap",
    "variant_bars",
]

# The report's figures (by the names `tatr.report.build` saves them under, and by function) whose value
# axis does not start at 0; every other figure's does, or has no value axis (the heatmaps' colour scales).
ZOOMED = frozenset(
    {"mask_ratio", "exemplar_count", "mask_ratio_curve", "exemplar_curve", "exemplar_selection", "selection_curve"}
)


def axis_note(name: str) -> str:
    """The caption's sentence about the value axis of figure `name`: '' where it starts at 0."""
    return "The accuracy axis is zoomed onto the data: it does not start at 0." if name in ZOOMED else ""


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write `stem`.png and `stem`.pdf atomically, without timestamps (same store → same bytes)."""
    paths = []
    with matplotlib.rc_context(STYLE):
        for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "ModDate": None})):
            path = stem.with_suffix(f".{ext}")
            with atomic_write(path, suffix=f".{ext}") as tmp:
                fig.savefig(tmp, format=ext, metadata=meta)
                tmp.chmod(0o644)  # mkstemp makes 0600; these are published files
            paths.append(path)
    return paths


# --- λ × q heatmap ------------------------------------------------------------------------------
def sweep_grid(df: pd.DataFrame, max_levels: int = 16, bins: int = 10) -> tuple[pd.DataFrame, str] | None:
    """Validation accuracy (task average) on a λ × (1−q) grid, and where it came from.

    Source: the sweep's trials (job_type 'trial') of the study with the most trials; without any,
    the largest (q, λ) validation grid an ablation recorded for one trust-region method and seed.
    Grids with few distinct values are shown as they are; Optuna's continuous samples are binned
    (λ linear, 1−q log), best per bin.
    """
    val = df[df["split"] == "validation"]
    trials = val[val["job_type"] == "trial"]
    if not trials.empty:
        counts = trials.groupby("study")["run_id"].nunique().sort_index()
        study = counts.idxmax()
        rows, source = trials[trials["study"] == study], f"sweep '{study}'"
    else:
        grid = val[(val["job_type"] == "ablation") & (val["trust_region"].fillna("off") != "off")]
        grid = grid.dropna(subset=["q", "lam"])
        if grid.empty:
            return None
        keys = ["ablation", "label", "seed_key"]
        shape = grid.groupby(keys).agg(q=("q", "nunique"), lam=("lam", "nunique"), cells=("run_id", "nunique"))
        shape = shape[(shape["q"] > 1) & (shape["lam"] > 1)].sort_index()
        if shape.empty:
            return None
        kind, label, seed = shape["cells"].idxmax()  # the largest grid; first in sorted order on a tie
        rows = grid[(grid["ablation"] == kind) & (grid["label"] == label) & (grid["seed_key"] == seed)]
        source = f"grid of ablation '{kind}' ({label})"
    rows = rows.dropna(subset=["q", "lam", "accuracy"])
    if rows.empty:
        return None
    per_trial = rows.groupby("run_id").agg(lam=("lam", "first"), q=("q", "first"), acc=("accuracy", "mean"))
    per_trial["drop"] = (1.0 - per_trial["q"]).round(12)
    if per_trial["lam"].nunique() <= max_levels and per_trial["drop"].nunique() <= max_levels:
        grid = per_trial.pivot_table(index="lam", columns="drop", values="acc", aggfunc="max")
        return grid.sort_index().sort_index(axis=1), source
    lam_edges = np.linspace(per_trial["lam"].min(), per_trial["lam"].max(), bins + 1)
    positive = per_trial["drop"][per_trial["drop"] > 0]
    lo = positive.min() if not positive.empty else 1e-4
    drop_edges = np.geomspace(lo, max(per_trial["drop"].max(), lo * 10), bins + 1)
    lam_bin = np.clip(np.digitize(per_trial["lam"], lam_edges) - 1, 0, bins - 1)
    drop_bin = np.clip(np.digitize(per_trial["drop"].clip(lower=lo), drop_edges) - 1, 0, bins - 1)
    centers_lam = (lam_edges[:-1] + lam_edges[1:]) / 2
    centers_drop = np.sqrt(drop_edges[:-1] * drop_edges[1:])
    binned = per_trial.assign(lam=centers_lam[lam_bin].round(4), drop=centers_drop[drop_bin].round(8))
    grid = binned.pivot_table(index="lam", columns="drop", values="acc", aggfunc="max")
    return grid.sort_index().sort_index(axis=1), source + ", binned (best per cell)"


def _cells(ax: Axes, values: np.ndarray, cmap: str, **norm: float) -> QuadMesh:
    """A heatmap of vector cells (PDF stays vector, unlike `imshow`), cell (i, j) centred at (j, i)."""
    rows, cols = values.shape
    x, y = np.arange(cols + 1) - 0.5, np.arange(rows + 1) - 0.5
    mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(values), cmap=cmap, shading="flat", **norm)
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(y[0], y[-1])
    return mesh


def sweep_heatmap(df: pd.DataFrame) -> Figure | None:
    """Validation accuracy over λ × (1−q), the best cell starred; tick labels level where they fit."""
    found = sweep_grid(df)
    if found is None:
        return None
    grid, source = found
    fig, ax = new_figure(3.8)
    with matplotlib.rc_context(STYLE):
        values = grid.to_numpy(dtype=float)
        image = _cells(ax, values, "viridis")
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        ax.set_xlabel("dropped fraction 1−q")
        ax.set_ylabel("λ")
        ax.grid(False)
        ax.spines[:].set_visible(False)
        if np.isfinite(values).any():
            i, j = np.unravel_index(np.nanargmax(values), values.shape)
            ax.plot(j, i, marker="*", color="white", markersize=11, markeredgecolor="black", markeredgewidth=0.6)
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.solids.set_rasterized(False)  # colorbars rasterize many levels: keep the PDF vector
        bar.set_label("validation accuracy (%)")
        ax.set_title(textwrap.fill(f"Validation accuracy, {source}", 90))
        fit_xticks(fig, ax, range(grid.shape[1]), [drop_text(d) for d in grid.columns])
    return fig


# --- curves ---------------------------------------------------------------------------------------
def _curve(
    ax: Axes, x: np.ndarray, mean: np.ndarray, band: tuple[np.ndarray, np.ndarray], label: str, index: int, name: str
) -> None:
    """One series in its family's style (`line_style(label)`), shown as `name`, with its band (low, high)."""
    style = line_style(label, fallback=index)
    ax.plot(x, mean, label=name, color=style.color, linestyle=style.linestyle, marker=style.marker)
    low, high = band
    if np.isfinite(low).any():
        ax.fill_between(x, low, high, color=style.color, alpha=0.18, linewidth=0)


def _band(
    table: Table, label: str, xs: np.ndarray, fmt: Callable[[float], str], stats: pd.DataFrame
) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """The band of a series and what it is: the 95% interval of each point from the stored predictions
    (`Table.low`/`high`, seeds then examples), else mean ± std over seeds, else none."""
    rows = [fmt(x) for x in xs]
    if label in table.low.columns:
        low = table.low[label].reindex(rows).to_numpy(dtype=float)
        high = table.high[label].reindex(rows).to_numpy(dtype=float)
        if np.isfinite(low).all():
            return (low, high), "95% interval"
    std = stats["std"].to_numpy(dtype=float)
    mean = stats["mean"].to_numpy(dtype=float)
    if np.isfinite(std).any():
        s = np.nan_to_num(std)
        return (mean - s, mean + s), "mean ± std"
    return (np.full_like(mean, np.nan), np.full_like(mean, np.nan)), ""


def _series_name(label: str, seeds: int, band: str) -> str:
    parts = [p for p in (f"{seeds} seeds" if seeds > 1 else "", band) if p]
    return f"{label} ({', '.join(parts)})" if parts else label


def _curve_axes(fig: Figure, ax: Axes, xlabel: str) -> None:
    """Shared finish: labels, a zoomed value axis (see `ZOOMED`), the legend above the plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("avg test accuracy (%)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=legend_columns(labels))


def mask_ratio_curve(df: pd.DataFrame) -> Figure | None:
    """Average test accuracy against the dropped fraction (log axis), with each point's 95% interval as
    a band (`_band`); q=1 (nothing dropped) drawn as a dotted line in the series' colour, its marker
    hollow. The value axis is zoomed (`ZOOMED`)."""
    wide = curve_frame(df, AblationKind.MASK_RATIO, "drop")
    if wide.empty:
        return None
    table = ablation_table(df, AblationKind.MASK_RATIO)
    fig, ax = new_figure(3.4)
    with matplotlib.rc_context(STYLE):
        labels = sorted(wide["label"].unique(), key=label_rank)
        for i, label in enumerate(labels):
            sub = wide[wide["label"] == label]
            stats = sub.groupby("drop")[AVERAGE].agg(["mean", "std", "count"]).sort_index()
            inside = stats[stats.index > 0]
            if not inside.empty:
                x, mean = inside.index.to_numpy(), inside["mean"].to_numpy()
                band, what = _band(table, label, x, drop_text, inside)
                _curve(ax, x, mean, band, label, i, _series_name(label, int(stats["count"].max()), what))
            if 0.0 in stats.index:  # nothing dropped: dotted, the series' marker hollow at its right end
                style = line_style(label, fallback=i)
                ax.axhline(
                    stats.at[0.0, "mean"], color=style.color, linestyle=":", linewidth=1.0, label=f"{label}, q=1",
                    marker=style.marker, markerfacecolor="white", markevery=[1], clip_on=False,
                )  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: drop_text(v)))
        _curve_axes(fig, ax, "dropped fraction 1−q")
    return fig


def exemplar_curve(df: pd.DataFrame) -> Figure | None:
    """Average test accuracy against exemplars per task (log₂ axis), with each point's 95% interval as a
    band (`_band`). The value axis is zoomed (`ZOOMED`)."""
    wide = curve_frame(df, AblationKind.EXEMPLAR_COUNT, "exemplars")
    if wide.empty:
        return None
    table = ablation_table(df, AblationKind.EXEMPLAR_COUNT)
    fig, ax = new_figure(3.4)
    with matplotlib.rc_context(STYLE):
        labels = sorted(wide["label"].unique(), key=label_rank)
        for i, label in enumerate(labels):
            sub = wide[wide["label"] == label]
            stats = sub.groupby("exemplars")[AVERAGE].agg(["mean", "std", "count"]).sort_index()
            x = stats.index.to_numpy()
            band, what = _band(table, label, x, lambda v: f"{int(v)}", stats)
            name = _series_name(label, int(stats["count"].max()), what)
            _curve(ax, x, stats["mean"].to_numpy(), band, label, i, name)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        _curve_axes(fig, ax, "exemplars per task")
    return fig


def selection_curve(df: pd.DataFrame) -> Figure | None:
    """Exemplar selection: average test accuracy against exemplars per task (log₂ axis), one curve per
    series (a colour each; solid: random, dashed: the other selections), each point's 95% interval as a band
    (`_band`). The value axis is zoomed (`ZOOMED`)."""
    table = ablation_table(df, AblationKind.EXEMPLAR_SELECTION)
    if table.empty:
        return None
    fig, ax = new_figure(3.4)
    with matplotlib.rc_context(STYLE):
        x = np.array([int(v) for v in table.mean.index])
        columns = [str(c) for c in table.mean.columns]
        for i, label in enumerate(columns):
            stats = pd.DataFrame({"mean": table.mean[label].to_numpy(), "std": table.std[label].to_numpy()}, index=x)
            shown = stats["mean"].notna().to_numpy()
            band, what = _band(table, label, x, lambda v: f"{int(v)}", stats)
            color = PALETTE[i % len(PALETTE)]
            random = "random" in label.lower()
            name = _series_name(label, int(table.seeds.max()), what)
            mean = stats["mean"].to_numpy()
            ax.plot(
                x[shown], mean[shown], label=name, color=color, linestyle="-" if random else "--", marker="os"[i % 2]
            )
            low, high = (b[shown] for b in band)
            if np.isfinite(low).any():
                ax.fill_between(x[shown], low, high, color=color, alpha=0.18 if random else 0.10, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        _curve_axes(fig, ax, "exemplars per task")
    return fig


# --- gradient correlation -----------------------------------------------------------------------
def correlation_heatmap(df: pd.DataFrame) -> Figure | None:
    """Task × task Spearman ρ; each cell's value written in it where the cell is wide enough for 8 pt
    text, left out (never shrunk) where it is not."""
    mean, _, seeds = correlation_frame(df)
    if mean.empty:
        return None
    fig, ax = new_figure(5.2)
    with matplotlib.rc_context(STYLE):
        values = mean.to_numpy(dtype=float)
        image = _cells(ax, values, "magma", vmin=min(0.0, float(np.nanmin(values))), vmax=1.0)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # the first task on top, as in the table
        labels = [str(t) for t in mean.index]
        ax.set_yticks(range(len(labels)), labels)
        ax.grid(False)
        ax.spines[:].set_visible(False)
        bar = fig.colorbar(image, ax=ax, shrink=0.85)
        bar.solids.set_rasterized(False)  # colorbars rasterize many levels: keep the PDF vector
        bar.set_label("Spearman ρ of mean |∇|")
        if seeds > 1:
            ax.set_title(f"mean over {seeds} seeds")
        fit_xticks(fig, ax, range(len(labels)), labels)
        cell = ax.get_window_extent().width / max(len(labels), 1) * 72 / fig.dpi  # points
        if cell >= 3.2 * MIN_FONT:  # "0.72" is about 2.5 × the font size wide
            for (i, j), v in np.ndenumerate(values):
                if i != j and np.isfinite(v):
                    r, g, b, _ = image.cmap(image.norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if dark else "black")
    return fig
