"""The report's figures on crowded, realistic inputs: readable at page width, one colour per family.

Each figure function is drawn on the largest input a report meets (17 methods × 8 tasks, 14 plug-in
variants with long labels, 8 long task names, a 16 × 16 sweep grid) and checked on the laid-out
canvas: no two tick labels of an axis touch, no text runs into the legend or into another text,
every font is at least 8 pt, the PNG is ≥ 1,200 px wide at ≥ 200 dpi, the PDF is vector, and the
same input gives the same bytes. The checks are this file's own (not `tatr.report.style.crowded`),
and `test_the_checks_can_fail` shows each one failing (on a figure drawn the old way: one column
wide, 6 pt, 17 bars per task, labels at 35°; a legend over the labels; a legend off the page).
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import rgb_to_hsv, to_rgb
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from PIL import Image

from tatr.core.methods import METHODS
from tatr.core.trust_region import MODES
from tatr.report import figures as F
from tatr.report import style as S
from tatr.report.labels import method_label
from tatr.report.render import Table
from tatr.report.tables import prepare

TASKS = ("SUN397", "Stanford Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
LONG_TASKS = (
    "en-topic-classification",
    "en-genre-classification",
    "de-topic-classification",
    "es-topic-classification",
    "it-source-attribution",
    "language-identification",
    "satellite-land-use",
    "street-view-house-numbers",
)
MAIN_ROWS = [
    "Pretrained",
    "Individual",
    *(
        method_label(m, tr)
        for m in ("ta", "ties-sum", "dare", "dare-ties", "breadcrumbs", "adamerging-task", "adamerging-layer")
        for tr in (None, "zero-shot", *(("exemplar",) if m == "ta" else ()))
    ),
]
PLUGIN_ROWS = [
    method_label(m, tr)
    for m in ("ta", "ties-sum", "ties-mean", "dare", "dare-ties", "breadcrumbs", "adamerging-layer")
    for tr in (None, "exemplar")
]


# --- inputs ------------------------------------------------------------------------------------------
def make_table(rows: list[str], tasks: tuple[str, ...], seed: int = 0, intervals: bool = True) -> Table:
    rng = np.random.default_rng(seed)
    cols = [*tasks, "Average", "Normalized"]
    mean = pd.DataFrame(rng.uniform(40, 95, (len(rows), len(cols))), index=rows, columns=cols)
    mean["Average"] = mean[list(tasks)].mean(axis=1)
    std = pd.DataFrame(rng.uniform(0.5, 2, mean.shape), index=rows, columns=cols)
    half = pd.DataFrame(rng.uniform(0.3, 3, mean.shape), index=rows, columns=cols)
    low, high = (mean - half, mean + half) if intervals else (pd.DataFrame(), pd.DataFrame())
    if intervals and len(rows) > 2:
        low.iloc[2, :] = np.nan  # a row with no predictions: no whiskers for it
    return Table("t", "t", mean, std, pd.Series(3, index=rows), low=low, high=high)


def store_rows(**fields: object) -> list[dict]:
    return [{"benchmark": "b", "git_commit": "c", "normalized_accuracy": 90.0, **fields}]


def curve_store(kind: str, x: str, values: list[float], labels: list[tuple[str, str]]) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows, clock = [], itertools.count()
    for (method, tr), v, seed in itertools.product(labels, values, (0, 1, 2)):
        run = f"{kind}-{method}-{tr}-{v}-{seed}"
        extra = {"q": 1 - v, "exemplars": 32} if x == "drop" else {"q": 0.99, "exemplars": v}
        for task in TASKS:
            rows += store_rows(
                run_id=run, job_type="ablation", ablation=kind, split="test", task=task, method=method,
                trust_region=tr, seed=seed, lam=0.3, accuracy=float(rng.uniform(68, 72)),
                timestamp=float(next(clock)), **extra,
            )  # fmt: skip
    return prepare(pd.DataFrame(rows))


def mask_store() -> pd.DataFrame:
    drops = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2]
    labels = [("ta", "zero-shot"), ("ta", "exemplar"), ("ties-sum", "zero-shot"), ("dare-ties", "exemplar")]
    return curve_store("mask-ratio", "drop", drops, labels)


def exemplar_store() -> pd.DataFrame:
    labels = [("ta", "exemplar"), ("ties-sum", "exemplar"), ("dare-ties", "exemplar")]
    return curve_store("exemplar-count", "exemplars", [1, 2, 4, 8, 16, 32, 64, 128], labels)


def sweep_store() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    lams = np.round(np.linspace(0.05, 1.5, 16), 3)
    drops = np.geomspace(1e-4, 0.5, 16)
    for i, (lam, drop) in enumerate(itertools.product(lams, drops)):
        rows += store_rows(
            run_id=f"t{i}", study="sweep", job_type="trial", split="validation", task="a", lam=lam,
            q=1 - drop, accuracy=float(rng.uniform(40, 90)), method="ta", trust_region="zero-shot",
            timestamp=float(i),
        )  # fmt: skip
    return prepare(pd.DataFrame(rows))


def correlation_store() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for seed in (0, 1, 2):
        for i, (a, b) in enumerate(itertools.combinations(LONG_TASKS, 2)):
            rows += store_rows(
                run_id=f"grad-{seed}", job_type="ablation", ablation="gradient-correlation", split="train",
                task=f"{a}|{b}", seed=seed, exemplars=32, accuracy=float(rng.uniform(0.2, 0.9)),
                timestamp=float(seed * 100 + i),
            )  # fmt: skip
    return prepare(pd.DataFrame(rows))


MAIN = make_table(MAIN_ROWS, TASKS)
PLUGIN = make_table(PLUGIN_ROWS, TASKS, seed=4)
COMPONENTS = make_table(["positive", "negative", "orthogonal", "all", "negative (λ_neg)+orthogonal"], TASKS, 5)
FIGURES: dict[str, Callable[[], Figure | None]] = {
    "methods_per_task": lambda: F.methods_per_task(MAIN),
    "methods_per_task_long_tasks": lambda: F.methods_per_task(make_table(MAIN_ROWS, LONG_TASKS)),
    "methods_per_task_all": lambda: F.methods_per_task_all(MAIN),
    "methods_per_task_all_long_tasks": lambda: F.methods_per_task_all(make_table(MAIN_ROWS, LONG_TASKS)),
    "variant_bars_main": lambda: F.variant_bars(MAIN),
    "variant_bars_plugin": lambda: F.variant_bars(PLUGIN),
    "variant_bars_components": lambda: F.variant_bars(COMPONENTS),
    "mask_ratio_curve": lambda: F.mask_ratio_curve(mask_store()),
    "exemplar_curve": lambda: F.exemplar_curve(exemplar_store()),
    "sweep_heatmap": lambda: F.sweep_heatmap(sweep_store()),
    "correlation_heatmap": lambda: F.correlation_heatmap(correlation_store()),
}


# --- the checks --------------------------------------------------------------------------------------
def draw(fig: Figure) -> None:
    FigureCanvasAgg(fig)
    with matplotlib.rc_context(F.STYLE):
        fig.canvas.draw()


def tick_labels(fig: Figure) -> dict[str, list[Text]]:
    """The tick labels each axis of each Axes draws (visible, non-empty, at a tick inside the view)."""
    out = {}
    for k, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            labels = [
                label
                for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]
                for label in (tick.label1, tick.label2)
                if label.get_visible() and label.get_text() and lo - 1e-9 <= tick.get_loc() <= hi + 1e-9
            ]
            out[f"axes {k} {name}"] = labels
    return out


def texts(fig: Figure) -> list[Text]:
    """Every text the figure draws outside its legends: tick labels, titles, axis labels, annotations."""
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for tick in
             [*axis.get_major_ticks(), *axis.get_minor_ticks()] for t in (tick.label1, tick.label2)}  # fmt: skip
    legends = {id(t) for leg in fig.findobj(Legend) for t in [*leg.get_texts(), leg.get_title()]}
    others = [
        t
        for t in fig.findobj(Text)
        if id(t) not in ticks and id(t) not in legends and t.get_visible() and t.get_text().strip()
        and (t.axes is None or t.axes.get_visible())
    ]  # fmt: skip
    return others + [t for labels in tick_labels(fig).values() for t in labels]


def touching(a: Bbox, b: Bbox, pad: float = 0.5) -> bool:
    return a.x0 < b.x1 - pad and b.x0 < a.x1 - pad and a.y0 < b.y1 - pad and b.y0 < a.y1 - pad


def overlaps(fig: Figure) -> list[str]:
    """Pairs of texts whose window extents overlap: tick labels of one axis, a text and a legend,
    or any two texts of the figure."""
    found = []
    for name, labels in tick_labels(fig).items():
        boxes = [(t.get_text(), t.get_window_extent()) for t in labels]
        found += [f"{name}: {a!r} / {b!r}" for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if touching(ba, bb)]
    legends = [leg.get_window_extent() for leg in fig.findobj(Legend) if leg.get_visible()]
    all_texts = [(t.get_text(), t.get_window_extent()) for t in texts(fig)]
    for text, box in all_texts:
        found += [f"legend / {text!r}" for leg in legends if touching(box, leg)]
    found += [f"{a!r} / {b!r}" for (a, ba), (b, bb) in itertools.combinations(all_texts, 2) if touching(ba, bb)]
    return sorted(set(found))


def small_fonts(fig: Figure) -> list[str]:
    shown = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return [f"{t.get_text()!r}: {t.get_fontsize()} pt" for t in shown if t.get_fontsize() < 8]


def outside(fig: Figure) -> list[str]:
    """Texts and legends that run off the canvas (clipped in the PNG)."""
    w, h = fig.canvas.get_width_height()
    page = Bbox.from_extents(-1, -1, w + 1, h + 1)
    boxes = [(t.get_text(), t.get_window_extent()) for t in texts(fig)]
    boxes += [("legend", leg.get_window_extent()) for leg in fig.findobj(Legend) if leg.get_visible()]
    return [text for text, box in boxes if not (page.contains(*box.p0) and page.contains(*box.p1))]


def png_and_pdf(fig: Figure, folder: Path) -> tuple[bytes, bytes]:
    png, pdf = F.save(fig, folder / "figure")
    return png.read_bytes(), pdf.read_bytes()


# --- readability ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_is_readable_at_page_width(name: str, tmp_path: Path) -> None:
    fig = FIGURES[name]()
    assert fig is not None
    draw(fig)
    assert overlaps(fig) == [], name
    assert small_fonts(fig) == [], name
    assert outside(fig) == [], name
    png, pdf = png_and_pdf(fig, tmp_path)
    image = Image.open(io.BytesIO(png))
    assert image.width >= 1200 and min(image.info["dpi"]) >= 199.9, (image.width, image.info.get("dpi"))
    assert png.__len__() < 300_000  # what tests/test_report.py allows a committed figure
    assert pdf.startswith(b"%PDF-") and b"/Subtype /Image" not in pdf  # vector: no raster inside


@pytest.mark.parametrize("name", ["methods_per_task", "methods_per_task_all", "variant_bars_plugin", "sweep_heatmap"])
def test_same_input_same_bytes(name: str, tmp_path: Path) -> None:
    first = png_and_pdf(FIGURES[name](), tmp_path / "a")
    assert png_and_pdf(FIGURES[name](), tmp_path / "b") == first


def old_style_bars(rows: list[str], tasks: tuple[str, ...]) -> Figure:
    """How `methods_per_task` drew before: one column wide, 6 pt, 17 bars per task, labels at 35°."""
    fig = Figure(figsize=(3.3, 2.6), dpi=220, layout="constrained")
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        ax.bar(np.arange(len(tasks)) + i * 0.05, np.full(len(tasks), 60.0), 0.05, label=row)
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right", fontsize=6)
    ax.legend(fontsize=6, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return fig


@pytest.mark.filterwarnings("ignore:constrained_layout not applied")
def test_the_checks_can_fail(tmp_path: Path) -> None:
    fig = old_style_bars(MAIN_ROWS, LONG_TASKS)
    draw(fig)
    found = overlaps(fig)
    assert any(f.startswith("axes 0 x:") for f in found)  # rotated long labels: their boxes overlap
    assert small_fonts(fig)
    assert Image.open(io.BytesIO(png_and_pdf(fig, tmp_path)[0])).width < 1200
    fig, ax = S.new_figure(2.0)  # a legend over the tick labels
    ax.set_xticks(range(3), ["one", "two", "three"])
    ax.legend([Rectangle((0, 0), 1, 1)], ["a legend"], loc="lower center", bbox_to_anchor=(0.5, -0.2))
    draw(fig)
    assert any(f.startswith("legend /") for f in overlaps(fig))
    fig, _ = S.new_figure(2.0)  # a legend off the page
    fig.legend([Rectangle((0, 0), 1, 1)], ["runs off the page"], loc="upper left", bbox_to_anchor=(0.9, 1.0))
    draw(fig)
    assert outside(fig) == ["legend"]


# --- colours -------------------------------------------------------------------------------------------
def lab(color: str) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB colour, for perceptual distances."""
    rgb = np.array(to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
    f = np.cbrt(xyz / np.array([0.9505, 1.0, 1.089]))
    f = np.where(
        xyz / np.array([0.9505, 1.0, 1.089]) > 0.008856, f, 7.787 * xyz / np.array([0.9505, 1, 1.089]) + 16 / 116
    )
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_every_family_has_its_own_colour() -> None:
    names = ["pretrained", "individual", *(m.name for m in METHODS.values())]
    assert set(S.FAMILY_COLORS) == set(names)
    light = {n: S.FAMILY_COLORS[n][0] for n in names}
    dark = {n: S.FAMILY_COLORS[n][1] for n in names if n not in ("pretrained", "individual")}
    for tones in (light, dark):
        for a, b in itertools.combinations(tones, 2):
            assert np.linalg.norm(lab(tones[a]) - lab(tones[b])) > 12, (a, b, tones[a], tones[b])
    for name, d in dark.items():  # the trust-region tone is the same hue, clearly darker
        assert lab(light[name])[0] - lab(d)[0] > 20, name
        hues = [rgb_to_hsv(to_rgb(c))[0] * 360 for c in (light[name], d)]
        assert min(abs(hues[0] - hues[1]), 360 - abs(hues[0] - hues[1])) < 25, (name, hues)
    # every (method, mode) bar is drawn differently from every other, and the mode is recognizable
    styles = {(m.name, mode): S.bar_style(method_label(m.name, None if mode == "off" else mode)) for m in
              METHODS.values() for mode in MODES}  # fmt: skip
    assert len(set(styles.values())) == len(styles)
    for (_, mode), style in styles.items():
        assert (style.hatch == "") == (mode in ("off", "zero-shot"))
    lines = {key: S.line_style(method_label(*key[:1], None if key[1] == "off" else key[1])) for key in styles}
    assert len(set(lines.values())) == len(lines)


def test_a_newly_registered_method_gets_a_colour_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    class Registered:
        def __init__(self, names: list[str]) -> None:
            self.names = names

        def values(self) -> list:
            return [type("M", (), {"name": n})() for n in self.names]

    names = [m.name for m in METHODS.values()]
    more = [*names, *(f"new-{i}" for i in range(8))]  # past the fixed list: generated hues
    monkeypatch.setattr(S, "METHODS", Registered(more))
    colors = S._family_colors()
    assert colors == S._family_colors()  # deterministic
    assert {n: colors[n] for n in names} == {n: S.FAMILY_COLORS[n] for n in names}  # the old ones keep theirs
    tones = [c for n in more for c in colors[n]]
    assert len(set(tones)) == len(tones)


@pytest.mark.parametrize("mode", [None, *MODES[1:], "ridge"])
@pytest.mark.parametrize("model", ["", " [ViT-B/32]"])
def test_family_is_read_back_from_any_label(mode: str | None, model: str) -> None:
    for m in METHODS.values():
        label = method_label(m.name, mode) + model
        parts = S.parse_label(label)
        assert S.family_of(label) == m.name, label
        assert parts == (m.label, mode or "off", model[2:-1])
        base = S.bar_style(m.label).color
        assert S.bar_style(label).edgecolor in ("white", S.FAMILY_COLORS[m.name][1])
        assert (S.bar_style(label).color == base) == (mode is None)
    assert S.family_of("Pretrained") == "pretrained" and S.family_of("Individual [ViT-L/14]") == "individual"
    assert S.family_of("negative (λ_neg)+orthogonal") is None


def test_legend_entries_and_bars_of_the_main_figure_are_distinct() -> None:
    fig = F.methods_per_task(MAIN)
    [legend] = fig.legends
    shown = [(h.get_facecolor(), h.get_hatch()) for h, t in zip(legend.legend_handles, legend.get_texts(),
             strict=True) if t.get_text()]  # fmt: skip
    assert len(shown) == len(F.main_subset(MAIN)) == len(set(shown))
    # the bars of a task: in table order, a method's trust-region variants right beside it
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    labels = [c.get_label() for c in bars]
    assert labels == F.main_subset(MAIN)
    x = np.array([c.patches[0].get_x() for c in bars])
    gaps = np.diff(x)
    same = np.array([S.family_of(a) == S.family_of(b) for a, b in itertools.pairwise(labels)])
    assert (gaps > 0).all() and gaps[same].max() < gaps[~same].min()


# --- content ---------------------------------------------------------------------------------------------
def test_main_subset_is_the_readable_set_in_table_order() -> None:
    table = make_table(MAIN_ROWS, TASKS)
    table.mean.loc["Breadcrumbs+TR", "Average"] = 99.0  # the best trust-region row of the other methods
    table.mean.loc["AdaMerging (layer-wise)", "Average"] = 99.5  # a base row does not count
    assert F.main_subset(table) == [
        "Pretrained", "Individual", "TA", "TA+TR", "TA+TR (exemplar)", "TIES (dis-sum)", "TIES (dis-sum)+TR",
        "Breadcrumbs", "Breadcrumbs+TR",
    ]  # fmt: skip
    fig = F.methods_per_task(table, skip=["Individual"])
    [legend] = fig.legends
    assert "Individual" not in [t.get_text() for t in legend.get_texts()]
    assert F.main_subset(make_table(["TA", "foo"], TASKS)) == ["TA"]
    rows = ["TA [A]", "TA+TR [A]", "DARE [A]", "DARE+TR [A]", "DARE+TR (exemplar) [A]", "Breadcrumbs+TR [A]"]
    rows += ["TA [B]", "DARE [B]", "DARE+TR [B]", "Breadcrumbs [B]", "Breadcrumbs+TR [B]"]
    table = make_table(rows, TASKS)
    table.mean["Average"] = [50, 50, 99, 70, 90, 60, 50, 99, 70, 50, 71]  # zero-shot rows count before exemplar
    assert F.main_subset(table) == [
        "TA [A]", "TA+TR [A]", "DARE [A]", "DARE+TR [A]", "TA [B]", "Breadcrumbs [B]", "Breadcrumbs+TR [B]",
    ]  # fmt: skip


def test_bar_value_axes_start_at_zero_and_curves_say_they_do_not() -> None:
    fig = F.methods_per_task(MAIN)
    assert fig.axes[0].get_ylim() == (0.0, 100.0)
    for fig in (F.variant_bars(PLUGIN), F.methods_per_task_all(MAIN)):
        assert all(ax.get_xlim()[0] == 0.0 for ax in fig.axes if ax.get_visible())
    high = make_table(PLUGIN_ROWS, TASKS)
    high.mean["Normalized"] = 104.0
    assert F.variant_bars(high, "Normalized").axes[0].get_xlim() == (0.0, 110.0)
    assert {"mask_ratio", "exemplar_count"} <= F.ZOOMED and F.axis_note("mask_ratio")
    assert F.axis_note("plugin") == "" and F.axis_note("methods_per_task") == ""


def whisker_count(fig: Figure) -> int:
    return sum(len(c.lines[2][0].get_segments()) for ax in fig.axes for c in ax.containers if hasattr(c, "lines"))


def test_whiskers_are_the_intervals_and_only_where_there_is_one() -> None:
    fig = F.variant_bars(PLUGIN)
    finite = np.isfinite(PLUGIN.low["Average"]) & np.isfinite(PLUGIN.high["Average"])
    assert whisker_count(fig) == int(finite.sum()) == len(PLUGIN_ROWS) - 1
    ax = fig.axes[0]
    segments = next(c for c in ax.containers if hasattr(c, "lines")).lines[2][0].get_segments()
    ends = sorted((round(s[0][0], 6), round(s[1][0], 6)) for s in segments)
    rows = PLUGIN.low.index[finite]
    expected = sorted(
        zip(PLUGIN.low.loc[rows, "Average"].round(6), PLUGIN.high.loc[rows, "Average"].round(6), strict=True)
    )
    assert ends == expected
    assert "95% interval" in ax.get_xlabel()
    plain = make_table(PLUGIN_ROWS, TASKS, intervals=False)  # stds, but no intervals: no whiskers at all
    fig = F.variant_bars(plain)
    assert whisker_count(fig) == 0 and "interval" not in fig.axes[0].get_xlabel()
    assert whisker_count(F.methods_per_task(plain)) == 0
    per_task = F.methods_per_task(MAIN)
    shown = F.main_subset(MAIN)
    cols = [*TASKS, "Average"]
    expect = np.isfinite(MAIN.low.loc[shown, cols].to_numpy()).sum()
    assert whisker_count(per_task) == expect


def test_figure_names_and_functions_are_exported() -> None:
    for name in ("methods_per_task", "methods_per_task_all", "main_subset", "variant_bars", "sweep_heatmap",
                 "correlation_heatmap", "mask_ratio_curve", "exemplar_curve", "save", "STYLE", "DPI"):  # fmt: skip
        assert hasattr(F, name), name
    assert F.methods_per_task(make_table([], TASKS)) is None
    assert F.methods_per_task_all(make_table([], TASKS)) is None


def test_curves_take_their_family_style() -> None:
    for fig in (F.mask_ratio_curve(mask_store()), F.exemplar_curve(exemplar_store())):
        lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
        assert lines
        for line in lines:
            shown = re.sub(r" \((\d+ seeds)?(, )?(95% interval|mean ± std)?\)$", "", line.get_label())
            label = shown.removesuffix(", q=1")
            style = S.line_style(label)
            assert S.family_of(label) is not None and to_rgb(line.get_color()) == to_rgb(style.color), label
            assert line.get_marker() == style.marker
        legend = fig.legends[0]  # every series is drawn its own way
        keys = [(to_rgb(h.get_color()), h.get_linestyle(), h.get_marker(), str(h.get_markerfacecolor()))
                for h in legend.legend_handles]  # fmt: skip
        assert len(set(keys)) == len(keys) == len(lines)
