"""Tracking: every trial and final evaluation goes to the results store, and is mirrored to W&B.

The store (`tatr.store.rows`) is the source of truth; W&B is a convenience that may fail. So:
* A `RunRecord` (`tatr.store.record`, the one writer of store rows) is plain data; a trial's is
  built from what the objective leaves in the Optuna trial's user attributes (per-task accuracy,
  mask statistics, timings, the resolved config). Optuna's storage is transactional, so a trial
  that Optuna marks finished always carries its record.
* `TrialCallback` (our own small Optuna callback; optuna-integration's W&B callback is
  deprecated) writes the store rows and one W&B run per finished trial.
* A worker killed between Optuna's `tell` and the callback leaves a finished trial without rows;
  `reconcile` writes them on the next start. Store files are named by a run id derived from the
  study, the trial number and its start time (`tatr.store.run_ids.sweep_run_id`), so a trial can
  never get two files, whoever writes.
* W&B: one run per trial, `group` = study, `job_type` = trial | final, tags for benchmark, method
  and trust-region mode, the resolved config in `wandb.config`. Offline by default, under the
  results folder; online when `WANDB_MODE`/`WANDB_API_KEY` say so. Online, the server is probed
  once before the first trial (`PROBE_SECONDS`): one that does not answer costs those seconds, not
  `wandb.init`'s 90 s per worker. Any W&B failure (no network, a bad key, a broken install) warns
  once and turns W&B off for the sweep; the store still gets every row.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tatr.store.predictions import TaskPredictions, prediction_columns, predictions_from_row
from tatr.store.record import RunRecord, in_store, wandb_config, write_store
from tatr.store.rows import git_commit
from tatr.store.run_ids import sweep_run_id

RECORD_ATTR = "tatr"  # the trial user attribute holding the record's payload
OFFLINE_MODES = ("offline", "dryrun", "disabled")
PROBE_SECONDS = 3.0  # the one wait an unreachable W&B server costs a sweep
INIT_TIMEOUT = 30.0  # wandb.init's wait for a server that answered the probe (W&B's default: 90 s)


# --- a trial's record ------------------------------------------------------------------------------
def payload(
    config: dict[str, Any],
    config_hash: str,
    split: str,
    accuracy: Mapping[str, float],
    normalized: Mapping[str, float],
    merge_seconds: float,
    eval_seconds: float,
    mask: Mapping[str, tuple[int, int]] | None,
    model: str | None = None,
    predictions: Mapping[str, TaskPredictions] | None = None,
) -> dict[str, Any]:
    """What the objective stores in the trial's user attributes (JSON-able); `model` is the suite's,
    `predictions` each task's per-example outcome, kept as the store row will hold it."""
    data: dict[str, Any] = {
        "config": config,
        "config_hash": config_hash,
        "model": model,
        "split": split,
        "accuracy": dict(accuracy),
        "normalized": dict(normalized),
        "merge_seconds": merge_seconds,
        "eval_seconds": eval_seconds,
        "mask": None if mask is None else {k: [int(d), int(n)] for k, (d, n) in mask.items()},
    }
    if predictions:
        data["predictions"] = {t: prediction_columns(p, split) for t, p in predictions.items()}
    return data


def trial_predictions(stored: Any) -> dict[str, TaskPredictions] | None:
    """The predictions a trial's payload kept (None for trials recorded before payloads had them)."""
    if not isinstance(stored, Mapping):
        return None
    out = {t: predictions_from_row(c) for t, c in stored.items() if isinstance(c, Mapping)}
    return {t: p for t, p in out.items() if p is not None} or None


