"""Paper figures from the store's tables: matplotlib (no pyplot, no GUI), one column wide, byte-for-byte repeatable.

Why fixed rcParams and no timestamps: figures are committed, and a re-run on the same store must
produce the same bytes so that a diff means the numbers changed. Each function takes prepared
pandas data (see `tatr.report.selection` and `tatr.report.tables`) and returns a `Figure`, or None
when the store has nothing to draw; saving is the caller's job (`save`), so notebooks can show the
same figure interactively.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tatr.core.cache import atomic_write
from tatr.report.labels import drop_text, label_rank
from tatr.report.render import Table
from tatr.report.selection import AVERAGE, NORMALIZED
from tatr.report.tables import correlation_frame, curve_frame
from tatr.store.schema import AblationKind

COLUMN_WIDTH = 3.3  # inches: one column of a two-column paper
DPI = 220
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 7,
    "axes.titlesize": 7.5,
    "axes.labelsize": 7,
    "legend.fontsize": 6,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.4,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.bbox": "standard",
    "pdf.fonttype": 42,
    "svg.hashsalt": "tatr",
    "image.cmap": "viridis",
}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def new_figure(height: float = 2.2, width: float = COLUMN_WIDTH) -> tuple[Figure, Axes]:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
    return fig, ax


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


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


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


def sweep_heatmap(df: pd.DataFrame) -> Figure | None:
    found = sweep_grid(df)
    if found is None:
        return None
    grid, source = found
    fig, ax = new_figure(2.5)
    with matplotlib.rc_context(STYLE):
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(grid.shape[1]), [drop_text(d) for d in grid.columns], rotation=45, ha="right")
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        ax.set_xlabel("dropped fraction 1−q")
        ax.set_ylabel("λ")
        ax.grid(False)
        if np.isfinite(values).any():
            i, j = np.unravel_index(np.nanargmax(values), values.shape)
            ax.plot(j, i, marker="*", color="white", markersize=7, markeredgecolor="black", markeredgewidth=0.4)
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.set_label("validation accuracy (%)")
        ax.set_title(f"Validation accuracy, {source}", fontsize=6.5)
    return fig


# --- curves ---------------------------------------------------------------------------------------
def _curve(ax: Axes, x: np.ndarray, mean: np.ndarray, std: np.ndarray, label: str, color: str) -> None:
    ax.plot(x, mean, marker="o", label=label, color=color)
    if np.isfinite(std).any():
        s = np.nan_to_num(std)
        ax.fill_between(x, mean - s, mean + s, color=color, alpha=0.2, linewidth=0)


def mask_ratio_curve(df: pd.DataFrame) -> Figure | None:
    """Average test accuracy against the dropped fraction (log axis); q=1 drawn as a dashed line."""
    wide = curve_frame(df, AblationKind.MASK_RATIO, "drop")
    if wide.empty:
        return None
    fig, ax = new_figure()
    with matplotlib.rc_context(STYLE):
        labels = sorted(wide["label"].unique(), key=label_rank)
        for i, label in enumerate(labels):
            sub = wide[wide["label"] == label]
            stats = sub.groupby("drop")[AVERAGE].agg(["mean", "std"]).sort_index()
            inside = stats[stats.index > 0]
            if not inside.empty:
                _curve(
                    ax, inside.index.to_numpy(), inside["mean"].to_numpy(), inside["std"].to_numpy(), label, _color(i)
                )
            if 0.0 in stats.index:
                ax.axhline(stats.at[0.0, "mean"], color=_color(i), linestyle="--", linewidth=0.8, label=f"{label}, q=1")
        ax.set_xscale("log")
        ax.set_xlabel("dropped fraction 1−q")
        ax.set_ylabel("avg test accuracy (%)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: drop_text(v)))
        ax.legend(frameon=False)
    return fig


def exemplar_curve(df: pd.DataFrame) -> Figure | None:
    """Average test accuracy against exemplars per task (log₂ axis), mean ± std band over seeds."""
    wide = curve_frame(df, AblationKind.EXEMPLAR_COUNT, "exemplars")
    if wide.empty:
        return None
    fig, ax = new_figure()
    with matplotlib.rc_context(STYLE):
        labels = sorted(wide["label"].unique(), key=label_rank)
        for i, label in enumerate(labels):
            sub = wide[wide["label"] == label]
            stats = sub.groupby("exemplars")[AVERAGE].agg(["mean", "std", "count"]).sort_index()
            seeds = int(stats["count"].max())
            name = f"{label} (mean ± std, {seeds} seeds)" if seeds > 1 else label
            _curve(ax, stats.index.to_numpy(), stats["mean"].to_numpy(), stats["std"].to_numpy(), name, _color(i))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("exemplars per task")
        ax.set_ylabel("avg test accuracy (%)")
        ax.legend(frameon=False)
    return fig


# --- bars ---------------------------------------------------------------------------------------
def variant_bars(table: Table, column: str = AVERAGE, ylabel: str = "avg test accuracy (%)") -> Figure | None:
    """One bar per row of an ablation table, ± std over seeds as error bars."""
    if table.empty or column not in table.mean:
        return None
    mean = table.mean[column].to_numpy(dtype=float)
    std = table.std[column].to_numpy(dtype=float) if column in table.std else np.full_like(mean, np.nan)
    fig, ax = new_figure(2.0)
    with matplotlib.rc_context(STYLE):
        x = np.arange(len(mean))
        colors = [_color(i) for i in range(len(mean))]
        err = np.where(np.isfinite(std), std, 0.0)
        ax.bar(x, mean, color=colors, yerr=err if np.any(err > 0) else None, capsize=2, error_kw={"linewidth": 0.6})
        ax.set_xticks(
            x,
            [str(i) for i in table.mean.index],
            rotation=20 if len(x) > 3 else 0,
            ha="right" if len(x) > 3 else "center",
        )
        lo = np.nanmin(mean - err) if np.isfinite(mean).any() else 0.0
        hi = np.nanmax(mean + err) if np.isfinite(mean).any() else 1.0
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        for xi, m in zip(x, mean, strict=True):
            if np.isfinite(m):
                ax.annotate(f"{m:.1f}", (xi, m), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=5.5)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(table.row_header)
        ax.grid(axis="x", visible=False)
    return fig


def methods_per_task(table: Table, skip: Sequence[str] = ()) -> Figure | None:
    """Grouped bars: the tasks on x, one bar per method of the main table (its mean over seeds)."""
    if table.empty:
        return None
    rows = [r for r in table.mean.index if r not in skip]
    tasks = [c for c in table.mean.columns if c not in (AVERAGE, NORMALIZED)]
    if not rows or not tasks:
        return None
    fig, ax = new_figure(2.6)
    with matplotlib.rc_context(STYLE):
        width = 0.8 / len(rows)
        x = np.arange(len(tasks) + 1)
        for i, row in enumerate(rows):
            values = [*table.mean.loc[row, tasks].to_numpy(dtype=float), float(table.mean.at[row, AVERAGE])]
            ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=str(row), color=_color(i), linewidth=0)
        ax.set_xticks(x, [*tasks, "avg"], rotation=35, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="x", visible=False)
        ax.legend(frameon=False, ncols=min(3, len(rows)), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return fig


# --- gradient correlation -----------------------------------------------------------------------
def correlation_heatmap(df: pd.DataFrame) -> Figure | None:
    mean, _, seeds = correlation_frame(df)
    if mean.empty:
        return None
    fig, ax = new_figure(2.9)
    with matplotlib.rc_context(STYLE):
        values = mean.to_numpy(dtype=float)
        image = ax.imshow(values, cmap="magma", vmin=min(0.0, float(np.nanmin(values))), vmax=1.0)
        labels = list(mean.index)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.grid(False)
        for (i, j), v in np.ndenumerate(values):
            if i != j:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=4.5, color="white" if v < 0.6 else "black")
        bar = fig.colorbar(image, ax=ax, shrink=0.85)
        bar.set_label("Spearman ρ of mean |∇|")
        if seeds > 1:
            ax.set_title(f"mean over {seeds} seeds", fontsize=6)
    return fig
