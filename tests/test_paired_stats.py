"""Paired statistics (`tatr.report.paired`): closed-form checks, the degenerate case, Holm, stratification."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import binomtest

from tatr.report.paired import (
    holm,
    holm_confidence,
    mcnemar_p,
    paired_bootstrap,
    paired_vectors,
    seeded_bootstrap,
    sign_flip_p,
)


def pair(n: int, wins: int, losses: int, both: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two vectors of n examples: `wins` a-only right, `losses` b-only right, `both` right in both."""
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:wins] = True
    b[wins : wins + losses] = True
    a[wins + losses : wins + losses + both] = True
    b[wins + losses : wins + losses + both] = True
    order = np.random.default_rng(seed).permutation(n)
    return a[order], b[order]


def test_bootstrap_matches_the_normal_interval_of_a_paired_difference():
    n, b, c = 2000, 150, 100
    a_vec, b_vec = pair(n, b, c, both=1200)
    delta, low, high = paired_bootstrap(a_vec, b_vec, np.zeros(n, int), n_resamples=20_000, seed=1)
    d = (b - c) / n
    half = 1.96 * math.sqrt((b + c) / n - d**2) / math.sqrt(n)
    assert delta == pytest.approx(100 * d)
    assert low == pytest.approx(100 * (d - half), abs=0.1)  # Monte-Carlo error of a 2.5% quantile: ~0.02
    assert high == pytest.approx(100 * (d + half), abs=0.1)


def test_identical_predictions_give_zero():
    a, _ = pair(500, 100, 0, both=0)
    strata = np.repeat([0, 1], 250)
    assert paired_bootstrap(a, a.copy(), strata) == (0.0, 0.0, 0.0)
    assert seeded_bootstrap([a, a], [a, a], [strata, strata]) == (0.0, 0.0, 0.0)
    assert mcnemar_p(a, a) == 1.0
    assert sign_flip_p(a, a, strata) == 1.0


def test_delta_is_the_mean_over_tasks_of_accuracy_differences():
    a1, b1 = pair(100, 10, 0)  # task 0: +10 points
    a2, b2 = pair(400, 0, 8)  # task 1: −2 points
    delta, low, high = paired_bootstrap(np.r_[a1, a2], np.r_[b1, b2], np.r_[np.zeros(100), np.ones(400)])
    assert delta == pytest.approx((10 - 2) / 2)
    assert low < delta < high


def test_resampling_keeps_each_tasks_count():
    """Task A (10 examples, all a-only right: +100 points) and task B (1000 ties): a stratified resample
    always has 10 A-examples, so every resampled delta is exactly 50; pooled resampling would vary."""
    a = np.r_[np.ones(10, bool), np.zeros(1000, bool)]
    b = np.zeros(1010, bool)
    strata = np.r_[np.zeros(10, int), np.ones(1000, int)]
    assert paired_bootstrap(a, b, strata) == (50.0, 50.0, 50.0)
    assert seeded_bootstrap([a, a], [b, b], [strata, strata]) == (50.0, 50.0, 50.0)


def test_bootstrap_is_seeded_and_fast():
    rng = np.random.default_rng(0)
    a, b = rng.random(2400) < 0.8, rng.random(2400) < 0.75
    strata = np.repeat(np.arange(8), 300)
    start = time.perf_counter()
    first = paired_bootstrap(a, b, strata, n_resamples=10_000, seed=3)
    assert time.perf_counter() - start < 2.0
    assert paired_bootstrap(a, b, strata, n_resamples=10_000, seed=3) == first


def test_seeded_bootstrap_widens_with_the_seed_spread():
    """Two seeds that disagree (+5 and −5 points) on top of the example noise: the two-stage interval is
    wider than either seed's own, and one seed is `paired_bootstrap`'s."""
    a1, b1 = pair(1000, 100, 50, seed=1)
    a2, b2 = pair(1000, 50, 100, seed=2)
    s = np.zeros(1000, int)
    one = paired_bootstrap(a1, b1, s, seed=4)
    assert seeded_bootstrap([a1], [b1], [s], seed=4)[0] == one[0]
    delta, low, high = seeded_bootstrap([a1, a2], [b1, b2], [s, s], seed=4)
    assert delta == pytest.approx(0.0)
    assert high - low > (one[2] - one[1]) * 1.5


def test_mcnemar_is_scipys_exact_binomial_on_discordant_pairs():
    a, b = pair(60, 12, 4, both=30)
    assert mcnemar_p(a, b) == pytest.approx(binomtest(12, 16, 0.5).pvalue)
    assert mcnemar_p(a, b) == pytest.approx(0.076812744140625)  # 2·P(X ≥ 12), X ~ Bin(16, ½)


def test_sign_flip_with_one_task_is_mcnemar():
    a, b = pair(300, 30, 15, both=150)
    assert sign_flip_p(a, b, np.zeros(300, int), n_resamples=40_000) == pytest.approx(mcnemar_p(a, b), abs=0.01)


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm (1979), transcribed literally: sort p ascending; adjusted p_(i) = max over j ≤ i of
    min(1, (m − j + 1) · p_(j)) with 1-based j; report in the original order."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for j, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - j + 1) * p[i]))
        out[i] = running
    return out


@pytest.mark.parametrize(
    "p", [[0.01, 0.04, 0.03, 0.005], [0.5, 0.2, 0.9], [0.001], [0.02, 0.02, 0.3, 0.04, 0.011], [0.6, 0.01]]
)
def test_holm_against_its_definition(p):
    assert holm(p).tolist() == pytest.approx(holm_by_hand(p))


def test_holm_confidence_levels():
    levels = holm_confidence([0.04, 0.001, 0.2], alpha=0.05)
    assert levels.tolist() == pytest.approx([1 - 0.05 / 2, 1 - 0.05 / 3, 1 - 0.05 / 1])


def test_a_wider_confidence_gives_a_wider_interval():
    a, b = pair(1000, 80, 40)
    s = np.zeros(1000, int)
    _, lo95, hi95 = paired_bootstrap(a, b, s, confidence=0.95)
    _, lo99, hi99 = paired_bootstrap(a, b, s, confidence=0.99)
    assert lo99 < lo95 and hi99 > hi95


def test_paired_vectors_from_store_rows_and_none_for_old_rows():
    import pandas as pd

    from tatr.store.predictions import TaskPredictions, prediction_columns

    def rows(vectors):
        return pd.DataFrame([{"task": t, **prediction_columns(TaskPredictions(v), "test")} for t, v in vectors.items()])

    a1, b1 = pair(30, 5, 2)
    a2, b2 = pair(20, 1, 3)
    got = paired_vectors(rows({"y": a2, "x": a1}), rows({"x": b1, "y": b2}))
    assert got is not None
    a, b, s = got
    assert np.array_equal(a, np.r_[a1, a2]) and np.array_equal(b, np.r_[b1, b2])
    assert np.array_equal(s, np.r_[np.zeros(30), np.ones(20)])
    old = pd.DataFrame([{"task": "x", "correct": None, "n_examples": None}, {"task": "y"}])
    assert paired_vectors(old, rows({"x": b1, "y": b2})) is None
    assert paired_vectors(rows({"x": a1}), rows({"x": b1, "y": b2})) is None
