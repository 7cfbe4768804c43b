"""Paired statistics for the differences the report shows: bootstrap intervals, a paired test, Holm.

Two rows of the same build, task and split were evaluated on the same examples in the same order
(`tatr.store.predictions`), so a difference of two methods is paired example by example. Every
difference is in accuracy points of what the tables show: the mean over tasks of per-task accuracy.

* `paired_bootstrap(a, b, strata)`: the difference a − b and its percentile interval from a
  bootstrap over test examples, stratified by task (each resample draws n_t examples of task t with
  replacement, so every task keeps its count and its weight 1/T in the mean).
* `seeded_bootstrap(a, b, strata)` for rows with several seeds: each resample first draws the seeds
  with replacement, then the examples of each drawn seed within each task (a two-stage bootstrap), so
  the interval holds both the seed spread and the example sampling.
* `sign_flip_p(a, b, strata)`: the paired permutation test of the same statistic: under "no
  difference" a and b are exchangeable per example, so each example's a − b flips sign with
  probability ½. With one task and one seed it is McNemar's exact test (`mcnemar_p`, binomial on
  the discordant pairs), up to Monte-Carlo error; with several tasks it weighs each task as the
  tables do, which a McNemar test on the pooled discordant pairs does not. The report's p-values
  are `sign_flip_p`'s.
* `paired_vectors(a_rows, b_rows)`: the paired inputs of the above from two runs' store rows, or None
  where either lacks predictions (rows of an old store: no interval, "–").
* `gap_bootstrap(proxy, zero, exemplar, strata)`: the share of the exemplar − zero-shot gap a proxy
  closes, (P − Z) / (E − Z) of the mean accuracies, and its interval from the same two-stage bootstrap
  drawing the three rows' outcomes of an example together (the 8 joint outcomes of a task are a
  multinomial, the index bootstrap's distribution exactly).
* `holm(pvalues)`: Holm's step-down adjusted p-values over the comparisons of one table;
  `holm_confidence` the confidence level of each comparison's corrected interval.

How resampling is done, and why it is exact: an example's paired outcome a_i − b_i is +1 (a right, b
wrong), −1 or 0, and the resampled mean of a task depends only on how many +1 and −1 the n_t draws
hit. Those counts follow a multinomial(n_t; w/n_t, l/n_t, rest), drawn here as two binomials, which is
the index bootstrap's distribution exactly, at a cost independent of n (10,000 resamples of any test
set take milliseconds). The same holds for the sign flips: only the D_t discordant pairs of a task
can change sign, and how many come out +1 is binomial(D_t, ½). Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from tatr.store.predictions import predictions_from_row

N_RESAMPLES = 10_000
CONFIDENCE = 0.95


def _paired_counts(a: np.ndarray, b: np.ndarray, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per stratum (in sorted order of the labels): n, wins (a right, b wrong), losses."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    strata = np.asarray(strata)
    if a.shape != b.shape or a.shape != strata.shape or a.ndim != 1:
        raise ValueError(f"a, b and strata must be vectors of one length, got {a.shape}, {b.shape}, {strata.shape}")
    if len(a) == 0:
        raise ValueError("no examples to compare")
    _, idx = np.unique(strata, return_inverse=True)
    n = np.bincount(idx)
    wins = np.bincount(idx, weights=a & ~b, minlength=len(n)).astype(np.int64)
    losses = np.bincount(idx, weights=~a & b, minlength=len(n)).astype(np.int64)
    return n, wins, losses


def _resampled_means(
    n: np.ndarray, wins: np.ndarray, losses: np.ndarray, rng: np.random.Generator, size: tuple[int, ...]
) -> np.ndarray:
    """Bootstrap means of a − b per stratum: `size + n.shape`, each n draws with replacement."""
    shape = (*size, *n.shape)
    n_b = np.broadcast_to(n, shape)
    # multinomial(n; w/n, l/n, rest) as W ~ Bin(n, w/n), then L | W ~ Bin(n − W, l/(n − w))
    p_win = np.broadcast_to(wins / n, shape)
    p_loss = np.broadcast_to(np.where(n > wins, losses / np.maximum(n - wins, 1), 0.0), shape)
    w = rng.binomial(n_b, p_win)
    l_ = rng.binomial(n_b - w, p_loss)
    return (w - l_) / n_b


def _interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a_correct: np.ndarray,
    b_correct: np.ndarray,
    strata: np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """(delta, low, high) in accuracy points: delta = mean over tasks of acc_a − acc_b, and its
    percentile interval from `n_resamples` bootstrap resamples of the examples, stratified by task.

    `a_correct[i]`, `b_correct[i]` say whether a and b got example i right; `strata[i]` is its task.
    Identical vectors give (0, 0, 0)."""
    n, wins, losses = _paired_counts(a_correct, b_correct, strata)
    delta = 100.0 * float(np.mean((wins - losses) / n))
    rng = np.random.default_rng(seed)
    means = _resampled_means(n, wins, losses, rng, (n_resamples,))
    low, high = _interval(100.0 * means.mean(axis=-1), confidence)
    return delta, low, high


def seeded_bootstrap(
    a_correct: Sequence[np.ndarray],
    b_correct: Sequence[np.ndarray],
    strata: Sequence[np.ndarray],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """`paired_bootstrap` for S seeds: element s of each sequence is seed s's rows (a and b paired by
    seed; each seed may have its own examples, e.g. its own testbed build). delta is the mean over
    seeds of the mean over tasks; each resample draws S seeds with replacement, then resamples the
    examples of each drawn seed within each task (two-stage), so the interval holds both the seed
    spread and the example sampling. One seed is `paired_bootstrap`."""
    if not (len(a_correct) == len(b_correct) == len(strata)) or not a_correct:
        raise ValueError("a, b and strata need one entry per seed, and at least one seed")
    counts = [_paired_counts(a, b, s) for a, b, s in zip(a_correct, b_correct, strata, strict=True)]
    if len({len(c[0]) for c in counts}) != 1:
        raise ValueError("every seed must have the same number of tasks")
    n = np.stack([c[0] for c in counts])  # [S, T]
    wins = np.stack([c[1] for c in counts])
    losses = np.stack([c[2] for c in counts])
    delta = 100.0 * float(np.mean((wins - losses) / n))
    rng = np.random.default_rng(seed)
    n_seeds = len(counts)
    chosen = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))  # stage 1: the seeds
    means = _resampled_means(n[chosen], wins[chosen], losses[chosen], rng, ())  # stage 2: examples, [R, S, T]
    low, high = _interval(100.0 * means.mean(axis=(-1, -2)), confidence)
    return delta, low, high


def gap_bootstrap(
    proxy: Sequence[np.ndarray],
    zero: Sequence[np.ndarray],
    exemplar: Sequence[np.ndarray],
    strata: Sequence[np.ndarray],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """(gap, low, high): gap = (P − Z) / (E − Z), with P, Z, E the mean over seeds and tasks of each row's
    per-task accuracy (element s of each sequence is seed s, the three paired example by example), and its
    percentile interval over resamples of the seeds, then of each drawn seed's examples within each task,
    all three rows' outcomes of an example drawn together. NaN where E = Z; resamples with E* = Z* are
    left out of the interval (it is unbounded when the E − Z difference's own interval holds 0)."""
    if not (len(proxy) == len(zero) == len(exemplar) == len(strata)) or not proxy:
        raise ValueError("proxy, zero, exemplar and strata need one entry per seed, and at least one seed")
    counts, sizes = [], []
    for p, z, e, st in zip(proxy, zero, exemplar, strata, strict=True):
        pattern = 4 * np.asarray(p, dtype=np.int64) + 2 * np.asarray(z, dtype=np.int64) + np.asarray(e, dtype=np.int64)
        _, task = np.unique(np.asarray(st), return_inverse=True)
        cells = np.zeros((task.max() + 1, 8), dtype=np.int64)
        np.add.at(cells, (task, pattern), 1)
        counts.append(cells)
        sizes.append(cells.sum(axis=1))
    if len({len(c) for c in counts}) != 1:
        raise ValueError("every seed must have the same number of tasks")
    c, n = np.stack(counts), np.stack(sizes)  # [S, T, 8], [S, T]
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(c), size=(n_resamples, len(c)))  # stage 1: the seeds
    drawn = rng.multinomial(n[chosen], c[chosen] / n[chosen][..., None])  # stage 2: [R, S, T, 8]
    gap = _gap(c, n)
    resampled = _gap(drawn, n[chosen])
    resampled = resampled[np.isfinite(resampled)]
    if not resampled.size:
        return gap, float("nan"), float("nan")
    low, high = _interval(resampled, confidence)
    return gap, low, high


