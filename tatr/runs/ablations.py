"""Ablations: run an ablation file (`tatr.runs.ablation_spec`) on any benchmark, rows into the store.

Every point (variant × seed × drop or exemplar count) goes through the one run path: its plan from
`tatr.runs.plan.PlanBook`, its (q, λ) chosen on the tuning split and tested once by
`tatr.runs.tune.tune_grid`, its rows written as `tatr.store.record.RunRecord`s.

Rows (see `tatr.store.schema`): `job_type="ablation"`, `experiment=<the file's name>`,
`ablation=<kind>`, `study=<the file's name>`; each validation trial is its own run (`trial` = its
grid index), the test evaluation of the chosen point is the point's run. One store file per run,
written when the point is done, so an interrupted ablation keeps its finished points. With
`baselines: true`, θ_0 (Pretrained) and each θ_t on its own task (Individual) are recorded too, as
`job_type="baseline"` runs. The gradient-correlation kind is `tatr.runs.correlation`.

Fisher merging and RegMean points read the suite's statistics at each θ_t (`Point.statistics`: the
file's `statistics`, changed by the variant): they are computed once and cached, and what they depend on
(n, seed, batch, and the Fisher's estimator) enters the point's identity and its rows' config, so the two
Fisher estimators never give one identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tatr.core.adamerging import is_adamerging
from tatr.core.cache import content_hash
from tatr.core.methods import get_method
from tatr.runs.ablation_spec import AblationSpec, Point, per_suite_seed, points
from tatr.runs.adamerging import AdaTuned, tune_adamerging, with_coefficients
from tatr.runs.config import ExemplarConfig, ExperimentConfig, config_dict
from tatr.runs.plan import PlanBook
from tatr.runs.tune import Tuned, tune_grid
from tatr.store.record import RunRecord, suite_model, write_store
from tatr.store.rows import git_commit, read_store
from tatr.store.run_ids import ablation_run_id, baseline_run_id, grid_trial_run_id
from tatr.store.schema import AblationKind

Log = Callable[[str], None]


def run(
    config: ExperimentConfig,
    spec: AblationSpec,
    root: str | Path = "results",
    cache_dir: Path | None = None,
    resume: bool = False,
    log: Log = print,
    wandb: bool = True,
) -> list[Tuned]:
    """Run every point of the ablation, append its rows to the store under `root`, mirror to W&B.

    W&B gets one run per point (its test evaluation, `job_type="ablation"`), in the layout of
    `tatr.runs.tracking`, so `tatr report --from-wandb` rebuilds the ablation tables; the validation
    grid stays in the store only (hundreds of runs would bury the project).
    """
    from tatr.runs.tracking import WandbLogger
    from tatr.suites import get_suite

    logger = WandbLogger(root, wandb)
    done = _finished(root) if resume else set()
    results: list[Tuned] = []
    for cfg, part in per_suite_seed(config, spec):
        suite = get_suite(cfg.benchmark, cfg.suite, cache_dir)
        if part.kind == AblationKind.GRADIENT_CORRELATION:
            from tatr.runs.correlation import gradient_correlation

            gradient_correlation(suite, cfg, part, root, log)
            continue
        if part.baselines and _baselines_done(done, cfg, part):
            log(f"baselines of {cfg.benchmark} (suite {cfg.suite}): in the store already (--resume), skipped")
        elif part.baselines:
            baseline_rows(suite, cfg, part, root, log)
        book: PlanBook | None = None  # made at the first point to run: a build is not needed to skip the rest
        todo = points(cfg, part)
        for i, point in enumerate(todo, 1):
            key = point_hash(cfg, part, point)
            if key in done:
                log(f"[{i}/{len(todo)}] {point.describe()}: in the store already (--resume), skipped")
                continue
            book = book or PlanBook(suite, cfg, cache_root=cache_dir)
            exemplars = drawn_exemplars(cfg, point)
            splits = (part.tune_split, part.eval_split, part.allow_test_tuning)
            if is_adamerging(point.merge.method):  # λ learned on unlabeled inputs: no λ grid
                tuned: Tuned = tune_adamerging(
                    book, point.merge, point.qs, cfg.adamerging, exemplars, *splits, seed=point.seed
                )
            else:
                tuned = tune_grid(
                    book,
                    point.merge,
                    point.qs,
                    point.lams,
                    exemplars,
                    *splits,
                    lam_negs=point.lam_negs,
                    statistics=point.statistics,
                )
            book.clear()  # a point's plan is used once; the cache folder stays for the next point
            records = point_records(cfg, part, point, tuned, key, suite_model(suite))
            if isinstance(tuned, AdaTuned):
                records = with_coefficients(records, tuned)
            for rec in records:
                write_store(root, rec)
            logger.log(records[-1])
            ev = tuned.tested.evaluation
            q = "" if tuned.q is None else f" q={tuned.q:g}"
            q += "" if tuned.lam_neg is None else f" λ_neg={tuned.lam_neg:g}"
            log(
                f"[{i}/{len(todo)}] {point.describe()}: λ={tuned.lam:g}{q} (val {tuned.validation:.2f}) → "
                f"{part.eval_split} {ev.mean_accuracy:.2f}  [{len(tuned.trials)} trials, {tuned.seconds:.1f}s]"
            )
            results.append(tuned)
    return results


def drawn_exemplars(config: ExperimentConfig, point: Point) -> ExemplarConfig:
    """The exemplar draw of a point: its count, seed and selection over the file's `exemplars`."""
    return config.exemplars.model_copy(update={"n": point.exemplars, "seed": point.seed, "selection": point.selection})


