"""The one tuner: choose (q, λ) on validation, then evaluate the choice once on the evaluation split.

Two ways to choose, one way to test:

* `tune_grid` (ablations, the baselines): every (q, λ) of a small grid is merged from one plan
  (`tatr.runs.plan`) and evaluated on the tuning split; the best mean accuracy wins, the first in
  grid order (q outer, λ inner) on a tie. Why a grid and not Optuna there: a point has at most a few
  dozen cheap trials sharing one plan, and a grid is deterministic, so committed results can be
  re-derived exactly. With a λ_neg grid (the negative component's own factor, `lam_negs`) the grid
  is (q, λ, λ_neg), λ_neg innermost; each (λ, λ_neg) costs a multiply-add on the plan's two arenas.
* A sweep (`tatr.runs.sweep`) lets Optuna choose: its best trial's configuration goes to
  `test_choice` like a grid's winner does.

Every merged model, a sweep's trials included, is evaluated by `evaluate_merge`, so every one gets
the same checks (a non-finite parameter is refused) before its accuracies can reach the store.

`refuse_test_tuning` is the one guard against choosing on the test split: the test split is for
the single evaluation of the choice, so tuning on it needs an explicit override.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tatr.core.errors import TatrError
from tatr.runs.config import ExemplarConfig, MergeConfig, StatisticsConfig
from tatr.runs.plan import PlanBook, merge_once


def refuse_test_tuning(split: str, allowed: bool, hint: str) -> None:
    """Raise a one-line `TatrError` when asked to tune on the test split without `allowed`.

    `hint` says how to insist, in the caller's own terms (a flag, a file key)."""
    if split == "test" and not allowed:
        raise TatrError(
            f"refusing to tune on the test split (tuning on the test split is refused: it is kept for "
            f"the one evaluation of the choice); use the validation split, or {hint} if you really mean it"
        )


@dataclass(frozen=True)
class Tested:
    """One merge evaluated once: the evaluation, the merge and evaluation seconds, the mask statistics."""

    evaluation: Any  # tatr.suites.evaluation.Evaluation
    merge_seconds: float
    eval_seconds: float
    mask: dict[str, tuple[int, int]] | None = None

    def mask_lists(self) -> dict[str, list[int]] | None:
        """The mask statistics as JSON-able lists (`RunRecord.mask`)."""
        return None if self.mask is None else {k: [int(d), int(n)] for k, (d, n) in self.mask.items()}


def evaluate_merge(
    suite: Any,
    merged: Mapping[str, Any],
    split: str,
    tasks: Sequence[str] | None = None,
    on_task: Callable[[str, float], None] | None = None,
) -> tuple[Any, float]:
    """The one evaluation of a merged model, for sweep trials, grid trials and tested choices alike:
    `tatr.suites.evaluation.evaluate_merged` (a NaN or infinite parameter is refused before anything
    is evaluated, so nothing reaches the store), and the seconds it took. `on_task(task, accuracy)`
    is called as each task finishes (a sweep reports to its pruner there, and may stop the trial)."""
    from tatr.suites.evaluation import evaluate_merged

    start = time.perf_counter()
    evaluation = evaluate_merged(suite, merged, split, tasks, on_task)
    return evaluation, time.perf_counter() - start


def test_choice(
    book: PlanBook,
    merge: MergeConfig,
    exemplars: ExemplarConfig | None = None,
    split: str = "test",
    statistics: StatisticsConfig | None = None,
) -> Tested:
    """Merge `merge` (its q and λ are the choice) with the book's plan and evaluate it once on `split`
    (`statistics`: those of a method that reads them, default the book's config's)."""
    merged, merge_seconds, mask = merge_once(book, merge, exemplars, statistics)
    evaluation, seconds = evaluate_merge(book.suite, merged, split)
    return Tested(evaluation, merge_seconds, seconds, mask)