def _gap(counts: np.ndarray, n: np.ndarray) -> np.ndarray | float:
    """(P − Z)/(E − Z) from joint outcome counts [..., S, T, 8] (index 4p + 2z + e) and sizes [..., S, T]."""
    k = np.arange(8)
    acc = [(counts * ((k >> bit) & 1)).sum(-1) / n for bit in (2, 1, 0)]  # proxy, zero, exemplar: [..., S, T]
    p, z, e = (a.mean(axis=(-1, -2)) for a in acc)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(e != z, (p - z) / np.where(e != z, e - z, 1.0), np.nan)
    return float(gap) if np.ndim(gap) == 0 else gap


def paired_vectors(a_rows: pd.DataFrame, b_rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(a_correct, b_correct, strata) of two runs' store rows (one row per task each), concatenated in
    sorted task order with the task index as stratum; None where a difference cannot be paired (a row
    without predictions, an old store: the report shows "–"; different tasks; different example counts)."""
    a_by_task = {r["task"]: r for r in a_rows.to_dict("records")}
    b_by_task = {r["task"]: r for r in b_rows.to_dict("records")}
    if not a_by_task or set(a_by_task) != set(b_by_task):
        return None
    a_parts, b_parts, strata = [], [], []
    for i, task in enumerate(sorted(a_by_task)):
        pa, pb = predictions_from_row(a_by_task[task]), predictions_from_row(b_by_task[task])
        if pa is None or pb is None or pa.n != pb.n:
            return None
        a_parts.append(pa.correct)
        b_parts.append(pb.correct)
        strata.append(np.full(pa.n, i))
    return np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(strata)


def mcnemar_p(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """McNemar's exact test: two-sided binomial p of the discordant pairs (a right b wrong vs the
    reverse) against ½ (`scipy.stats.binomtest`); 1 when there is no discordant pair."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5).pvalue)


