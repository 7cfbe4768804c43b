"""`tatr sweep`: an Optuna study over a merging configuration, tuned on validation, tested once.

The flow of one sweep (`run_sweep`):
1. Load the search space (`sweeps/*.yaml`) and the experiment; the space's fixed `merge:` settings
   and then the command line's `key=value` overrides are applied to the experiment.
2. Build, once, everything that does not depend on a trial's parameters: the suite's checkpoints,
   exemplar gradients (modes that need them), and per trust-region mode a merge plan (Σ τ, Ω and
   the drop ranking down to the lowest q of the space), saved in a content-addressed cache folder
   keyed by the checkpoint files, the mode and the gradient files. Workers only load it.
3. Create the study once (schema included) before any worker starts: workers racing on an empty
   database collide on schema creation. The study remembers a hash of the experiment and space;
   resuming with another experiment under the same name is refused.
4. Workers (this process, or K spawned processes) run trials until the study holds the requested
   number of finished (complete or pruned) trials. With one worker, this process's suite and plan
   book of step 2 serve the trials (nothing is built twice); a spawned worker builds its own from
   the cache. A trial loads the plan once per process, then costs one masked multiply-add
   (`MergePlan.merged`) plus its evaluation (`tatr.runs.tune.evaluate_merge`, as a grid's: a
   non-finite merged model is refused); it reports after each task its mean over the tasks so far,
   so a median or successive-halving pruner stops hopeless ones.
5. The best trial is merged again and evaluated on test: the `final` run.

Resume. A worker records its host, pid and process start time in the study and in its running
trial. A later start fails the running trials of dead processes on this host at once, and
`fail_stale_trials` fails those of other hosts once their heartbeat (RDB storages) is stale; each
failed trial is retried with the same parameters (`tatr.runs.sweep.study`). Trials are counted before they start (a
trial that would exceed the target is failed before evaluating anything), so the study ends with
exactly the requested count.

The parts: `space` (search spaces, checked at the door), `storage` (storage URLs, opening, the
retry of a dead trial; `owners` and `journal` beneath it), `study` (creation and recovery),
`trial` (the objective, its reports and attributes), `workers` (the worker loop, processes,
signals), and this module (the run, its summary and the final test).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError
from tatr.core.outputs import safe_name
from tatr.runs.config import ExperimentConfig, config_dict, config_hash, load_config
from tatr.runs.plan import PlanBook
from tatr.runs.sweep.owners import worker_identity
from tatr.runs.sweep.space import SearchSpace, load_search_space, trial_config
from tatr.runs.sweep.storage import open_storage, redact, storage_url
from tatr.runs.sweep.study import create_study, default_study_name, fail_dead_trials
from tatr.runs.sweep.trial import SweepSpec, counts, modes_of, q_min_of
from tatr.runs.sweep.workers import load_plugins, run_worker, run_workers
from tatr.runs.tune import refuse_test_tuning, test_choice

MAX_WORKERS = max(8, 4 * (os.cpu_count() or 1))


# --- the whole sweep -------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What `tatr sweep` prints at the end, and what tests check."""

    study: str
    storage: str
    results: Path
    trials: int
    complete: int
    pruned: int
    best_number: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    metric: str = "accuracy"
    validation: dict[str, float] = field(default_factory=dict)
    test: Any = None  # tatr.suites.evaluation.Evaluation of the final run, or None
    final_run_id: str | None = None
    wandb_dir: Path | None = None
    wandb_note: str = ""
    seconds: float = 0.0

    def table(self) -> str:
        lines = [
            f"Study '{self.study}': {self.complete + self.pruned} trials "
            f"({self.complete} complete, {self.pruned} pruned) in {self.seconds:.1f} s",
        ]
        if self.best_number is None:
            lines.append("No completed trial yet.")
        else:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best_params.items())
            lines.append(
                f"Best trial #{self.best_number}: {params}  (mean validation {self.metric} {self.best_value:.2f})"
            )
            tasks = list(self.validation)
            width = max(len("average"), *(len(t) for t in tasks))
            lines.append(f"{'task':<{width}}  {'val acc %':>9}  {'test acc %':>10}  {'test norm %':>11}")
            lines.append("-" * (width + 36))
            test_acc = self.test.accuracy if self.test is not None else {}
            test_norm = self.test.normalized if self.test is not None else {}
            for t in tasks:
                val, acc, norm = self.validation[t], _num(test_acc.get(t)), _num(test_norm.get(t))
                lines.append(f"{t:<{width}}  {val:9.2f}  {acc:>10}  {norm:>11}")
            lines.append("-" * (width + 36))
            val_mean = sum(self.validation.values()) / len(self.validation)
            t_mean = self.test.mean_accuracy if self.test is not None else None
            n_mean = self.test.mean_normalized if self.test is not None else None
            lines.append(f"{'average':<{width}}  {val_mean:9.2f}  {_num(t_mean):>10}  {_num(n_mean):>11}")
        lines.append(f"Results store: {self.results / 'store'}  (final run: {self.final_run_id or 'none'})")
        lines.append(f"Optuna storage: {redact(self.storage)}")
        lines.append(f"Dashboard: tatr dashboard --storage '{redact(self.storage)}'")
        if self.wandb_dir is not None:
            lines.append(f"W&B runs: {self.wandb_dir} {self.wandb_note}".rstrip())
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def run_sweep(
    experiment: str | Path | None,
    sweep: str | Path,
    overrides: Sequence[str] = (),
    *,
    space_overrides: Sequence[str] = (),
    trials: int = 50,
    study: str | None = None,
    storage: str | None = None,
    workers: int = 1,
    sampler: str | None = None,
    pruner: str | None = None,
    allow_test_tuning: bool = False,
    wandb: bool = True,
    final: bool = True,
    create_only: bool = False,
    results: str | Path = "results",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """The whole of `tatr sweep` (see the module docstring).

    `overrides` are the experiment's `key=value`s; `space_overrides` the search space's, in the same
    syntax (`params.lam.high=2`, `sampler=random`)."""
    import optuna

    from tatr.runs.tracking import WandbLogger, reconcile, wandb_mode
    from tatr.suites import get_suite

    started = time.perf_counter()
    load_plugins()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if trials < 1:
        raise TatrError(f"--trials must be at least 1, got {trials}")
    if workers < 1:
        raise TatrError(f"--workers must be at least 1, got {workers}")
    if workers > MAX_WORKERS:
        raise TatrError(f"--workers {workers} is more than {MAX_WORKERS} (4 per CPU core) on this machine")
    space = load_search_space(sweep, space_overrides).with_options(sampler, pruner)
    config = load_config(experiment, [*space.merge_overrides(), *overrides])
    refuse_test_tuning(config.split, allow_test_tuning, "pass --allow-test-tuning")
    if space.sampler == "grid" and space.grid_size() < trials:
        echo(f"note: the grid has {space.grid_size()} points; the study stops there, not at {trials}")
        trials = space.grid_size()
    results = Path(results)
    name = safe_name(study, "--study") if study is not None else default_study_name(config.name, space.name)
    url = storage_url(storage, results, workers)
    optuna_storage = open_storage(url)  # a damaged storage gets its one line before the long work
    suite = get_suite(config.benchmark, config.suite)
    plans = PlanBook(suite, config, q_min_of(space, config), progress=progress)
    for mode in modes_of(space, config):  # everything trial-independent, once, before the workers
        plans.folder(mode)
    the_study = create_study(optuna_storage, name, config, space, len(suite.tasks))
    if create_only:
        echo(f"Created study '{name}' in {redact(url)}")
        return SweepResult(name, url, results, trials, 0, 0, metric=space.metric, seconds=time.perf_counter() - started)
    logger = WandbLogger(results, wandb)
    logger.check()  # an unreachable server costs seconds once, here, and W&B is off for the sweep
    reconcile(the_study, results, logger)
    fail_dead_trials(the_study, worker_identity())  # before our workers register: dead local trials go now
    use_wandb = wandb and logger.failed is None
    spec = SweepSpec(config_dict(config), space.to_dict(), name, url, trials, str(results), use_wandb, config.seed)
    with _progress(the_study, trials, progress) as bar:
        if counts(the_study)[0] >= trials:
            pass  # already complete: no worker to start
        elif workers == 1:
            run_worker(spec, 0, on_trial=bar, logger=logger, suite=suite, plans=plans)  # what is built, reused
        else:
            run_workers(spec, workers, the_study, bar)
    reconcile(the_study, results, logger)
    result = _summarize(the_study, space, url, results, trials, logger)
    if final and result.best_number is not None:
        _final(the_study, result, config, plans, results, logger)
    if wandb and logger.enabled:
        mode = wandb_mode()
        result.wandb_dir = logger.folder
        if logger.failed:
            result.wandb_note = f"(W&B failed: {logger.failed})"
        elif mode == "offline":
            result.wandb_note = f"(offline; upload with: wandb sync {logger.folder}/offline-run-*)"
        else:
            result.wandb_note = f"({mode})"
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _progress(study: Any, total: int, enabled: bool) -> Iterator[Callable[[Any, Any], None]]:
    """A tqdm bar over finished trials with the best value so far; call it as an Optuna callback."""
    from tqdm.auto import tqdm

    finished, _ = counts(study)
    bar = tqdm(
        total=total,
        initial=min(finished, total),
        desc=f"sweep {study.study_name}",
        unit="trial",
        disable=not enabled,
        dynamic_ncols=True,
    )

    def update(study_: Any, _trial: Any) -> None:
        done, _ = counts(study_)
        bar.n = min(done, total)
        try:
            best = study_.best_trial
            bar.set_postfix_str(f"best {best.value:.2f} (#{best.number})", refresh=False)
        except ValueError:
            pass
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _summarize(study: Any, space: SearchSpace, url: str, results: Path, trials: int, logger: Any) -> SweepResult:
    import optuna

    from tatr.runs.tracking import RECORD_ATTR

    TS = optuna.trial.TrialState
    complete = len(study.get_trials(deepcopy=False, states=(TS.COMPLETE,)))
    pruned = len(study.get_trials(deepcopy=False, states=(TS.PRUNED,)))
    result = SweepResult(study.study_name, url, results, trials, complete, pruned, metric=space.metric)
    if complete:
        best = study.best_trial
        result.best_number, result.best_params, result.best_value = best.number, dict(best.params), best.value
        result.validation = dict(best.user_attrs.get(RECORD_ATTR, {}).get("accuracy", {}))
    return result


def _final(
    study: Any, result: SweepResult, config: ExperimentConfig, plans: PlanBook, results: Path, logger: Any
) -> None:
    """Merge the best trial again and evaluate it on test; skipped when the store already has it."""
    from tatr.store.record import RunRecord, in_store, suite_model, write_store
    from tatr.store.rows import read_store
    from tatr.store.run_ids import sweep_run_id

    best = study.best_trial
    run_id = sweep_run_id(study.study_name, best.number, best.datetime_start, job_type="final")
    result.final_run_id = run_id
    cfg = trial_config(config, best.params)
    if in_store(results, run_id):
        rows = read_store(results)
        rows = rows[rows["run_id"] == run_id]
        from tatr.suites.evaluation import Evaluation

        result.test = Evaluation(
            "test",
            dict(zip(rows["task"], rows["accuracy"], strict=True)),
            {},
            dict(zip(rows["task"], rows["normalized_accuracy"], strict=True)),
        )
        return
    tested = test_choice(plans, cfg.merge, cfg.exemplars, "test")
    rec = RunRecord.merged(
        run_id=run_id,
        study=study.study_name,
        trial=best.number,
        job_type="final",
        config=config_dict(cfg),
        config_hash=config_hash(cfg),
        model=suite_model(plans.suite),
        split="test",
        accuracy=tested.evaluation.accuracy,
        normalized=tested.evaluation.normalized,
        merge_seconds=tested.merge_seconds,
        eval_seconds=tested.eval_seconds,
        mask=tested.mask_lists(),
        params=dict(best.params),
        value=tested.evaluation.mean_accuracy,
        predictions=tested.evaluation.predictions,
    )
    if write_store(results, rec):
        logger.log(rec)
    result.test = tested.evaluation