def point_hash(config: ExperimentConfig, spec: AblationSpec, point: Point) -> str:
    """Identity of a point's result: the benchmark, its options, the merge, the grid, the splits (and the
    statistics of a method that reads them, AdaMerging's settings for AdaMerging, an exemplar selection
    other than the default "random" of a point that reads exemplars)."""
    stats = point.statistics
    kind = None if stats is None else get_method(point.merge.method).statistics
    return content_hash(
        "ablation-point",
        spec.kind,
        config.benchmark,
        config.suite,
        point.merge.identity(),
        point.seed,
        point.exemplars,
        point.qs,
        point.lams,
        *(() if point.lam_negs is None else (point.lam_negs,)),
        spec.tune_split,
        spec.eval_split,
        *((config.adamerging.model_dump(mode="json"),) if is_adamerging(point.merge.method) else ()),
        *(({"statistics": stats.identity(kind)},) if stats is not None and kind is not None else ()),
        *(({"selection": point.selection},) if point.uses_exemplars and point.selection != "random" else ()),
    )[:12]


def _finished(root: str | Path) -> set[str]:
    rows = read_store(root)
    if rows.empty:
        return set()
    done = rows[(rows["job_type"] == "ablation") & rows["trial"].isna()]
    references = rows[rows["job_type"] == "baseline"].dropna(subset=["config_hash", "split"])
    return set(done["config_hash"].dropna().astype(str)) | {
        _baseline_key(h, s) for h, s in zip(references["config_hash"], references["split"], strict=True)
    }


def _baseline_key(config_hash: str, split: str) -> str:
    return f"baseline {config_hash} {split}"


def _baseline_hash(subject: str, config: ExperimentConfig) -> str:
    """A reference row's identity: θ_0 or the θ_t of one build (the suite's options hold its seed)."""
    return content_hash("baseline", subject, config.benchmark, config.suite)[:12]


def _baselines_done(done: set[str], config: ExperimentConfig, spec: AblationSpec) -> bool:
    return all(_baseline_key(_baseline_hash(s, config), spec.eval_split) in done for s in ("pretrained", "individual"))