def record_from_trial(study: str, trial: Any) -> RunRecord | None:
    """The record of a finished Optuna trial (a FrozenTrial), or None if it evaluated nothing."""
    data = trial.user_attrs.get(RECORD_ATTR)
    state = trial.state.name
    if not data or state not in ("COMPLETE", "PRUNED") or not data.get("accuracy"):
        return None
    return RunRecord.merged(
        run_id=sweep_run_id(study, trial.number, trial.datetime_start),
        study=study,
        trial=trial.number,
        job_type="trial",
        config=data["config"],
        config_hash=data["config_hash"],
        model=data.get("model"),  # None in a trial recorded before payloads had it: the config's
        split=data["split"],
        accuracy=data["accuracy"],
        normalized=data["normalized"],
        merge_seconds=data.get("merge_seconds"),
        eval_seconds=data.get("eval_seconds"),
        mask=data.get("mask"),
        predictions=trial_predictions(data.get("predictions")),
        params=dict(trial.params),
        state=state,
        value=trial.value if state == "COMPLETE" else None,
    )


# --- W&B -------------------------------------------------------------------------------------------
def wandb_mode() -> str:
    """`WANDB_MODE` if set; online when an API key is configured; offline otherwise."""
    mode = os.environ.get("WANDB_MODE", "").strip()
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger:
    """One W&B run per record; the first failure warns once and disables W&B for this process."""

    def __init__(self, root: str | Path, enabled: bool = True, project: str | None = None) -> None:
        self.root = Path(root)
        self.enabled = enabled and wandb_mode() != "disabled"
        self.project = project or os.environ.get("WANDB_PROJECT") or "tatr"
        self.failed: str | None = None

    @property
    def folder(self) -> Path:
        """Where W&B writes its run folders (`<results>/wandb`)."""
        return self.root / "wandb"

    def check(self) -> bool:
        """Online modes: ask the W&B server once, with a short timeout; False (and W&B off) if it
        does not answer. Why: `wandb.init` waits `init_timeout` (90 s by default) for a server
        that is down, and would do so for the first trial of every worker."""
        if not self.enabled or self.failed is not None:
            return False
        if wandb_mode() in OFFLINE_MODES:
            return True
        url = wandb_base_url()
        problem = probe_server(url, PROBE_SECONDS)
        if problem is not None:
            self._fail(f"server {url} unreachable: {problem}")
            return False
        return True

    def log(self, rec: RunRecord) -> bool:
        """Log one run; True if W&B took it. Never raises."""
        if not self.enabled or self.failed is not None:
            return False
        try:
            self._log(rec)
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return False
        return True

    def _fail(self, reason: str) -> None:
        self.failed = reason
        warnings.warn(
            f"W&B logging failed ({reason}); W&B is off for the rest of this sweep, "
            "the results store still gets every trial",
            RuntimeWarning,
            stacklevel=3,
        )

    def _log(self, rec: RunRecord) -> None:
        import wandb

        self.root.mkdir(parents=True, exist_ok=True)
        merge = rec.merge
        config = {**wandb_config(rec), "git_commit": git_commit()}
        tags = [
            f"benchmark:{rec.config.get('benchmark')}",
            f"method:{merge.get('method')}",
            f"mode:{merge.get('trust_region')}",
            *([f"ablation:{rec.ablation}"] if rec.ablation else []),
        ]
        settings = _settings(wandb)
        run = wandb.init(
            project=self.project,
            group=rec.study,
            job_type=rec.job_type,
            name=rec.run_id,
            id=rec.run_id,
            tags=tags,
            config=config,
            dir=str(self.root),
            mode=wandb_mode(),  # type: ignore[arg-type]
            reinit="create_new",
            resume="allow",
            settings=settings,
        )
        try:
            run.log(wandb_payload(wandb, rec))
            for key, value in summary(rec).items():
                run.summary[key] = value
        finally:
            run.finish(exit_code=0)


