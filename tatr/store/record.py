"""The one record type: what a run evaluated, and the only code that turns it into store rows.

A `RunRecord` is one evaluated model on one split: a sweep trial or final, an ablation point or
one of its grid trials, a baseline, a `tatr evaluate --root` run. Every writer builds one and calls
`write_store`; the W&B mirror (`tatr.runs.tracking`) logs the same record, and `tatr report
--from-wandb` rebuilds records from W&B runs (`record_from_wandb`) and gets its rows from
`store_rows` too, so the columns (`tatr.store.schema`) mean the same whatever wrote them:

* `experiment` is the experiment's `name` (its config's), `ablation` the ablation kind or null;
* `model` is the suite's model (`Suite.model_name`: the testbed's ViT, clip8's and the text suite's
  `suite.model`), which every writer passes; a record built without it (a W&B run logged before
  records carried it) falls back to the config's `model`, then its suite's `model` option;
* merge columns come from the resolved merge config: q is null without a trust region, λ is the
  method's default when unset, a method's options only for the methods that read them (TIES k
  for TIES, p and seed for DARE, β and density for Breadcrumbs), λ_neg where it was set,
  exemplars (and how they were drawn, `exemplar_selection`) only when the merge uses them;
* `predictions` (optional, per task) become the row's `n_examples`, `correct` and `predicted`
  (`tatr.store.predictions`); a task without them (a plugin suite, a pruned trial) gets nulls;
* `subject` says what was evaluated: a merge, θ_0 (`pretrained`), each fine-tuned θ_t on its own
  task (`individual`), or exemplar gradients (`gradients`, the correlation ablation): the last
  three have no merge columns; a reference model's seed is its suite's build seed (`suite.seed`).

Writers build records with the named constructors, one per subject: `RunRecord.merged` (a merge
evaluated on one split: sweep trials and finals, ablation points and their grid trials, `tatr
evaluate`), `RunRecord.reference` (θ_0 or the θ_t: baselines, `tatr evaluate --model`) and
`RunRecord.gradients` (the correlation ablation). Their run ids come from `tatr.store.run_ids`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tatr.core.fisher import DEFAULT_FISHER_ESTIMATOR
from tatr.core.methods import METHODS, uses_option
from tatr.core.trust_region import uses_exemplars
from tatr.store.predictions import TaskPredictions, prediction_columns
from tatr.store.rows import append_rows, store_dir
from tatr.store.schema import METHOD_OPTIONS

SUBJECTS = ("merged", "pretrained", "individual", "gradients")


@dataclass(frozen=True)
class RunRecord:
    """One evaluated model on one split: what the store and W&B get for it."""

    run_id: str
    study: str | None
    trial: int | None
    job_type: str | None  # tatr.store.schema.JOB_TYPES (None only for a W&B run that has none)
    config: dict[str, Any]  # the resolved ExperimentConfig, as config_dict gives it
    config_hash: str
    split: str
    accuracy: dict[str, float]
    normalized: dict[str, float]
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    mask: dict[str, list[int]] | None = None  # key -> [dropped, numel]
    params: dict[str, Any] = field(default_factory=dict)
    state: str = "COMPLETE"
    value: float | None = None
    ablation: str | None = None  # the ablation kind (tatr.store.schema.AblationKind)
    subject: str = "merged"  # see SUBJECTS
    git_commit: str | None = None  # None: the working tree's commit, when written
    timestamp: float | None = None  # None: the time of writing
    model: str | None = None  # the suite's model (`Suite.model_name`); None: read from the config
    predictions: dict[str, TaskPredictions] | None = None  # per task, where the suite gives them

    def __post_init__(self) -> None:
        if self.subject not in SUBJECTS:
            raise ValueError(f"subject must be one of {SUBJECTS}, got {self.subject!r}")
        if self.model is None:
            object.__setattr__(self, "model", config_model(self.config))

    @property
    def merge(self) -> dict[str, Any]:
        return self.config.get("merge", {}) if self.subject == "merged" else {}

    # --- the named constructors: one per subject, what each kind of run records -------------------
    @classmethod
    def merged(
        cls,
        *,
        run_id: str,
        job_type: str,
        config: dict[str, Any],
        config_hash: str,
        model: str | None,
        split: str,
        accuracy: Mapping[str, float],
        normalized: Mapping[str, float],
        study: str | None = None,
        trial: int | None = None,
        merge_seconds: float | None = None,
        eval_seconds: float | None = None,
        mask: Mapping[str, list[int]] | None = None,
        params: Mapping[str, Any] | None = None,
        state: str = "COMPLETE",
        value: float | None = None,
        ablation: str | None = None,
        git_commit: str | None = None,
        timestamp: float | None = None,
        predictions: Mapping[str, TaskPredictions] | None = None,
    ) -> RunRecord:
        """A merge (`config["merge"]`, at its q and λ) evaluated on `split`: a sweep trial or final,
        an ablation point or one of its grid trials, a `tatr evaluate` run."""
        return cls(
            run_id=run_id,
            study=study,
            trial=trial,
            job_type=job_type,
            config=config,
            config_hash=config_hash,
            split=split,
            accuracy=dict(accuracy),
            normalized=dict(normalized),
            merge_seconds=merge_seconds,
            eval_seconds=eval_seconds,
            mask=None if mask is None else {k: list(v) for k, v in mask.items()},
            params=dict(params or {}),
            state=state,
            value=value,
            ablation=None if ablation is None else str(ablation),
            subject="merged",
            git_commit=git_commit,
            timestamp=timestamp,
            model=model,
            predictions=None if predictions is None else dict(predictions),
        )

    @classmethod
    def reference(
        cls,
        *,
        subject: str,
        run_id: str,
        job_type: str,
        config: dict[str, Any],
        config_hash: str,
        model: str | None,
        split: str,
        accuracy: Mapping[str, float],
        normalized: Mapping[str, float],
        study: str | None = None,
        eval_seconds: float | None = None,
        value: float | None = None,
        ablation: str | None = None,
        git_commit: str | None = None,
        timestamp: float | None = None,
        predictions: Mapping[str, TaskPredictions] | None = None,
    ) -> RunRecord:
        """A reference model on `split`: θ_0 (`subject="pretrained"`) or each θ_t on its own task
        (`"individual"`); its rows have no merge columns (a baseline, `tatr evaluate --model`)."""
        if subject not in ("pretrained", "individual"):
            raise ValueError(f"a reference model is 'pretrained' or 'individual', got {subject!r}")
        return cls(
            run_id=run_id,
            study=study,
            trial=None,
            job_type=job_type,
            config=config,
            config_hash=config_hash,
            split=split,
            accuracy=dict(accuracy),
            normalized=dict(normalized),
            eval_seconds=eval_seconds,
            value=value,
            ablation=None if ablation is None else str(ablation),
            subject=subject,
            git_commit=git_commit,
            timestamp=timestamp,
            model=model,
            predictions=None if predictions is None else dict(predictions),
        )

    @classmethod
    def gradients(
        cls,
        *,
        run_id: str,
        config: dict[str, Any],
        config_hash: str,
        model: str | None,
        correlations: Mapping[str, float],
        ablation: str,
        study: str | None = None,
        timestamp: float | None = None,
    ) -> RunRecord:
        """Statistics of exemplar gradients at θ_0 (the correlation ablation): one value per task pair
        ("a|b", `tatr.store.schema.PAIR_SEPARATOR`) in the accuracy column, split `train` (the
        exemplars' split), no normalized value, no merge columns."""
        return cls(
            run_id=run_id,
            study=study,
            trial=None,
            job_type="ablation",
            config=config,
            config_hash=config_hash,
            split="train",
            accuracy=dict(correlations),
            normalized={},
            ablation=str(ablation),
            subject="gradients",
            timestamp=timestamp,
            model=model,
        )


def suite_model(suite: object) -> str | None:
    """What a record's `model` is for a run on `suite`: its `model_name` (`tatr.suites.base.Suite`);
    None for a plugin suite without one (the record then reads its config, `config_model`)."""
    name = getattr(suite, "model_name", None)
    return None if name is None else str(name)


def config_model(config: Mapping[str, Any]) -> str | None:
    """The model a config names: its `model` (a W&B run's config, `wandb_config`), else its suite's
    `model` option; None when neither does (records written before every suite had a model name)."""
    model = config.get("model")
    if model is None:
        model = (config.get("suite") or {}).get("model")
    return None if model is None else str(model)


def fisher_estimator(method: object, config: Mapping[str, Any]) -> str | None:
    """The Fisher estimator a Fisher merge's statistics used (the config's, else the default), else None."""
    if not (isinstance(method, str) and method in METHODS and METHODS.get(method).statistics == "fisher"):
        return None
    return str((config.get("statistics") or {}).get("fisher_estimator") or DEFAULT_FISHER_ESTIMATOR)


def store_rows(rec: RunRecord) -> list[dict[str, Any]]:
    """One row per task, with the store's columns (`tatr.store.schema.COLUMNS`)."""
    cfg, merge = rec.config, rec.merge
    mode = merge.get("trust_region")
    components = merge.get("components")
    method = merge.get("method") if rec.subject == "merged" else None
    lam = merge.get("lam")
    if rec.subject == "merged" and lam is None and isinstance(method, str) and method in METHODS:
        lam = METHODS.get(method).default_lam  # the method's default, resolved
    exemplars = cfg.get("exemplars", {}).get("n")
    selection = cfg.get("exemplars", {}).get("selection") or "random"  # a config without it drew at random
    if rec.subject in ("pretrained", "individual"):
        method, exemplars, seed = rec.subject, None, (cfg.get("suite") or {}).get("seed")
    else:
        seed = cfg.get("seed")
        if rec.subject == "merged" and not uses_exemplars(mode, components):
            exemplars = None
    common = {
        "run_id": rec.run_id,
        "study": rec.study,
        "trial": rec.trial,
        "job_type": rec.job_type,
        "experiment": cfg.get("experiment", cfg.get("name")),
        "ablation": rec.ablation,
        "benchmark": cfg.get("benchmark"),
        "model": rec.model,
        "method": method,
        "trust_region": mode,
        "q": None if mode in (None, "off") else merge.get("q"),
        "lam": lam,
        "lam_neg": merge.get("lam_neg"),
        **{option: merge.get(option) if uses_option(method, option) else None for option in METHOD_OPTIONS},
        "components": list(components) if components is not None else None,
        "exemplars": exemplars,
        "seed": seed,
        "split": rec.split,
        "merge_seconds": rec.merge_seconds,
        "eval_seconds": rec.eval_seconds,
        "git_commit": rec.git_commit,
        "config_hash": rec.config_hash,
        "timestamp": rec.timestamp,
        "fisher_estimator": fisher_estimator(method, cfg),
        "exemplar_selection": selection if exemplars is not None and rec.subject == "merged" else None,
    }
    predictions = rec.predictions or {}
    return [
        {
            **common,
            "task": task,
            "accuracy": acc,
            "normalized_accuracy": rec.normalized.get(task),
            **prediction_columns(predictions.get(task), rec.split),
        }
        for task, acc in rec.accuracy.items()
    ]


def in_store(root: str | Path, run_id: str) -> bool:
    return (store_dir(root) / f"{run_id}.jsonl").exists()


def write_store(root: str | Path, rec: RunRecord) -> bool:
    """Append the record's rows; False when this run is already in the store (never written twice)."""
    if in_store(root, rec.run_id):
        return False
    try:
        append_rows(root, store_rows(rec), rec.run_id)
    except ValueError as exc:  # another process wrote the same run between the check and the write
        if in_store(root, rec.run_id):
            return False
        raise exc
    return True


def wandb_config(rec: RunRecord) -> dict[str, Any]:
    """What a W&B run's config holds: the resolved config plus what `record_from_wandb` reads back."""
    extra: dict[str, Any] = {"study": rec.study, "trial": rec.trial, "params": rec.params}
    extra["config_hash"] = rec.config_hash
    if rec.model is not None:
        extra["model"] = rec.model  # read back by `record_from_wandb` (`config_model`)
    if rec.ablation is not None and not isinstance(rec.config.get("ablation"), dict):
        extra["ablation"] = {"kind": rec.ablation}
    return {**rec.config, **extra}


def record_from_wandb(
    config: Mapping[str, Any],
    run_id: str,
    job_type: str | None,
    split: str,
    accuracy: Mapping[str, float],
    normalized: Mapping[str, float],
    merge_seconds: float | None = None,
    eval_seconds: float | None = None,
    git_commit: str | None = None,
    timestamp: float | None = None,
) -> RunRecord:
    """The record a W&B run mirrors (its config as `wandb_config` logged it, nested), for one split.

    An `ablation` entry is the kind, or the ablation block (`{kind: …, …}`); a run with neither
    belongs to no ablation. A run whose `merge.method` is `pretrained` or `individual` mirrors a
    reference model, not a merge.
    """
    ablation = config.get("ablation")
    if isinstance(ablation, Mapping):
        ablation = ablation.get("kind")
    method = (config.get("merge") or {}).get("method")
    return RunRecord(
        run_id=run_id,
        study=config.get("study"),
        trial=config.get("trial"),
        job_type=job_type,
        config=dict(config),
        config_hash=config.get("config_hash"),  # type: ignore[arg-type]
        split=split,
        accuracy=dict(accuracy),
        normalized={t: v for t, v in normalized.items() if v is not None},
        merge_seconds=merge_seconds,
        eval_seconds=eval_seconds,
        ablation=None if ablation is None else str(ablation),
        subject=method if method in ("pretrained", "individual") else "merged",
        git_commit=git_commit,
        timestamp=timestamp,
    )
