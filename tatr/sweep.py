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
   number of finished (complete or pruned) trials. A trial loads the plan once per process, then
   costs one masked multiply-add (`MergePlan.merged`) plus its evaluation; it reports after each task
   the part of the mean it has secured, so a median or successive-halving pruner stops hopeless ones.
5. The best trial is merged again and evaluated on test: the `final` run.

Resume. A worker records its host, pid and process start time in its running trial. A later start
fails the running trials of dead processes on this host at once, and `fail_stale_trials` fails
those of other hosts once their heartbeat (RDB storages) is stale; each failed trial is re-enqueued
with the same parameters. Trials are counted before they start (a trial that would exceed the
target is failed before evaluating anything), so the study ends with exactly the requested count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import difflib
import functools
import importlib
import json
import math
import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tatr.cache import cached_dir, content_hash, default_cache_root
from tatr.config import ExperimentConfig, MergeConfig, config_dict, config_hash, load_config, read_yaml_mapping
from tatr.errors import TatrError

PARAMS = ("lam", "q", "method", "trust_region", "ties_k")
PAPER_DEFAULT = {"lam": 0.3, "q": 0.99}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
METRICS = ("accuracy", "normalized_accuracy")
SPACE_KEYS = ("description", "merge", "params", "sampler", "pruner", "metric")
PLAN_FORMAT = 1  # bump when the cached plan's meaning changes
POLL_SECONDS = 0.5
UNSIGNED_GRACE_SECONDS = 60.0  # a running trial without a worker record after this long is dead