@dataclass(frozen=True)
class GridTrial:
    """One (q, λ) — or (q, λ, λ_neg) — of a grid on the tuning split."""

    q: float
    lam: float
    accuracy: dict[str, float]
    normalized: dict[str, float]
    merge_seconds: float
    eval_seconds: float
    lam_neg: float | None = None
    predictions: dict[str, Any] | None = None  # per task (tatr.store.predictions.TaskPredictions), where given

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


@dataclass
class Tuned:
    """A grid's choice, its trials in grid order, and the choice tested once."""

    merge: MergeConfig  # with the chosen q and λ
    validation: float  # the chosen trial's mean accuracy on the tuning split
    tested: Tested
    trials: list[GridTrial] = field(default_factory=list)
    seconds: float = 0.0  # the whole tuning, plan included

    @property
    def lam(self) -> float:
        return float(self.merge.lam)  # type: ignore[arg-type]

    @property
    def lam_neg(self) -> float | None:
        """The chosen λ_neg, or None where every part is scaled by λ."""
        return self.merge.lam_neg

    @property
    def q(self) -> float | None:
        """The chosen q, or None without a trust region (q changes nothing there)."""
        return None if self.merge.trust_region == "off" else self.merge.q

    @property
    def test(self) -> dict[str, float]:
        """The choice's accuracy per task on the evaluation split."""
        return self.tested.evaluation.accuracy


def tune_grid(
    book: PlanBook,
    merge: MergeConfig,
    qs: Sequence[float],
    lams: Sequence[float],
    exemplars: ExemplarConfig | None = None,
    tune_split: str = "validation",
    eval_split: str = "test",
    allow_test_tuning: bool = False,
    lam_negs: Sequence[float] | None = None,
    statistics: StatisticsConfig | None = None,
) -> Tuned:
    """Grid over (q, λ) on `tune_split` with one plan, then the best (q, λ) once on `eval_split`.

    Without a trust region q changes nothing: pass `qs=(1.0,)`. The plan's building time is counted
    in the tested merge's seconds (it is the cost of getting that merge). `lam_negs`: also tune the
    negative component's own λ_neg over this grid (None: `merge.lam_neg` as it is, for every trial).
    `statistics`: Fisher merging's and RegMean's (default: the book's config's)."""
    refuse_test_tuning(tune_split, allow_test_tuning, "set allow_test_tuning")
    if not qs or not lams or (lam_negs is not None and not lam_negs):
        raise TatrError("a tuning grid needs at least one q and one λ (and one λ_neg when it tunes λ_neg)")
    negs: Sequence[float | None] = (merge.lam_neg,) if lam_negs is None else tuple(lam_negs)
    start = time.perf_counter()
    plan = book.get(merge, exemplars, statistics)
    if lam_negs is not None:
        plan.check_lam_neg()  # one line before any trial
    plan.prepare(qs)  # rank once for the lowest q; Ω is kept so the best q can be revisited
    plan_seconds = time.perf_counter() - start
    trials: list[GridTrial] = []
    best: GridTrial | None = None
    for q in qs:
        for lam in lams:
            for lam_neg in negs:
                t0 = time.perf_counter()
                merged = plan.merged(q, lam, lam_neg)
                merge_seconds = time.perf_counter() - t0
                ev, seconds = evaluate_merge(book.suite, merged, tune_split)
                trial = GridTrial(q, lam, ev.accuracy, ev.normalized, merge_seconds, seconds, lam_neg, ev.predictions)
                trials.append(trial)
                if best is None or trial.mean > best.mean:
                    best = trial
    assert best is not None
    chosen = merge.model_copy(update={"q": best.q, "lam": best.lam, "lam_neg": best.lam_neg})
    tested = test_choice(book, chosen, exemplars, eval_split, statistics)
    tested = Tested(tested.evaluation, plan_seconds + tested.merge_seconds, tested.eval_seconds, tested.mask)
    return Tuned(chosen, best.mean, tested, trials, time.perf_counter() - start)