def point_records(
    config: ExperimentConfig, spec: AblationSpec, point: Point, tuned: Tuned, key: str, model: str | None = None
) -> list[RunRecord]:
    """The records of one point: each validation trial as its own run, then the test evaluation.

    Every record's config is the point's resolved experiment (its merge at that trial's q and λ, its
    exemplar draw, `seed` = the draw), with the ablation block, for W&B; `model` is the suite's."""
    run_id = ablation_run_id(spec.kind)
    stamp, commit = time.time(), git_commit()

    def resolved(q: float, lam: float, lam_neg: float | None) -> dict[str, Any]:
        cfg = config.model_copy(
            update={
                "merge": point.merge.model_copy(update={"q": q, "lam": lam, "lam_neg": lam_neg}),
                "exemplars": drawn_exemplars(config, point),
                "seed": point.seed,
                **({} if point.statistics is None else {"statistics": point.statistics}),
            }
        )
        return {**config_dict(cfg), "ablation": spec.model_dump(mode="json")}

    common: dict[str, Any] = {
        "study": config.name,
        "job_type": "ablation",
        "config_hash": key,
        "model": model,
        "ablation": str(spec.kind),
        "git_commit": commit,
        "timestamp": stamp,
    }
    records = [
        RunRecord.merged(
            run_id=grid_trial_run_id(run_id, i),
            trial=i,
            config=resolved(t.q, t.lam, t.lam_neg),
            split=spec.tune_split,
            accuracy=t.accuracy,
            normalized=t.normalized,
            merge_seconds=t.merge_seconds,
            eval_seconds=t.eval_seconds,
            predictions=t.predictions,
            **common,
        )
        for i, t in enumerate(tuned.trials)
    ]
    tested = tuned.tested
    records.append(
        RunRecord.merged(
            run_id=run_id,
            trial=None,
            config=resolved(tuned.merge.q, tuned.merge.lam, tuned.merge.lam_neg),  # type: ignore[arg-type]
            split=spec.eval_split,
            accuracy=tested.evaluation.accuracy,
            normalized=tested.evaluation.normalized,
            merge_seconds=tested.merge_seconds,
            eval_seconds=tested.eval_seconds,
            mask=tested.mask_lists(),
            value=tested.evaluation.mean_accuracy,
            predictions=tested.evaluation.predictions,
            **common,
        )
    )
    return records


def baseline_rows(suite: Any, config: ExperimentConfig, spec: AblationSpec, root: str | Path, log: Log = print) -> None:
    """The two reference rows of every merging table: θ_0 (Pretrained) and each θ_t on its own task
    (Individual), on the evaluation split, as `job_type="baseline"` runs."""
    from tatr.suites.evaluation import evaluate_merged, individual_predictions, normalized_accuracy

    individual = suite.individual_accuracy(spec.eval_split)
    own = individual_predictions(suite, spec.eval_split)
    if own is not None:  # the build recorded these accuracies; the predictions are the same evaluation
        individual = {t: own[t].accuracy if t in own else individual[t] for t in individual}
    start = time.perf_counter()
    pretrained = evaluate_merged(suite, None, spec.eval_split)
    seconds = time.perf_counter() - start
    stamp, commit = time.time(), git_commit()
    for subject, accuracy in (("pretrained", pretrained.accuracy), ("individual", dict(individual))):
        rec = RunRecord.reference(
            subject=subject,
            run_id=baseline_run_id(subject),
            study=config.name,
            job_type="baseline",
            model=suite_model(suite),
            config=config_dict(config),
            config_hash=_baseline_hash(subject, config),
            split=spec.eval_split,
            accuracy=accuracy,
            normalized=normalized_accuracy(accuracy, individual),
            eval_seconds=seconds if subject == "pretrained" else None,
            ablation=str(spec.kind),
            predictions=pretrained.predictions if subject == "pretrained" else own,
            git_commit=commit,
            timestamp=stamp,
        )
        write_store(root, rec)
        log(f"baseline {subject}: {spec.eval_split} {sum(accuracy.values()) / len(accuracy):.2f}")