# --- search spaces ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a float range (low, high, log, step) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def grid_values(self) -> list[Any]:
        """The values a grid sampler visits: the choices, or low..high by step."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise TatrError(f"grid sampler: parameter '{self.name}' needs a list of values or a step")
        assert self.low is not None and self.high is not None
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def smallest(self) -> float:
        return min(self.choices) if self.choices is not None else float(self.low)  # type: ignore[type-var,arg-type]


@dataclass(frozen=True)
class SearchSpace:
    """A `sweeps/*.yaml` file: fixed merge settings, searched parameters, sampler, pruner, metric."""

    name: str
    merge: dict[str, Any] = field(default_factory=dict)
    params: tuple[ParamSpec, ...] = ()
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "accuracy"
    description: str = ""

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        params = tuple(
            ParamSpec(**{**p, "choices": tuple(p["choices"]) if p.get("choices") is not None else None})
            for p in data["params"]
        )
        return cls(**{**data, "params": params})

    def with_options(self, sampler: str | None = None, pruner: str | None = None) -> SearchSpace:
        out = dataclasses.replace(self, sampler=sampler or self.sampler, pruner=pruner or self.pruner)
        _check_choice("sampler", out.sampler, SAMPLERS, self.name)
        _check_choice("pruner", out.pruner, PRUNERS, self.name)
        if out.sampler == "grid":
            for p in out.params:
                p.grid_values()
        return out

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: p.grid_values() for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values()) if self.params else 1

    def default_params(self) -> dict[str, Any]:
        """The paper default (λ=0.3, q=0.99) for the searched parameters whose range holds it."""
        out = {}
        for name, value in PAPER_DEFAULT.items():
            spec = self.param(name)
            if spec is not None and spec.contains(value):
                out[name] = value
        return out

    def merge_overrides(self) -> list[str]:
        """The fixed `merge:` settings as `merge.key=value` overrides (JSON is valid YAML)."""
        return [f"merge.{k}={json.dumps(v)}" for k, v in self.merge.items()]


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; every mistake is a one-line `TatrError`."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search-space file")
    for key in raw:
        if key not in SPACE_KEYS:
            raise TatrError(f"{path}: unknown key '{key}'{_did_you_mean(key, SPACE_KEYS)}")
    merge = raw.get("merge") or {}
    if not isinstance(merge, dict):
        raise TatrError(f"{path}: 'merge' must be a mapping of merge settings")
    for key in merge:
        if key not in MergeConfig.model_fields:
            raise TatrError(f"{path}: unknown merge setting '{key}'{_did_you_mean(key, MergeConfig.model_fields)}")
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict) or not params_raw:
        raise TatrError(f"{path}: 'params' must map at least one of {', '.join(PARAMS)} to a range or a list")
    params = tuple(_param(path, name, spec) for name, spec in params_raw.items())
    space = SearchSpace(
        name=path.stem,
        merge=merge,
        params=params,
        sampler=str(raw.get("sampler", "tpe")),
        pruner=str(raw.get("pruner", "median")),
        metric=str(raw.get("metric", "accuracy")),
        description=str(raw.get("description", "")),
    )
    _check_choice("metric", space.metric, METRICS, path)
    return space.with_options()


def _param(path: Path, name: str, spec: Any) -> ParamSpec:
    if name not in PARAMS:
        raise TatrError(
            f"{path}: cannot search over '{name}'{_did_you_mean(name, PARAMS)} (known: {', '.join(PARAMS)})"
        )
    if isinstance(spec, list):
        if not spec:
            raise TatrError(f"{path}: params.{name}: the list of choices is empty")
        for value in spec:
            _check_value(path, name, value)
        return ParamSpec(name, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise TatrError(f"{path}: params.{name}: give a range {{low: …, high: …}} or a list of values")
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown:
        raise TatrError(f"{path}: params.{name}: unknown field '{unknown[0]}' (known: low, high, log, step)")
    if name in ("method", "trust_region"):
        raise TatrError(f"{path}: params.{name}: give a list of names, not a range")
    try:
        low, high = float(spec["low"]), float(spec["high"])
        step = None if spec.get("step") is None else float(spec["step"])
    except (KeyError, TypeError, ValueError):
        raise TatrError(f"{path}: params.{name}: a range needs numeric 'low' and 'high'") from None
    if not low < high:
        raise TatrError(f"{path}: params.{name}: low ({low}) must be below high ({high})")
    for value in (low, high):
        _check_value(path, name, value)
    return ParamSpec(name, low=low, high=high, log=bool(spec.get("log", False)), step=step)


def _check_value(path: Path, name: str, value: Any) -> None:
    """Refuse a value the merge would refuse, now rather than in trial 37."""
    from tatr.methods import get_method
    from tatr.trust_region import check_mode

    try:
        if name == "method":
            get_method(str(value))
        elif name == "trust_region":
            check_mode(str(value))
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise TatrError(f"expected a number, got {value!r}")
        elif name == "q" and not 0 < value <= 1:
            raise TatrError(f"q must be in (0, 1], got {value}")
        elif name == "ties_k" and not 0 < value <= 100:
            raise TatrError(f"ties_k must be in (0, 100], got {value}")
    except TatrError as exc:
        raise TatrError(f"{path}: params.{name}: {exc}") from None


def _did_you_mean(name: str, known: Sequence[str] | Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_choice(what: str, value: str, known: Sequence[str], where: object) -> None:
    if value not in known:
        raise TatrError(f"{where}: unknown {what} '{value}'{_did_you_mean(value, known)} (known: {', '.join(known)})")


def trial_config(base: ExperimentConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    """The base experiment with the trial's parameters in `merge` (searched parameters win)."""
    raw = config_dict(base)
    raw["merge"] = {**raw["merge"], **params}
    return ExperimentConfig.model_validate(raw)


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
        from tatr.merging import plan_merge
        from tatr.trust_region import NEEDS_GRADIENTS, check_mode

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
        from tatr.components import check_components
        from tatr.merging import MergePlan
        from tatr.methods import get_method
        from tatr.trust_region import NEEDS_GRADIENTS
        from tatr.vectors import open_task_set

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


