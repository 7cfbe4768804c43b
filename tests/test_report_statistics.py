"""The report's paired statistics: each table row against its reference, from per-example predictions.

The store is built here with known outcomes per example, so every expected number is computed in the
test from the vectors themselves (a normal interval, counts), never from the report's own functions.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tatr.report import build as report
from tatr.report.comparisons import compare, level_intervals, without_tr
from tatr.report.paired import level_bootstrap
from tatr.report.selection import prepare
from tatr.report.tables import ablation_table, main_table
from tatr.store.predictions import TaskPredictions, prediction_columns
from tatr.store.rows import append_rows, read_store

TASKS = ("alpha", "beta")
N = 400  # test examples per task
_clock = itertools.count(1_800_000_000)
_ids = itertools.count()


def _write(root: Path, correct: dict[str, np.ndarray], **fields) -> None:
    run_id = f"{next(_ids):05d}-{fields.get('method', 'x')}"
    ts = float(next(_clock))
    rows = []
    for task, vec in correct.items():
        p = TaskPredictions(vec, vec.astype(int))
        rows.append(
            {
                "run_id": run_id,
                "benchmark": "stats",
                "split": "test",
                "task": task,
                "accuracy": p.accuracy,
                "normalized_accuracy": p.accuracy,
                "timestamp": ts,
                **prediction_columns(p, "test"),
                **fields,
            }
        )
    append_rows(root, rows, run_id)


def _vector(rng: np.random.Generator, base: np.ndarray, flip_to_right: int, flip_to_wrong: int) -> np.ndarray:
    """`base` with `flip_to_right` wrong examples made right and `flip_to_wrong` right ones made wrong."""
    out = base.copy()
    wrong, right = np.flatnonzero(~base), np.flatnonzero(base)
    out[rng.choice(wrong, flip_to_right, replace=False)] = True
    out[rng.choice(right, flip_to_wrong, replace=False)] = False
    return out


@pytest.fixture()
def store(tmp_path: Path) -> tuple[Path, dict]:
    """Baselines of one experiment, seeds 0 and 1: TA; TA+TR wins 30 and loses 10 examples per task
    (a clear gain); TIES equals TA exactly; TIES+TR equals TIES exactly."""
    rng = np.random.default_rng(7)
    vectors: dict = {}
    for seed in (0, 1):
        ta = {t: rng.random(N) < 0.6 for t in TASKS}
        tr = {t: _vector(rng, ta[t], 30, 10) for t in TASKS}
        common = {"job_type": "ablation", "ablation": "baselines", "experiment": "baselines", "seed": seed}
        _write(tmp_path, ta, method="ta", trust_region="off", **common)
        _write(tmp_path, tr, method="ta", trust_region="zero-shot", q=0.99, **common)
        _write(tmp_path, ta, method="ties-sum", trust_region="off", **common)
        _write(tmp_path, ta, method="ties-sum", trust_region="zero-shot", q=0.99, **common)
        vectors[seed] = (ta, tr)
    return tmp_path, vectors


def _main(root: Path):
    return main_table(prepare(read_store(root)))


def test_tr_gain_has_the_closed_form_interval_and_is_marked(store):
    root, _ = store
    table = _main(root)
    block = next(c for c in table.comparisons if c.name == "vs no-TR").frame
    row = block.loc["TA+TR"]
    assert row["reference"] == "TA"
    # delta: 20 net wins of 400 per task, every task and seed: +5 points exactly
    assert row["delta"] == pytest.approx(5.0)
    # per seed the paired difference of the average has variance (1/T²) Σ_t (d_t/n − δ²)/n with
    # d_t = 40 discordant pairs; the interval over two seeds with identical counts is the same normal
    # interval (seed resampling adds nothing when the seeds agree exactly)
    d, delta = 40 / N, 20 / N
    half = 100 * 1.96 * math.sqrt(sum((d - delta**2) / N for _ in TASKS) / len(TASKS) ** 2 / 2)
    assert row["low"] == pytest.approx(5.0 - half, abs=0.25)
    assert row["high"] == pytest.approx(5.0 + half, abs=0.25)
    assert row["p_holm"] < 0.01 and bool(row["significant"])
    assert row["seeds"] == 2


def test_identical_rows_give_zero_and_no_mark(store):
    root, _ = store
    table = _main(root)
    block = next(c for c in table.comparisons if c.name == "vs no-TR").frame
    ties = block.loc["TIES (dis-sum)+TR"]
    assert (ties["delta"], ties["low"], ties["high"]) == (0.0, 0.0, 0.0)
    assert ties["p"] == 1.0 and not bool(ties["significant"])
    vs_ta = next(c for c in table.comparisons if c.name == "vs TA").frame
    assert vs_ta.loc["TIES (dis-sum)", "delta"] == 0.0


def test_holm_runs_over_the_distinct_pairs_of_the_table(store):
    root, _ = store
    table = _main(root)
    frames = {c.name: c.frame for c in table.comparisons}
    # TA+TR vs TA appears in both blocks: one test, one adjusted p
    assert frames["vs no-TR"].loc["TA+TR", "p_holm"] == frames["vs TA"].loc["TA+TR", "p_holm"]
    p = {}
    for frame in frames.values():
        for row, r in frame.iterrows():
            p[(row, r["reference"])] = r["p"]
    m = len(p)
    raw = sorted(p.values())
    # Holm by hand: the k-th smallest p times (m − k), running maximum, capped at 1
    expected = np.minimum(1, np.maximum.accumulate([q * (m - k) for k, q in enumerate(raw)]))
    got = sorted(r["p_holm"] for frame in frames.values() for _, r in frame.drop_duplicates("reference").iterrows())
    assert set(np.round(got, 12)) <= set(np.round(expected, 12))


def test_every_renderer_shows_the_difference_columns(store, tmp_path):
    root, _ = store
    table = _main(root)
    md, tex, csv = table.to_markdown(), table.to_latex(), table.to_csv()
    assert "Δ vs no-TR [95% CI]" in md and "p (Holm) vs TA" in md
    assert "$\\Delta$ vs no-TR" in tex
    frame = pd.read_csv(pd.io.common.StringIO(csv), index_col=0)
    assert {"Δ vs TA", "Δ vs TA 95% CI low", "Δ vs TA 95% CI high", "p (Holm) vs TA"} <= set(frame.columns)
    assert frame.at["TA+TR", "Δ vs no-TR"] == pytest.approx(5.0)
    assert frame.at["TA+TR", "significant vs no-TR"]
    assert pd.isna(frame.at["TA", "Δ vs TA"])  # the reference itself has no difference
    line = next(ln for ln in md.splitlines() if ln.startswith("| TA+TR |"))
    assert "+5.0 [" in line and "]*" in line


def test_old_store_rows_show_a_dash(store, tmp_path):
    root, _ = store
    rows = read_store(root)
    rows.loc[rows["method"] == "ties-sum", ["n_examples", "correct", "predicted"]] = None
    table = main_table(prepare(rows))
    md = table.to_markdown()
    line = next(ln for ln in md.splitlines() if ln.startswith("| TIES (dis-sum)+TR |"))
    assert "| – | – |" in line
    assert table.low.loc["TIES (dis-sum)"].isna().all()
    assert not table.low.loc["TA"].isna().any()


def test_rows_of_different_experiments_are_never_paired(store):
    root, vectors = store
    ta, _ = vectors[0]
    # a plug-in run of TA+TR on another build: same method labels, another experiment file
    _write(
        root,
        ta,
        method="ta",
        trust_region="exemplar",
        job_type="ablation",
        ablation="baselines",
        experiment="other",
        seed=0,
    )
    rows = prepare(read_store(root))
    test = rows[rows["split"] == "test"]
    blocks = {"vs no-TR": without_tr(test, "label")}
    frame = compare(test, "label", blocks)[0].frame
    assert pd.isna(frame.loc["TA+TR (exemplar)", "delta"])
    assert not pd.isna(frame.loc["TA+TR", "delta"])


def test_level_interval_is_the_binomial_interval():
    rng = np.random.default_rng(3)
    correct = rng.random(2000) < 0.7
    strata = np.zeros(2000, int)
    low, high, (avg_low, avg_high) = level_bootstrap([correct], [strata], n_resamples=20_000)
    p = correct.mean()
    half = 100 * 1.96 * math.sqrt(p * (1 - p) / 2000)
    assert low[0] == pytest.approx(100 * p - half, abs=0.15)
    assert high[0] == pytest.approx(100 * p + half, abs=0.15)
    assert (avg_low, avg_high) == pytest.approx((low[0], high[0]))


def test_table_intervals_hold_their_means(store):
    root, _ = store
    table = _main(root)
    for col in [*TASKS, "Average"]:
        assert ((table.low[col] <= table.mean[col]) & (table.mean[col] <= table.high[col])).all()
    rows = prepare(read_store(root))
    low, _ = level_intervals(rows[rows["split"] == "test"], "label", ["TA"], list(TASKS), "Average")
    assert low.loc["TA"].notna().all()


def test_components_ablation_compares_with_all(tmp_path):
    rng = np.random.default_rng(1)
    base = {t: rng.random(N) < 0.5 for t in TASKS}
    common = {"job_type": "ablation", "ablation": "components", "experiment": "components", "seed": 0}
    common |= {"method": "ta", "trust_region": "exemplar", "q": 0.99}
    _write(tmp_path, base, components=["orthogonal", "positive", "negative"], **common)
    _write(tmp_path, {t: _vector(rng, v, 0, 40) for t, v in base.items()}, components=["positive"], **common)
    table = ablation_table(prepare(read_store(tmp_path)), "components")
    frame = table.comparisons[0].frame
    assert table.comparisons[0].name == "vs all"
    assert frame.loc["positive", "delta"] == pytest.approx(-10.0)
    assert bool(frame.loc["positive", "significant"])


def test_the_report_writes_the_columns(store, tmp_path):
    root, _ = store
    out = tmp_path / "out"
    report.generate(root, out=out, published=None, figures=False)
    text = (out / "stats" / "tables" / "main.md").read_text()
    assert "Δ vs TA [95% CI]" in text


def test_findings_open_the_report_and_say_when_a_difference_is_not_there(store, tmp_path):
    root, _ = store
    out = tmp_path / "out"
    report.generate(root, out=out, published=None, figures=False)
    page = (out / "stats" / "index.html").read_text()
    assert page.index("<h2 id='findings'>Findings</h2>") < page.index("<h2>Main results</h2>")
    assert "TA+TR over TA: +5.0 points [" in page and "2 seeds, significant after Holm" in page
    assert "TIES (dis-sum)+TR over TIES (dis-sum): +0.0 points [+0.0, +0.0], 2 seeds, not distinguishable" in page
    md = (out / "stats" / "tables" / "findings.md").read_text()
    assert "- TA+TR over TA: +5.0 points" in md


def test_resolution_is_the_binomial_half_width(store, tmp_path):
    root, _ = store
    out = tmp_path / "out"
    report.generate(root, out=out, published=None, figures=False)
    frame = pd.read_csv(out / "stats" / "tables" / "resolution.csv", index_col=0)
    one = frame.loc["test, 1 seed"]
    # Var(mean of T=2 accuracies on 400 examples each) at p = 1/2: (1/4)(2 · 0.25/400)
    half = 100 * 1.959964 * math.sqrt(0.25 * (2 * 0.25 / 400))
    assert float(one["One accuracy ±"]) == pytest.approx(half, rel=1e-5)
    assert float(one["Unpaired difference ±"]) == pytest.approx(half * math.sqrt(2), rel=1e-5)
    assert float(frame.loc["test, 2 seeds", "One accuracy ±"]) == pytest.approx(half / math.sqrt(2), rel=1e-5)
    # paired, at the median disagreement of the tables' comparisons: with TA and TA+TR alone, 40 of 400
    rows = read_store(root)
    report.generate(root, out=out, published=None, figures=False, rows=rows[rows["method"] == "ta"])
    frame = pd.read_csv(out / "stats" / "tables" / "resolution.csv", index_col=0)
    paired = [c for c in frame.columns if c.startswith("Paired difference") and not c.endswith("_std")]
    assert paired == ["Paired difference ± (at 10.0% disagreement)"]
    expected = 100 * 1.959964 * math.sqrt(0.25 * (2 * 0.10 / 400))
    assert float(frame.loc["test, 1 seed", paired[0]]) == pytest.approx(expected, rel=1e-5)


def test_mask_ratio_points_compare_with_q_one(tmp_path):
    rng = np.random.default_rng(5)
    base = {t: rng.random(N) < 0.6 for t in TASKS}
    common = {"job_type": "ablation", "ablation": "mask-ratio", "experiment": "mask", "method": "ta"}
    _write(tmp_path, base, trust_region="zero-shot", q=1.0, **common)
    _write(tmp_path, {t: _vector(rng, v, 20, 0) for t, v in base.items()}, trust_region="zero-shot", q=0.99, **common)
    _write(tmp_path, base, trust_region="zero-shot", q=0.9, **common)
    table = ablation_table(prepare(read_store(tmp_path)), "mask-ratio")
    (block,) = table.comparisons
    assert block.name == "TA+TR vs 0% dropped" and block.family == 2
    assert block.frame.loc["1%", "delta"] == pytest.approx(5.0)
    assert block.frame.loc["10%", "delta"] == 0.0
    assert block.frame.loc["1%", "reference"] == "0%"
    assert table.low.at["1%", "TA+TR"] < table.mean.at["1%", "TA+TR"] < table.high.at["1%", "TA+TR"]
    assert "Δ TA+TR vs 0% dropped [95% CI]" in table.to_markdown()


def test_findings_say_a_pair_once_when_the_main_table_shows_the_plugin_runs():
    from tatr.report.comparisons import Comparison
    from tatr.report.findings import findings
    from tatr.report.render import Table

    def table(name: str, delta: float) -> Table:
        rows = ["DARE", "DARE+TR", "TA", "TA+TR"]
        mean = pd.DataFrame({"Average": [70.0, 70.5, 70.0, 70.0]}, index=rows)
        frame = pd.DataFrame(
            {"reference": ["DARE", "TA"], "delta": [0.5, delta], "low": [0.1, -0.2], "high": [0.9, 0.3],
             "p": [0.01, 0.5], "p_holm": [0.02, 0.5], "significant": [True, False], "seeds": [1, 1],
             "discordant": [0.05, 0.02]},
            index=["DARE+TR", "TA+TR"],
        )  # fmt: skip
        return Table(
            name, "t", mean, mean * np.nan, pd.Series(1, index=rows), comparisons=[Comparison("vs no-TR", frame)]
        )

    found = dict(findings([table("main", 0.3), table("ablation_plugin", 0.1)]))
    assert [s.split(":")[0] for s in found["main table"]] == ["DARE+TR over DARE", "TA+TR over TA"]
    assert [s.split(":")[0] for s in found["plug-in ablation"]] == ["TA+TR over TA"]  # DARE's pair said once
    assert (
        found["main table"][0]
        == "DARE+TR over DARE: +0.5 points [+0.1, +0.9], 1 seed, significant after Holm (p = 0.020)."
    )
