"""One sweep trial: the objective, what it reports to the pruner, and what it tells the dashboard.

A trial costs one masked multiply-add (`MergePlan.merged`) plus its evaluation
(`tatr.runs.tune.evaluate_merge`, the grids' own, with its checks); everything that does not depend on
the trial's parameters is in a `tatr.runs.plan.PlanBook`, built once and shared through a
content-addressed cache folder. In `tatr sweep`'s own process the objective takes the sweep's suite
and book (`Objective(spec, suite, plans)`); a spawned worker builds its own.

What a trial shows (optuna-dashboard reads these):
* its intermediate value after each task is the mean metric over the tasks evaluated so far
  (`mean_metric`), so a pruned trial is plotted at the level it reached, not at a fraction of it;
  at the last task it is the objective itself;
* its user attributes say what it was (`definition`: method, trust-region mode, components,
  exemplar count, seed), beside `worker` (who ran it) and the record payload.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from tatr.core.trust_region import uses_exemplars
from tatr.runs.config import ExperimentConfig, config_dict, config_hash
from tatr.runs.plan import PlanBook, merge_once
from tatr.runs.sweep.owners import worker_identity
from tatr.runs.sweep.space import SearchSpace, trial_config
from tatr.runs.tune import evaluate_merge


def modes_of(space: SearchSpace, config: ExperimentConfig) -> list[str]:
    spec = space.param("trust_region")
    return list(spec.choices) if spec is not None and spec.choices else [config.merge.trust_region]


def q_min_of(space: SearchSpace, config: ExperimentConfig) -> float:
    spec = space.param("q")
    return spec.smallest() if spec is not None else config.merge.q


@dataclass(frozen=True)
class SweepSpec:
    """Everything a worker process needs (picklable)."""

    config: dict[str, Any]
    space: dict[str, Any]
    study: str
    storage: str
    trials: int
    results: str
    wandb: bool
    seed: int


class SurplusTrial(Exception):
    """This trial would exceed the requested count (another worker took the last slot)."""


def counts(study: Any) -> tuple[int, int]:
    """(finished, running): finished = complete or pruned, the trials that count towards the target."""
    import optuna

    TS = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED, TS.RUNNING))
    running = sum(t.state == TS.RUNNING for t in trials)
    return len(trials) - running, running


class Objective:
    """One process's trial runner: plans loaded once, then a masked multiply-add and an evaluation."""

    def __init__(self, spec: SweepSpec, suite: Any = None, plans: PlanBook | None = None) -> None:
        from tatr.suites import get_suite

        self.spec = spec
        self.config = ExperimentConfig.model_validate(spec.config)
        self.space = SearchSpace.from_dict(spec.space)
        self.suite = suite if suite is not None else get_suite(self.config.benchmark, self.config.suite)
        if plans is None:
            plans = PlanBook(self.suite, self.config, q_min_of(self.space, self.config))
        self.plans = plans
        self._individual: dict[str, float] | None = None

    def individual(self, split: str) -> dict[str, float]:
        if self._individual is None:
            self._individual = dict(self.suite.individual_accuracy(split))
        return self._individual

    def __call__(self, trial: Any) -> float:
        import optuna

        trial.set_user_attr("worker", worker_identity())
        self._check_surplus(trial)
        params = {p.name: p.suggest(trial) for p in self.space.params}
        cfg = trial_config(self.config, params)
        for key, value in definition(cfg).items():
            trial.set_user_attr(key, value)
        merged, seconds, mask = merge_once(self.plans, cfg.merge)
        split, tasks = cfg.split, tuple(self.suite.tasks)
        individual = self.individual(split)
        metric = self.space.metric
        accuracy: dict[str, float] = {}
        start = time.perf_counter()
        predictions: dict[str, Any] = {}  # per task, once the evaluation has finished (not for a pruned trial)

        def record() -> None:
            from tatr.runs.tracking import RECORD_ATTR, payload
            from tatr.store.record import suite_model
            from tatr.suites.evaluation import normalized_accuracy

            normalized = normalized_accuracy(accuracy, individual)
            elapsed = time.perf_counter() - start
            data = payload(
                config_dict(cfg),
                config_hash(cfg),
                split,
                accuracy,
                normalized,
                seconds,
                elapsed,
                mask,
                model=suite_model(self.suite),
                predictions=predictions,
            )
            trial.set_user_attr(RECORD_ATTR, data)

        def on_task(task: str, acc: float) -> None:
            accuracy[task] = acc
            trial.report(mean_metric(accuracy, individual, metric), step=len(accuracy) - 1)
            if len(accuracy) < len(tasks) and trial.should_prune():
                record()
                raise optuna.TrialPruned(f"pruned after {len(accuracy)} of {len(tasks)} tasks")

        evaluation, _ = evaluate_merge(self.suite, merged, split, tasks, on_task)  # the grids' evaluation
        missing = [t for t in tasks if t not in accuracy]
        if missing:
            raise RuntimeError(f"suite {self.suite.name} did not report task(s) {', '.join(missing)}")
        predictions.update(evaluation.predictions or {})
        record()
        return mean_metric(accuracy, individual, metric)

    def _check_surplus(self, trial: Any) -> None:
        import optuna

        TS = optuna.trial.TrialState
        live = trial.study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED, TS.RUNNING))
        numbers = sorted(t.number for t in live)
        if trial.number in numbers and numbers.index(trial.number) >= self.spec.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is beyond the requested {self.spec.trials} trials")