# --- storage ---------------------------------------------------------------------------------------
def storage_url(storage: str | None, results: Path, workers: int) -> str:
    """Canonical storage URL: SQLite under results/ by default, a journal file for K workers."""
    if storage is None:
        if workers > 1:
            return f"journal:{(results / 'optuna.journal').resolve()}"
        return f"sqlite:///{(results / 'optuna.db').resolve()}"
    if storage.startswith("sqlite:///"):
        return f"sqlite:///{Path(storage[len('sqlite:///') :]).resolve()}"
    if storage.startswith("journal:"):
        return f"journal:{Path(storage[len('journal:') :]).resolve()}"
    if "://" in storage:
        return storage
    path = Path(storage)
    if path.suffix in (".journal", ".log"):
        return f"journal:{path.resolve()}"
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return f"sqlite:///{path.resolve()}"
    raise TatrError(
        f"--storage: '{storage}' is neither a URL (sqlite:///FILE, postgresql://USER@HOST:PORT/DB) "
        "nor a .db or .journal file"
    )


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for printing."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


def _sqlite_connect(path: str) -> Any:
    """SQLite in WAL mode with synchronous=NORMAL: a commit no longer waits for an fsync.

    A trial makes ~25 small commits; with the default rollback journal each one fsyncs (~10 ms on
    a busy disk, a quarter of a toy trial). WAL+NORMAL stays consistent across a killed process
    (only a power loss can drop the last commits) and lets readers (the dashboard) run alongside.
    """
    import sqlite3

    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def heartbeat_interval() -> int:
    """Seconds between heartbeats of a running trial (RDB storages); `TATR_HEARTBEAT` overrides."""
    try:
        return max(1, int(os.environ.get("TATR_HEARTBEAT", "20")))
    except ValueError:
        raise TatrError("TATR_HEARTBEAT must be a whole number of seconds") from None


def open_storage(url: str, heartbeat: bool = True) -> Any:
    """An Optuna storage for `url`; RDB schemas are created here, retried if another process races."""
    import optuna
    from optuna.storages.journal import JournalFileBackend
    from sqlalchemy.exc import SQLAlchemyError

    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"creator": functools.partial(_sqlite_connect, str(path))}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    interval = heartbeat_interval()
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": interval,
            "grace_period": 3 * interval,
            "heartbeat_stale_trial_callback": retry_failed_trial,
        }
    last: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                try:
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
                except TypeError:  # Optuna before the callback's rename
                    if "heartbeat_stale_trial_callback" not in kwargs:
                        raise
                    kwargs["failed_trial_callback"] = kwargs.pop("heartbeat_stale_trial_callback")
        except SQLAlchemyError as exc:  # concurrent schema creation, or the server is starting
            last = exc
            time.sleep(0.5 * (attempt + 1))
        except ImportError as exc:
            cause = exc.__cause__ or exc
            hint = " (for PostgreSQL: pip install 'psycopg[binary]')" if url.startswith("postgres") else ""
            raise TatrError(f"storage {redact(url)}: missing database driver: {cause}{hint}") from None
    raise TatrError(f"storage {redact(url)}: cannot open ({str(last).splitlines()[0]})")


# --- study creation (once, before the workers) -----------------------------------------------------
def identity(config: ExperimentConfig, space: SearchSpace) -> str:
    """What a study is about: resuming it under another experiment or space would mix results."""
    return content_hash("sweep", config_dict(config), space.to_dict())


def make_sampler(space: SearchSpace, seed: int) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if space.sampler == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=seed)
        if space.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(name: str, num_tasks: int) -> Any:
    """Steps are tasks; a trial's intermediate value is the part of its mean already secured.

    A trial is judged once, when half of its tasks are in. Earlier, the comparison is as good as a
    task or two predict the mean, which on 8 unrelated tasks is poor (on the testbed, a pruner
    acting from the first task stopped the trial that would have been the best); judged at every
    later task too, a trial must beat the median four times in a row and most trials are stopped
    (41 of 50 in one testbed sweep). Once, at half, saves half of a below-median trial's evaluation.
    """
    import optuna

    half = max(1, num_tasks // 2)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=half - 1, interval_steps=num_tasks)
    if name == "halving":  # rungs at steps (half − 1)·2^r: the first once half of the tasks are in
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, half - 1), reduction_factor=2)
    return optuna.pruners.NopPruner()


