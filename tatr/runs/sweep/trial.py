"""One sweep trial: the plans built once per process, the objective, and the per-task metrics.

A trial costs one masked multiply-add (`MergePlan.merged`) plus its evaluation; everything that
does not depend on the trial's parameters is in a `PlanBook`, built once and shared through a
content-addressed cache folder. The objective reports after each task the part of the mean it has
secured, so that a pruner can stop a hopeless trial early.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tatr.core.cache import cached_dir, content_hash, default_cache_root
from tatr.core.errors import TatrError
from tatr.runs.config import ExperimentConfig, MergeConfig, config_dict, config_hash
from tatr.runs.sweep.space import SearchSpace, trial_config
from tatr.runs.sweep.storage import worker_identity

PLAN_FORMAT = 2  # bump when the cached plan's meaning changes (2: float64 arenas for float64 models)


# --- plugins (suites registered by other modules, e.g. a test's toy suite) -------------------------
def load_plugins() -> None:
    """Import the modules named in `TATR_PLUGINS` (comma-separated) so their registrations run."""
    for name in filter(None, (m.strip() for m in os.environ.get("TATR_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise TatrError(f"TATR_PLUGINS: cannot import '{name}' ({exc})") from None


# --- merge plans: built once, content-addressed, shared by workers ---------------------------------
class PlanBook:
    """Per process: the suite's inputs and one `MergePlan` per (method, mode, TIES k, components).

    Arenas (Σ τ, Ω, the drop ranking) depend only on the checkpoints, the trust-region mode and the
    gradient files, so one cache folder per mode serves every method.
    """

    def __init__(self, suite: Any, config: ExperimentConfig, q_min: float, progress: bool = False) -> None:
        self.suite = suite
        self.config = config
        self.q_min = q_min
        self.progress = progress
        ckpt = suite.checkpoints()
        self.pretrained = Path(ckpt.pretrained)
        self.finetuned = [Path(ckpt.finetuned[t]) for t in suite.tasks]
        self._grads: Any = None
        self._plans: dict[tuple, Any] = {}
        self._folders: dict[str, Path] = {}

    def gradients(self) -> Any:
        if self._grads is None:
            ex = self.config.exemplars
            self._grads = self.suite.exemplar_gradients(ex.n, ex.seed)
        return self._grads

    def _gradient_files(self, signed: bool = False) -> list[Path]:
        grads = self.gradients()
        files = grads.signed_mean if signed else grads.abs_mean
        return [Path(files[t]) for t in self.suite.tasks]

    def folder(self, mode: str) -> Path:
        """The cached arenas of `mode`, built here if no process built them before."""
        from tatr.core.merging import plan_merge
        from tatr.core.trust_region import NEEDS_GRADIENTS, check_mode

        check_mode(mode)
        if mode in self._folders:
            return self._folders[mode]
        grads = self._gradient_files() if mode in NEEDS_GRADIENTS else None
        key = content_hash("sweep-plan", PLAN_FORMAT, self.pretrained, self.finetuned, mode, grads)

        def build(tmp: Path) -> None:
            plan = plan_merge(
                self.pretrained, self.finetuned, trust_region=mode, gradients=grads, progress=self.progress
            )
            plan.prepare([self.q_min])
            plan.save(tmp)

        self._folders[mode] = cached_dir(default_cache_root() / "sweep-plans", key, build)
        return self._folders[mode]

    def get(self, merge: MergeConfig) -> Any:
        """The plan for one merge configuration (loaded once per process)."""
        from tatr.core.components import check_components
        from tatr.core.merging import MergePlan
        from tatr.core.methods import get_method
        from tatr.core.trust_region import NEEDS_GRADIENTS
        from tatr.core.vectors import open_task_set

        components = check_components(merge.components)
        key = (merge.method, merge.trust_region, merge.ties_k, components)
        if key in self._plans:
            return self._plans[key]
        method = get_method(merge.method)
        if components is not None and merge.trust_region == "off":
            raise TatrError("components need a trust region: choose a trust-region mode other than 'off'")
        folder = self.folder(merge.trust_region)
        grads = self._gradient_files() if merge.trust_region in NEEDS_GRADIENTS else None
        signed = self._gradient_files(signed=True) if components is not None else None
        task_set = open_task_set(self.pretrained, self.finetuned, grads, signed)
        plan = MergePlan.load(
            folder, task_set, method, merge.trust_region, merge.ties_k, components, cache_pretrained=True
        )
        plan.prepare([self.q_min])
        self._plans[key] = plan
        return plan


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
        self.suite = suite or get_suite(self.config.benchmark, self.config.suite)
        self.plans = plans or PlanBook(self.suite, self.config, q_min_of(self.space, self.config))
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
        merged, seconds, mask = merge_once(self.plans, cfg.merge)
        split, tasks = cfg.split, tuple(self.suite.tasks)
        individual = self.individual(split)
        metric = self.space.metric
        accuracy: dict[str, float] = {}
        start = time.perf_counter()

        def record() -> None:
            from tatr.runs.tracking import RECORD_ATTR, payload
            from tatr.suites.scoring import normalized_accuracy

            normalized = normalized_accuracy(accuracy, individual)
            elapsed = time.perf_counter() - start
            data = payload(config_dict(cfg), config_hash(cfg), split, accuracy, normalized, seconds, elapsed, mask)
            trial.set_user_attr(RECORD_ATTR, data)

        def on_task(task: str, acc: float) -> None:
            accuracy[task] = acc
            trial.report(secured(accuracy, individual, tasks, metric), step=len(accuracy) - 1)
            if len(accuracy) < len(tasks) and trial.should_prune():
                record()
                raise optuna.TrialPruned(f"pruned after {len(accuracy)} of {len(tasks)} tasks")

        self.suite.evaluate(merged, split, tasks, on_task)
        missing = [t for t in tasks if t not in accuracy]
        if missing:
            raise RuntimeError(f"suite {self.suite.name} did not report task(s) {', '.join(missing)}")
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


def merge_once(plans: PlanBook, merge: MergeConfig) -> tuple[dict, float, dict[str, tuple[int, int]] | None]:
    """The merged state dict, the seconds the merge took, and the mask statistics (None without a mask)."""
    plan = plans.get(merge)
    start = time.perf_counter()
    merged = plan.merged(merge.q, merge.lam)
    seconds = time.perf_counter() - start
    mask = None if merge.trust_region == "off" else plan.mask_stats(merge.q)
    return merged, seconds, mask


def task_metric(acc: float, individual: float, metric: str) -> float:
    if metric == "accuracy":
        return acc
    return 100.0 * acc / individual if individual > 0 else float("nan")


def mean_metric(accuracy: Mapping[str, float], individual: Mapping[str, float], metric: str) -> float:
    return sum(task_metric(a, individual[t], metric) for t, a in accuracy.items()) / len(accuracy)


def secured(accuracy: Mapping[str, float], individual: Mapping[str, float], tasks: Sequence[str], metric: str) -> float:
    """The part of the final mean a trial has secured: measured tasks summed, divided by all tasks.

    Why not the running mean: Optuna's pruners compare a trial's *best* intermediate value (the
    maximum over its steps, for maximisation) with the other trials' values at the same step. This
    value never decreases from task to task, so its best is its latest; and at the same step all
    trials have measured the same tasks, so the comparison orders them like their running means.
    At the last step it is the objective itself.
    """
    return sum(task_metric(a, individual[t], metric) for t, a in accuracy.items() if t in tasks) / len(tasks)
