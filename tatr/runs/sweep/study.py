"""The study: created once with what it is about, and recovered when its workers die.

Creation. The study is created once (schema included) before any worker starts: workers racing on
an empty database collide on schema creation. It remembers a hash of the experiment and the search
space (resuming with another experiment under the same name is refused), names its metric for the
dashboard, and holds the paper default (λ=0.3, q=0.99) as its first, enqueued trial.

Recovery. A worker records its identity (host, pid, process start time) in the study before it
asks for its first trial (then the seed of its sampler, which it chooses from that registry: see
`tatr.runs.sweep.workers`), and in each trial it runs. A RUNNING trial whose recorded worker is on
this host and gone is failed and retried at once. A trial that died before its worker could sign
it (a kill -9 while the sampler was choosing its parameters) is failed at once too when no other
registered worker can still be alive; otherwise it gets `UNSIGNED_GRACE_SECONDS`, far more than
the milliseconds between Optuna creating a trial and the objective signing it. Other hosts' trials
are left to Optuna's RDB heartbeat (`fail_stale_trials` with its retry callback, see
`tatr.runs.sweep.storage`): the PID checks are our own code only because Optuna has no same-host
equivalent, and journal storages have no heartbeat.
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from typing import Any

import optuna

from tatr.core.cache import content_hash
from tatr.core.errors import TatrError
from tatr.core.outputs import safe_name
from tatr.runs.config import ExperimentConfig, config_dict
from tatr.runs.sweep.owners import owner_dead, worker_identity
from tatr.runs.sweep.space import SearchSpace, make_sampler
from tatr.runs.sweep.storage import retry_dead_trial
from tatr.runs.sweep.trial import make_pruner, metric_name

CREATION_WAIT_SECONDS = 30.0  # a study another process has just created gets its identity in milliseconds
UNSIGNED_GRACE_SECONDS = 60.0  # an unsigned running trial, while another worker may be in its ask()
REGISTRY = "tatr_worker:"  # study user attribute prefix: one per worker process that ran


# --- study creation (once, before the workers) -----------------------------------------------------
def default_study_name(experiment: str, space: str) -> str:
    """`<experiment>-<space file stem>`, refused with one line if it is not a safe name."""
    try:
        return safe_name(f"{experiment}-{space}", "study name")
    except TatrError as exc:
        raise TatrError(f"{exc}; give --study NAME") from None


def identity(config: ExperimentConfig, space: SearchSpace) -> str:
    """What a study is about: resuming it under another experiment or space would mix results."""
    return content_hash("sweep", config_dict(config), space.to_dict())


def create_study(storage: Any, name: str, config: ExperimentConfig, space: SearchSpace, num_tasks: int) -> Any:
    """Create the study (or load it after checking it is the same sweep).

    A new study gets its identity, its metric's name (optuna-dashboard shows it instead of
    "Objective 0") and the paper default as its first trial. Exactly one process creates it: two
    `tatr sweep`s started at once both try, the storage lets one win (Optuna's `create_study`
    without `load_if_exists`), and the other waits for the winner's identity instead of enqueuing
    the paper default a second time."""
    wanted = identity(config, space)
    options = {"storage": storage, "study_name": name, "direction": "maximize"}
    sampler, pruner = make_sampler(space, config.seed), make_pruner(space.pruner, num_tasks)
    try:
        study = optuna.create_study(**options, sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        return _check_identity(study, name, wanted)
    study.set_user_attr("tatr_config", config_dict(config))
    study.set_user_attr("tatr_space", space.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric_name(space.metric, config.split)])
    default = space.default_params()
    if default and space.sampler != "grid":
        study.enqueue_trial(default, user_attrs={"paper_default": True}, skip_if_exists=True)
    study.set_user_attr("tatr_identity", wanted)  # last: a study with its identity is complete
    return study


def _check_identity(study: Any, name: str, wanted: str) -> Any:
    """Wait (`CREATION_WAIT_SECONDS`) for a study another process is creating; refuse another sweep's."""
    deadline = time.monotonic() + CREATION_WAIT_SECONDS
    found = study.user_attrs.get("tatr_identity")
    while found is None and time.monotonic() < deadline:
        time.sleep(0.05)
        found = study.user_attrs.get("tatr_identity")
    if found is None:
        raise TatrError(
            f"study '{name}' exists and was not created by tatr sweep (or its creation was cut off); "
            "pick another --study name"
        )
    if found != wanted:
        raise TatrError(
            f"study '{name}' exists for a different experiment or search space ({found} ≠ {wanted}); "
            "pick another --study name"
        )
    return study


# --- recovery -------------------------------------------------------------------------------------
def register_worker(study: Any, seed: int | None = None) -> dict[str, Any]:
    """Record this process in the study before it asks for a trial (see the module docstring).

    Returns its identity (host, pid, start time). `seed`, once the worker has chosen it
    (`tatr.runs.sweep.workers.worker_seed`, which reads the registry this wrote), is added to the
    same entry, so a worker's draws can be reproduced."""
    me = worker_identity()
    entry = me if seed is None else {**me, "seed": seed}
    study.set_user_attr(f"{REGISTRY}{me['host']}:{me['pid']}:{me['started']}", entry)
    return me


def registered_workers(study: Any) -> list[dict[str, Any]]:
    """The registry: one entry (identity, and seed once chosen) per worker process that ran."""
    return [w for key, w in study.user_attrs.items() if key.startswith(REGISTRY) and isinstance(w, dict)]


def same_process(a: Any, b: Any) -> bool:
    """Whether two identities (registry entries, `worker` signatures) name the same process."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return all(a.get(k) == b.get(k) for k in ("host", "pid", "started"))


def _others_may_live(study: Any, me: dict[str, Any] | None) -> bool:
    for key, owner in study.user_attrs.items():
        if not key.startswith(REGISTRY) or same_process(owner, me):
            continue
        if not owner_dead(owner):  # alive here, or on another host where we cannot tell
            return True
    return False


def fail_dead_trials(study: Any, me: dict[str, Any] | None = None) -> list[int]:
    """Fail the running trials of dead workers on this host (and stale ones elsewhere); retry them.

    Other hosts: Optuna's heartbeats (`fail_stale_trials`, RDB storages). This host: our PID checks
    (see the module docstring), which need no grace period and also serve the journal storage,
    which has no heartbeat. Either way the retry is `storage.retry_dead_trial`. `me` is the calling
    worker's identity (None for the parent before its workers start).
    """

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other hosts, RDB heartbeats
    now, failed = dt.datetime.now(), []
    others: bool | None = None
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            if others is None:
                others = _others_may_live(study, me)
            started = trial.datetime_start or now
            if others and (now - started).total_seconds() < UNSIGNED_GRACE_SECONDS:
                continue
        elif not owner_dead(worker):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first
        retry_dead_trial(study, trial)
        failed.append(trial.number)
    return failed