def _settings(wandb: Any) -> Any:
    """Quiet runs without the system-metrics sampler or a pip freeze: each costs more than a toy trial.

    `init_timeout` is `INIT_TIMEOUT` unless `WANDB_INIT_TIMEOUT` says otherwise: a server that
    answered the probe but hangs in `init` costs that once, not W&B's 90 s. The `x_` switches are
    newer than some supported W&B versions; without them W&B still works.
    """
    timeout = INIT_TIMEOUT if not os.environ.get("WANDB_INIT_TIMEOUT") else None
    extra = {} if timeout is None else {"init_timeout": timeout}
    try:
        return wandb.Settings(silent=True, console="off", x_disable_stats=True, x_save_requirements=False, **extra)
    except Exception:  # an older W&B that does not know a switch
        return wandb.Settings(silent=True, console="off")


def wandb_base_url() -> str:
    """The server W&B would talk to: `WANDB_BASE_URL`, else W&B's own settings (files, default)."""
    url = os.environ.get("WANDB_BASE_URL", "").strip()
    if url:
        return url
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:
        return "https://api.wandb.ai"


def probe_server(url: str, timeout: float) -> str | None:
    """None if `url` answers HTTP within `timeout` seconds (any status), else why not, in a few words."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: 401, 404, ... are the server's business
    except urllib.error.URLError as exc:
        reason = exc.reason
        return str(getattr(reason, "strerror", None) or reason)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def summary(rec: RunRecord) -> dict[str, Any]:
    """Scalars for the run summary: what W&B's parallel coordinates and tables read."""
    acc, norm = rec.accuracy, rec.normalized
    out: dict[str, Any] = {
        "state": rec.state,
        "split": rec.split,
        "tasks_evaluated": len(acc),
        f"{rec.split}/mean_accuracy": sum(acc.values()) / len(acc) if acc else None,
        f"{rec.split}/mean_normalized_accuracy": sum(norm.values()) / len(norm) if norm else None,
        "time/merge_seconds": rec.merge_seconds,
        "time/eval_seconds": rec.eval_seconds,
    }
    if rec.value is not None:
        out["objective"] = rec.value
    for task, value in acc.items():
        out[f"{rec.split}/accuracy/{task}"] = value
    if rec.mask:
        dropped = sum(d for d, _ in rec.mask.values())
        total = sum(n for _, n in rec.mask.values())
        out["mask/dropped"] = dropped
        out["mask/dropped_fraction"] = dropped / total if total else 0.0
    return out


def wandb_payload(wandb: Any, rec: RunRecord) -> dict[str, Any]:
    """Tables: per-task accuracy, and the mask statistics (dropped coordinates per layer)."""
    rows = [[t, rec.split, a, rec.normalized.get(t)] for t, a in rec.accuracy.items()]
    logged: dict[str, Any] = {
        "accuracy_table": wandb.Table(columns=["task", "split", "accuracy", "normalized_accuracy"], data=rows)
    }
    if rec.mask:
        mask_rows = [[k, d, n, d / n if n else 0.0] for k, (d, n) in rec.mask.items()]
        logged["mask_table"] = wandb.Table(columns=["layer", "dropped", "numel", "fraction"], data=mask_rows)
    return logged


# --- the Optuna callback ---------------------------------------------------------------------------
class TrialCallback:
    """Optuna callback `(study, frozen_trial)`: store rows, then a W&B run, for each finished trial."""

    def __init__(self, root: str | Path, wandb: WandbLogger | None = None) -> None:
        self.root = Path(root)
        self.wandb = wandb

    def __call__(self, study: Any, trial: Any) -> None:
        rec = record_from_trial(study.study_name, trial)
        if rec is None:
            return
        if write_store(self.root, rec) and self.wandb is not None:
            self.wandb.log(rec)


def reconcile(study: Any, root: str | Path, wandb: WandbLogger | None = None) -> int:
    """Write the rows of finished trials the store lacks (a worker killed after `tell`); returns how many."""
    callback = TrialCallback(root, wandb)
    missing = 0
    for trial in finished_trials(study):
        rec = record_from_trial(study.study_name, trial)
        if rec is not None and not in_store(root, rec.run_id):
            callback(study, trial)
            missing += 1
    return missing


def finished_trials(study: Any) -> Iterable[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