# --- what a trial is, and what its value means ----------------------------------------------------
def definition(config: ExperimentConfig) -> dict[str, Any]:
    """What defines a trial beyond its searched parameters, as the store's rows say it.

    The same rules as the store (`tatr.store.record.store_rows`): the exemplar count only when the
    merge uses exemplars (`tatr.core.trust_region.uses_exemplars`), the seed of the experiment.
    """
    merge = config.merge
    components = list(merge.components) if merge.components is not None else None
    exemplars = config.exemplars.n if uses_exemplars(merge.trust_region, merge.components) else None
    return {
        "method": merge.method,
        "trust_region": merge.trust_region,
        "components": components,
        "exemplars": exemplars,
        "seed": config.seed,
    }


def metric_name(metric: str, split: str) -> str:
    """The objective's name on the dashboard, e.g. "mean validation accuracy (%)"."""
    return f"mean {split} {metric.replace('_', ' ')} (%)"


def mean_metric(accuracy: Mapping[str, float], individual: Mapping[str, float], metric: str) -> float:
    """The mean over the tasks in `accuracy` of their accuracy or normalized accuracy.

    The objective (all tasks) and the intermediate value after each task (the tasks so far: every
    trial evaluates them in the same order, so at a given step all trials are compared on the
    same tasks). Normalized accuracy is `tatr.suites.evaluation.normalized_accuracy`'s.
    """
    from tatr.suites.evaluation import normalized_accuracy

    values = accuracy if metric == "accuracy" else normalized_accuracy(accuracy, individual)
    return sum(values.values()) / len(values)


class LatestValue(optuna.pruners.BasePruner):
    """A pruner that judges a trial by its latest intermediate value, not by its best so far.

    Optuna's percentile (median) pruner compares a trial's *best* intermediate value with the
    others' values at the current step. A running mean can fall from task to task, so its best
    would be an earlier, easier mean, compared with the others' later one. Shown its latest value
    at every step, the median pruner compares trials on the same tasks, as it did when the
    reported value was the part of the mean secured so far (a fixed fraction of the running mean
    at each step, so the same order and the same decisions). Successive halving already compares
    the values at the rung's step and needs no wrapper.
    """

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def prune(self, study: Any, trial: Any) -> bool:
        """The wrapped pruner's decision, on a copy of `trial` whose every value is its latest."""
        step = trial.last_step
        if step is None:
            return False
        view = copy.copy(trial)
        latest = trial.intermediate_values[step]
        view.intermediate_values = dict.fromkeys(trial.intermediate_values, latest)
        return bool(self.pruner.prune(study, view))


def make_pruner(name: str, num_tasks: int) -> optuna.pruners.BasePruner:
    """Steps are tasks; a trial's intermediate value is its mean over the tasks so far.

    A trial is judged once, when half of its tasks are in. Earlier, the comparison is as good as a
    task or two predict the mean, which on 8 unrelated tasks is poor (on the testbed, a pruner
    acting from the first task stopped the trial that would have been the best); judged at every
    later task too, a trial must beat the median four times in a row and most trials are stopped
    (41 of 50 in one testbed sweep). Once, at half, saves half of a below-median trial's evaluation.
    """
    half = max(1, num_tasks // 2)
    if name == "median":
        median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=half - 1, interval_steps=num_tasks)
        return LatestValue(median)
    if name == "halving":  # rungs at steps (half − 1)·2^r: the first once half of the tasks are in
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, half - 1), reduction_factor=2)
    return optuna.pruners.NopPruner()