def create_study(storage: Any, name: str, config: ExperimentConfig, space: SearchSpace, num_tasks: int) -> Any:
    """Create the study (or load it after checking it is the same sweep); enqueue the paper default."""
    import optuna

    wanted = identity(config, space)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=make_sampler(space, config.seed),
        pruner=make_pruner(space.pruner, num_tasks),
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if "tatr_identity" not in attrs and not study.trials:
        study.set_user_attr("tatr_identity", wanted)
        study.set_user_attr("tatr_config", config_dict(config))
        study.set_user_attr("tatr_space", space.to_dict())
        default = space.default_params()
        if default and space.sampler != "grid":
            study.enqueue_trial(default, user_attrs={"paper_default": True}, skip_if_exists=True)
    elif attrs.get("tatr_identity") is None:
        raise TatrError(f"study '{name}' exists and was not created by tatr sweep; pick another --study name")
    elif attrs["tatr_identity"] != wanted:
        raise TatrError(
            f"study '{name}' exists for a different experiment or search space "
            f"({attrs['tatr_identity']} ≠ {wanted}); pick another --study name"
        )
    return study


# --- workers ---------------------------------------------------------------------------------------
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


def worker_identity() -> dict[str, Any]:
    import psutil

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def retry_failed_trial(study: Any, trial: Any) -> None:
    """Re-enqueue a trial whose worker died, with its parameters (at most twice per original trial)."""
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= 2 or not trial.params:
        return
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number, "retries": retries + 1})