def sign_flip_p(
    a_correct: np.ndarray | Sequence[np.ndarray],
    b_correct: np.ndarray | Sequence[np.ndarray],
    strata: np.ndarray | Sequence[np.ndarray],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> float:
    """Two-sided p of the paired permutation (sign-flip) test of delta = mean over seeds and tasks of
    acc_a − acc_b: (1 + #{|delta*| ≥ |delta|}) / (1 + n_resamples). One vector each, or one per seed."""
    if isinstance(a_correct, np.ndarray) and a_correct.ndim == 1:
        a_correct, b_correct, strata = [a_correct], [b_correct], [strata]  # type: ignore[list-item]
    counts = [_paired_counts(a, b, s) for a, b, s in zip(a_correct, b_correct, strata, strict=True)]
    n = np.concatenate([c[0] for c in counts]).astype(float)
    wins = np.concatenate([c[1] for c in counts])
    losses = np.concatenate([c[2] for c in counts])
    n_cells = len(n)  # seeds × tasks, each weighted 1/n_cells when every seed has the same tasks
    observed = np.sum((wins - losses) / n) / n_cells
    discordant = wins + losses
    if not discordant.any():
        return 1.0
    rng = np.random.default_rng(seed)
    plus = rng.binomial(np.broadcast_to(discordant, (n_resamples, n_cells)), 0.5)
    flipped = np.sum((2 * plus - discordant) / n, axis=1) / n_cells
    extreme = np.sum(np.abs(flipped) >= abs(observed) - 1e-12)
    return float((1 + extreme) / (1 + n_resamples))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the given order: the k-th smallest p (k = 0, 1, …) times
    (m − k), made non-decreasing along the sorted order, capped at 1. Reject where adjusted ≤ α."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def holm_confidence(pvalues: Sequence[float], alpha: float = 1 - CONFIDENCE) -> np.ndarray:
    """The confidence level of each comparison's Holm-corrected interval, in the given order: the k-th
    smallest p gets 1 − α/(m − k), the level of the test Holm applies to it. Its interval excludes 0
    exactly when the step-down test at that level rejects (up to interval/test agreement)."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    levels = np.empty(m)
    levels[np.argsort(p, kind="stable")] = 1 - alpha / (m - np.arange(m))
    return levels


def level_bootstrap(
    correct: Sequence[np.ndarray],
    strata: Sequence[np.ndarray],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The interval of an accuracy itself (not a difference), for figure whiskers: per task (sorted
    stratum order) and for the mean over tasks, in points. Element s of each sequence is seed s.

    Two stages as in `seeded_bootstrap`: the seeds with replacement, then each drawn seed's n_t
    examples of task t with replacement, whose correct count is binomial(n_t, k_t/n_t) exactly.
    Returns (low[T], high[T], (average low, average high))."""
    if len(correct) != len(strata) or not correct:
        raise ValueError("correct and strata need one entry per seed, and at least one seed")
    n_list, k_list = [], []
    for c, s in zip(correct, strata, strict=True):
        n, k, _ = _paired_counts(c, np.zeros(len(c), dtype=bool), s)  # k: right examples per task
        n_list.append(n)
        k_list.append(k)
    if len({len(n) for n in n_list}) != 1:
        raise ValueError("every seed must have the same number of tasks")
    n, k = np.stack(n_list), np.stack(k_list)  # [S, T]
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(n), size=(n_resamples, len(n)))
    draws = rng.binomial(n[chosen], k[chosen] / n[chosen]) / n[chosen]  # [R, S, T]
    per_task = 100.0 * draws.mean(axis=1)  # [R, T]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(per_task, [tail, 100 - tail], axis=0)
    return low, high, _interval(per_task.mean(axis=1), confidence)
