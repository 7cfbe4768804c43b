"""AdaMerging in the one run path: plan (the trust-region mask) → learn λ → choose q on validation → test once.

An ablation point whose method is `adamerging-task` or `adamerging-layer` comes here instead of the
(q, λ) grid of `tatr.runs.tune.tune_grid`; everything else about it is the same: its plan from the
`PlanBook`, its rows from `tatr.runs.ablations.point_records`, one `Tuned` result.

* Without a trust region: the coefficients are learned once and that model is evaluated on the tuning
  split (one trial, for the same row layout as a grid) and then once on the evaluation split.
* With one: for each q of the point's grid, the task vectors are masked with the plan's mask at q,
  the coefficients learned on them, the model evaluated on the tuning split; the best q (the first on
  a tie) is then evaluated once on the evaluation split. A single q fixes it. There is no λ grid.

Learning reads the unlabeled inputs named by `adamerging.inputs` (the paper: `test`, without labels),
never labels; choosing q reads the tuning split's labels, as every other method's tuning does.

The store has no column for learned coefficients: a row's `lam` is the mean of the learned (clamped)
coefficients, and the W&B mirror gets their summary (mean, min, max, per-task means) as `params`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tatr.core.adamerging import (
    AdaMerged,
    adamerging,
    check_memory,
    coefficient_count,
    granularity_of,
    masked_task_vectors,
    memory_bytes,
)
from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError
from tatr.runs.config import AdaMergingConfig, ExemplarConfig, MergeConfig
from tatr.runs.plan import PlanBook
from tatr.runs.tune import GridTrial, Tested, Tuned, refuse_test_tuning
from tatr.store.record import RunRecord


@dataclass
class AdaTuned(Tuned):
    """A `Tuned` whose λ were learned: the coefficient summary of each trial and of the tested choice."""

    summaries: list[dict[str, Any]] = field(default_factory=list)  # one per trial, in order
    chosen: dict[str, Any] = field(default_factory=dict)


def available_bytes(device: torch.device, override_gib: float | None = None) -> int:
    """Memory AdaMerging may use: the override, the GPU's free memory, or the machine's available memory."""
    if override_gib is not None:
        return int(override_gib * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def learn(
    book: PlanBook,
    merge: MergeConfig,
    q: float,
    settings: AdaMergingConfig,
    exemplars: ExemplarConfig | None = None,
    seed: int = 0,
) -> tuple[AdaMerged, float, dict[str, tuple[int, int]] | None]:
    """AdaMerging on the book's task vectors masked at q: (result, seconds, mask statistics or None).

    The memory check runs before any task vector is read; the mask comes from the plan of a TA merge
    with the same trust-region mode and exemplars (the mask does not depend on the method)."""
    if merge.components is not None:
        raise TatrError("AdaMerging takes the trust-region mask, not a component selection: leave `components` unset")
    granularity = granularity_of(merge.method)
    suite = book.suite
    plan = book.get(merge.model_copy(update={"method": "ta"}), exemplars)
    tasks = len(suite.tasks)
    model = suite.encoder()
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    numel, size = plan.space.numel, plan.dtype.itemsize
    required = memory_bytes(tasks, numel, size, coefficient_count(granularity, len(plan.space.keys), tasks))
    what = f"{tasks} task vectors of {numel:,} coordinates ({size}-byte)"
    check_memory(required, available_bytes(device, settings.max_memory_gib), what)
    start = time.perf_counter()
    vectors = masked_task_vectors(plan, q)
    result = adamerging(
        load_state_dict(book.pretrained),
        vectors,
        model,
        [suite.head(t) for t in suite.tasks],
        [suite.unlabeled_loader(t, settings.inputs, settings.batch, seed) for t in suite.tasks],
        suite.logit_scale(),
        granularity=granularity,
        steps=settings.steps,
        lr=settings.lr,
        init=settings.init,
        batches_per_step=settings.batches_per_step,
        device=device,
        progress=book.progress,
    )
    del vectors
    mask = None if merge.trust_region == "off" else plan.mask_stats(q)
    return result, time.perf_counter() - start, mask


def tune_adamerging(
    book: PlanBook,
    merge: MergeConfig,
    qs: Sequence[float],
    settings: AdaMergingConfig,
    exemplars: ExemplarConfig | None = None,
    tune_split: str = "validation",
    eval_split: str = "test",
    allow_test_tuning: bool = False,
    seed: int = 0,
) -> AdaTuned:
    """Learn λ for each q (one q without a trust region), choose q on `tune_split`, test once."""
    from tatr.suites.evaluation import evaluate_merged

    refuse_test_tuning(tune_split, allow_test_tuning, "set allow_test_tuning")
    if not qs:
        raise TatrError("AdaMerging with a trust region needs at least one q")
    start = time.perf_counter()
    grid = (1.0,) if merge.trust_region == "off" else tuple(qs)
    trials: list[GridTrial] = []
    summaries: list[dict[str, Any]] = []
    best: tuple[GridTrial, AdaMerged, float, Any] | None = None
    for q in grid:
        result, seconds, mask = learn(book, merge, q, settings, exemplars, seed)
        summary = result.summary()
        t0 = time.perf_counter()
        ev = evaluate_merged(book.suite, result.merged, tune_split)
        elapsed = time.perf_counter() - t0
        trial = GridTrial(q, summary["mean"], ev.accuracy, ev.normalized, seconds, elapsed, predictions=ev.predictions)
        trials.append(trial)
        summaries.append(summary)
        if best is None or trial.mean > best[0].mean:
            best = (trial, result, seconds, mask)
        del result
    assert best is not None
    trial, result, seconds, mask = best
    t0 = time.perf_counter()
    evaluation = evaluate_merged(book.suite, result.merged, eval_split)
    tested = Tested(evaluation, seconds, time.perf_counter() - t0, mask)
    chosen = merge.model_copy(update={"q": trial.q, "lam": trial.lam})
    return AdaTuned(chosen, trial.mean, tested, trials, time.perf_counter() - start, summaries, result.summary())


def with_coefficients(records: list[RunRecord], tuned: AdaTuned) -> list[RunRecord]:
    """The point's records (its trials, then its test run) with their coefficient summaries as `params`."""
    summaries = [*tuned.summaries, tuned.chosen]
    if len(summaries) != len(records):
        raise ValueError(f"{len(records)} records for {len(summaries)} coefficient summaries")
    return [
        dataclasses.replace(rec, params={**rec.params, "adamerging": s})
        for rec, s in zip(records, summaries, strict=True)
    ]