def fail_dead_trials(study: Any) -> list[int]:
    """Fail the running trials of dead workers on this host (and stale ones elsewhere); re-enqueue them."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other hosts, RDB heartbeats
    host, now, failed = socket.gethostname(), dt.datetime.now(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            started = trial.datetime_start or now
            if (now - started).total_seconds() < UNSIGNED_GRACE_SECONDS:
                continue
        elif worker.get("host") != host or process_alive(int(worker["pid"]), float(worker["started"])):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first
        retry_failed_trial(study, trial)
        failed.append(trial.number)
    return failed


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
            from tatr.evaluate import normalized_accuracy
            from tatr.tracking import RECORD_ATTR, payload

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


def run_worker(
    spec: SweepSpec,
    index: int = 0,
    on_trial: Callable[[Any, Any], None] | None = None,
    logger: Any = None,
) -> None:
    """Run trials until the study holds `spec.trials` finished ones (any worker's count).

    `logger` is the process's `WandbLogger` (one per process, so a W&B failure warns once).
    """
    import optuna

    from tatr.tracking import TrialCallback, WandbLogger

    load_plugins()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec.storage)
    space = SearchSpace.from_dict(spec.space)
    objective = Objective(spec)
    pruner = make_pruner(space.pruner, len(objective.suite.tasks))
    study = optuna.load_study(study_name=spec.study, storage=storage, pruner=pruner)
    study.sampler = make_sampler(space, _worker_seed(spec.seed, index, len(study.trials)))
    logger = logger if logger is not None else WandbLogger(spec.results, spec.wandb)
    callbacks: list[Callable[[Any, Any], None]] = [TrialCallback(spec.results, logger)]
    if on_trial is not None:
        callbacks.append(on_trial)
    while True:
        fail_dead_trials(study)
        finished, running = counts(study)
        if finished >= spec.trials:
            return
        if finished + running >= spec.trials:
            time.sleep(POLL_SECONDS)  # the last trials are running elsewhere; wait for them or their death
            continue
        study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(SurplusTrial,), gc_after_trial=False)


def _worker_seed(seed: int, index: int, existing: int) -> int:
    """A fresh study with one worker samples exactly as `seed` says; resumes and extra workers differ."""
    if index == 0 and existing <= 1:
        return seed
    return int(content_hash("worker-seed", seed, index, existing), 16) % (2**31)


def _spawned_worker(spec: SweepSpec, index: int) -> None:
    import sys

    try:
        run_worker(spec, index)
    except TatrError as exc:
        print(f"tatr: worker {index}: error: {exc}", file=sys.stderr)
        sys.exit(2)


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
    test: Any = None  # tatr.evaluate.Evaluation of the final run, or None
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
    """The whole of `tatr sweep` (see the module docstring)."""
    import optuna

    from tatr.suites import get_suite
    from tatr.tracking import WandbLogger, reconcile, wandb_mode

    started = time.perf_counter()
    load_plugins()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if trials < 1:
        raise TatrError(f"--trials must be at least 1, got {trials}")
    if workers < 1:
        raise TatrError(f"--workers must be at least 1, got {workers}")
    space = load_search_space(sweep).with_options(sampler, pruner)
    config = load_config(experiment, [*space.merge_overrides(), *overrides])
    if config.split == "test" and not allow_test_tuning:
        raise TatrError(
            "refusing to tune on the test split (split=test); use the validation split, "
            "or pass --allow-test-tuning if you really mean it"
        )
    if space.sampler == "grid" and space.grid_size() < trials:
        echo(f"note: the grid has {space.grid_size()} points; the study stops there, not at {trials}")
        trials = space.grid_size()
    results = Path(results)
    name = study or f"{config.name}-{space.name}"
    url = storage_url(storage, results, workers)
    suite = get_suite(config.benchmark, config.suite)
    plans = PlanBook(suite, config, q_min_of(space, config), progress=progress)
    for mode in modes_of(space, config):  # everything trial-independent, once, before the workers
        plans.folder(mode)
    optuna_storage = open_storage(url)
    the_study = create_study(optuna_storage, name, config, space, len(suite.tasks))
    if create_only:
        echo(f"Created study '{name}' in {redact(url)}")
        return SweepResult(name, url, results, trials, 0, 0, metric=space.metric, seconds=time.perf_counter() - started)
    logger = WandbLogger(results, wandb)
    reconcile(the_study, results, logger)
    spec = SweepSpec(config_dict(config), space.to_dict(), name, url, trials, str(results), wandb, config.seed)
    with _progress(the_study, trials, progress) as bar:
        if counts(the_study)[0] >= trials:
            pass  # already complete: no worker to start
        elif workers == 1:
            run_worker(spec, 0, on_trial=bar, logger=logger)
        else:
            _run_workers(spec, workers, the_study, bar)
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


def _run_workers(spec: SweepSpec, workers: int, study: Any, bar: Callable[..., None]) -> None:
    """K worker processes on this machine; the parent only watches the storage for the progress bar."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spawned_worker, args=(spec, i), name=f"tatr-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            bar(study, None)
            time.sleep(POLL_SECONDS)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    bar(study, None)
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode]
    if bad:
        i, code = bad[0]
        raise TatrError(f"sweep worker {i} failed (exit code {code}); its error is printed above")


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

    from tatr.tracking import RECORD_ATTR

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
    from tatr.evaluate import evaluate_merged
    from tatr.store import read_store
    from tatr.tracking import RunRecord, in_store, run_id_for, write_store

    best = study.best_trial
    run_id = run_id_for(study.study_name, best.number, best.datetime_start, job_type="final")
    result.final_run_id = run_id
    cfg = trial_config(config, best.params)
    if in_store(results, run_id):
        rows = read_store(results)
        rows = rows[rows["run_id"] == run_id]
        from tatr.evaluate import Evaluation

        result.test = Evaluation(
            "test",
            dict(zip(rows["task"], rows["accuracy"], strict=True)),
            {},
            dict(zip(rows["task"], rows["normalized_accuracy"], strict=True)),
        )
        return
    merged, seconds, mask = merge_once(plans, cfg.merge)
    start = time.perf_counter()
    evaluation = evaluate_merged(plans.suite, merged, "test")
    rec = RunRecord(
        run_id=run_id,
        study=study.study_name,
        trial=best.number,
        job_type="final",
        config=config_dict(cfg),
        config_hash=config_hash(cfg),
        split="test",
        accuracy=evaluation.accuracy,
        normalized=evaluation.normalized,
        merge_seconds=seconds,
        eval_seconds=time.perf_counter() - start,
        mask=None if mask is None else {k: [d, n] for k, (d, n) in mask.items()},
        params=dict(best.params),
        value=evaluation.mean_accuracy,
    )
    if write_store(results, rec):
        logger.log(rec)
    result.test = evaluation
