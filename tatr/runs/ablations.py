"""Ablations: one YAML file each (`experiments/ablations/`), run on any benchmark, rows into the store.

An ablation file is an ordinary experiment (benchmark, suite options, base `merge`, `exemplars`)
plus an `ablation:` block that says what to vary:

    ablation:
      kind: components            # components | trust-region | sensitivity | mask-ratio |
                                  # exemplar-count | plugin | gradient-correlation
      seeds: [0, 1, 2]            # exemplar draws; variants that use no exemplars run once
      lam: [0.1, 0.2, 0.3, …]     # λ grid, tuned on `tune_split`
      q: [0.9, 0.99, …]           # q grid, tuned with λ (a single value fixes q)
      variants:                   # merge settings that differ between the compared rows
        - {components: [positive]}
      drops: [0, 1.0e-4, …]       # mask-ratio: the dropped fraction 1−q of each point (q fixed there)
      exemplars: [1, 2, 4, …]     # exemplar-count: exemplars per task of each point

Every point (variant × seed × drop or exemplar count) is tuned the same way: one `MergePlan` per
point (the streaming pass is done once), then a grid over (q, λ) on the validation split, each
trial a cheap `plan.merged(q, λ)`; the best mean validation accuracy (first in grid order on a
tie) is evaluated on the test split. Why a grid and not the Optuna sweep: a point has at most a
few dozen cheap trials, a grid shares one plan across all of them, and it is deterministic, so
the committed ablation results can be re-derived exactly.

Rows (see `tatr.runs.store.COLUMNS`): `job_type="ablation"`, `experiment=<kind>` (what the report keys
on), `study=<the file's name>`; each validation trial is its own run (`trial` = its grid index),
the test evaluation of the chosen point is the point's run. One store file per point, written
when the point is done, so an interrupted ablation keeps its finished points.

The gradient-correlation ablation writes no accuracy: one row per task pair, `task="a|b"`,
`split="train"` (the exemplars come from the training split) and the Spearman ρ between the two
tasks' mean |gradient| in the `accuracy` column.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tatr.core.cache import content_hash
from tatr.core.errors import TatrError
from tatr.core.methods import uses_ties_k
from tatr.core.trust_region import NEEDS_GRADIENTS
from tatr.report import tables as T
from tatr.runs.config import (
    Component,
    ExperimentConfig,
    MergeConfig,
    Split,
    TrustRegionMode,
    apply_override,
    config_dict,
    override_value,
    read_yaml_mapping,
)
from tatr.runs.store import append_rows, git_commit, new_run_id, read_store

Kind = Literal[
    "components", "trust-region", "sensitivity", "mask-ratio", "exemplar-count", "plugin", "gradient-correlation"
]
DEFAULT_LAMS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
Log = Callable[[str], None]


class _Frozen(BaseModel):
    """Frozen, typo-proof, and no NaN or ±inf in any float (a λ grid with NaN would store NaN rows)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Variant(_Frozen):
    """The merge settings one compared row changes; unset fields keep the file's `merge` values."""

    method: str | None = None
    trust_region: TrustRegionMode | None = None
    components: tuple[Component, ...] | None = None
    ties_k: float | None = Field(None, gt=0.0, le=100.0)


class AblationSpec(_Frozen):
    kind: Kind
    seeds: tuple[Annotated[int, Field(ge=0)], ...] = (0,)
    lam: tuple[float, ...] = DEFAULT_LAMS  # finite (allow_inf_nan=False); negative λ is task negation
    q: tuple[float, ...] = (0.99,)
    variants: tuple[Variant, ...] = ()
    drops: tuple[float, ...] = ()
    exemplars: tuple[int, ...] = ()
    max_coordinates: int = Field(2_000_000, ge=100)
    tune_split: Split = "validation"
    eval_split: Split = "test"
    allow_test_tuning: bool = False
    baselines: bool = False  # also record θ_0 and the fine-tuned θ_t on the evaluation split

    @model_validator(mode="after")
    def _check(self) -> AblationSpec:
        if not self.seeds or not self.lam or not self.q:
            raise ValueError("seeds, lam and q need at least one value each")
        if any(not 0.0 < q <= 1.0 for q in self.q):
            raise ValueError("every q must be in (0, 1]")
        if self.kind == "mask-ratio" and not self.drops:
            raise ValueError("a mask-ratio ablation needs `drops` (the dropped fractions 1−q)")
        if any(not 0.0 <= d < 1.0 for d in self.drops):
            raise ValueError("every drop must be in [0, 1)")
        if self.kind == "exemplar-count" and not self.exemplars:
            raise ValueError("an exemplar-count ablation needs `exemplars` (counts per task)")
        if any(n < 1 for n in self.exemplars):
            raise ValueError("exemplar counts must be at least 1")
        if self.kind != "gradient-correlation" and not self.variants:
            raise ValueError(f"a {self.kind} ablation needs `variants` (the merge settings it compares)")
        if self.tune_split == "test" and not self.allow_test_tuning:
            raise ValueError("tuning on the test split is refused; set ablation.allow_test_tuning=true to insist")
        return self


@dataclass(frozen=True)
class Point:
    """One tuned evaluation: a merge configuration, its exemplars, and the (q, λ) grid it searches."""

    merge: MergeConfig
    seed: int
    exemplars: int
    qs: tuple[float, ...]
    lams: tuple[float, ...]

    @property
    def uses_exemplars(self) -> bool:
        return self.merge.trust_region in NEEDS_GRADIENTS or self.merge.components is not None

    def describe(self) -> str:
        m = self.merge
        text = T.method_label(m.method, m.trust_region)
        if m.components is not None:
            text += f" components={T.components_label(list(m.components))}"
        if self.uses_exemplars:
            text += f" n={self.exemplars} seed={self.seed}"
        if len(self.qs) == 1 and m.trust_region != "off":
            text += f" q={self.qs[0]:g}"
        return text


@dataclass
class PointResult:
    point: Point
    q: float | None
    lam: float
    validation: float
    test: dict[str, float]
    normalized: dict[str, float]
    trials: int
    seconds: float
    grid: list[dict[str, Any]] = field(default_factory=list)  # each trial: q, λ, accuracies, timings
    timing: dict[str, float] = field(default_factory=dict)  # of the final evaluation

    @property
    def test_mean(self) -> float:
        return sum(self.test.values()) / len(self.test)


# --- the file --------------------------------------------------------------------------------------
def load_ablation(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, AblationSpec]:
    """Read an ablation file; `ablation.x=…` overrides the block, anything else the experiment."""
    path = Path(path)
    raw = read_yaml_mapping(path, "ablation file")
    if not isinstance(raw.get("ablation"), dict):
        raise TatrError(f"{path}: an ablation file needs an `ablation:` block with at least `kind`")
    block = raw.pop("ablation")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("ablation."):
            _set_ablation(block, item, path)
        else:
            apply_override(raw, item)
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise TatrError(_one_line(exc, path)) from None
    try:
        spec = AblationSpec.model_validate(block)
    except ValidationError as exc:
        raise TatrError(_one_line(exc, path, "ablation")) from None
    return config, spec


def _set_ablation(block: dict[str, Any], item: str, path: Path) -> None:
    if "=" not in item:
        raise TatrError(f"override '{item}' must look like key=value, e.g. ablation.seeds=[0]")
    dotted, value = item.split("=", 1)
    key = dotted.strip().removeprefix("ablation.")
    if key not in AblationSpec.model_fields:
        import difflib

        close = difflib.get_close_matches(key, list(AblationSpec.model_fields), n=1)
        hint = f"; did you mean 'ablation.{close[0]}'?" if close else ""
        raise TatrError(f"{path}: unknown ablation key '{key}'{hint}")
    block[key] = override_value(value)


def _one_line(exc: ValidationError, path: Path, prefix: str = "") -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "") or "config"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: {where}: {err['msg'].removeprefix('Value error, ')}{more}"


def suite_model(config: ExperimentConfig) -> str | None:
    """The model a suite's options name (clip8: `suite.model`), for the store's `model` column."""
    model = config.suite.get("model")
    return None if model is None else str(model)


# --- what to run -----------------------------------------------------------------------------------
def points(config: ExperimentConfig, spec: AblationSpec) -> list[Point]:
    """Every tuned evaluation the ablation needs, in a fixed order."""
    out: list[Point] = []
    variants = spec.variants or (Variant(),)
    for variant in variants:
        merge = MergeConfig.model_validate({**config.merge.model_dump(), **variant.model_dump(exclude_none=True)})
        uses = merge.trust_region in NEEDS_GRADIENTS or merge.components is not None
        seeds = spec.seeds if uses else spec.seeds[:1]
        counts = spec.exemplars if spec.kind == "exemplar-count" else (config.exemplars.n,)
        if spec.kind == "mask-ratio":
            grids = [(round(1.0 - d, 12),) for d in spec.drops]
        elif merge.trust_region == "off":
            grids = [(1.0,)]  # no mask: q has no effect, tune λ only
        else:
            grids = [tuple(spec.q)]
        for qs, n, seed in itertools.product(grids, counts, seeds):
            out.append(Point(merge, seed, n, qs, tuple(spec.lam)))
    return out


# --- running --------------------------------------------------------------------------------------
def run(
    config: ExperimentConfig,
    spec: AblationSpec,
    root: str | Path = "results",
    cache_dir: Path | None = None,
    resume: bool = False,
    log: Log = print,
    wandb: bool = True,
) -> list[PointResult]:
    """Run every point of the ablation, append its rows to the store under `root`, mirror to W&B.

    W&B gets one run per point (its test evaluation, `job_type="ablation"`), in the layout of
    `tatr.runs.tracking`, so `tatr report --from-wandb` rebuilds the ablation tables; the validation
    grid stays in the store only (hundreds of runs would bury the project).
    """
    from tatr.runs.tracking import WandbLogger
    from tatr.suites import get_suite

    logger = WandbLogger(root, wandb)
    suite = get_suite(config.benchmark, config.suite, cache_dir)
    if spec.kind == "gradient-correlation":
        return gradient_correlation(suite, config, spec, root, log)
    done = _finished(root) if resume else set()
    if spec.baselines:
        baseline_rows(suite, config, spec, root, log)
    results = []
    todo = points(config, spec)
    for i, point in enumerate(todo, 1):
        key = point_hash(config, spec, point)
        if key in done:
            log(f"[{i}/{len(todo)}] {point.describe()}: in the store already (--resume), skipped")
            continue
        result = tune_point(suite, point, spec)
        rows = point_rows(config, spec, point, result, key)
        append_rows(root, rows, rows[-1]["run_id"])
        logger.log(wandb_record(config, spec, point, result, rows[-1]))
        q = "" if result.q is None else f" q={result.q:g}"
        log(
            f"[{i}/{len(todo)}] {point.describe()}: λ={result.lam:g}{q} (val {result.validation:.2f}) → "
            f"{spec.eval_split} {result.test_mean:.2f}  [{result.trials} trials, {result.seconds:.1f}s]"
        )
        results.append(result)
    return results


def point_hash(config: ExperimentConfig, spec: AblationSpec, point: Point) -> str:
    """Identity of a point's result: the benchmark, its options, the merge, the grid, the splits."""
    return content_hash(
        "ablation-point",
        spec.kind,
        config.benchmark,
        config.suite,
        point.merge.model_dump(mode="json"),
        point.seed,
        point.exemplars,
        point.qs,
        point.lams,
        spec.tune_split,
        spec.eval_split,
    )[:12]


def _finished(root: str | Path) -> set[str]:
    rows = read_store(root)
    if rows.empty:
        return set()
    done = rows[(rows["job_type"] == "ablation") & rows["trial"].isna()]
    return set(done["config_hash"].dropna().astype(str))


def build_plan(suite: Any, point: Point) -> Any:
    """The (q, λ)-independent merge state of a point, with the exemplar gradients it needs."""
    from tatr.core.merging import plan_merge

    ckpt = suite.checkpoints()
    tasks = list(suite.tasks)
    m = point.merge
    grads = signed = None
    if point.uses_exemplars:
        stats = suite.exemplar_gradients(point.exemplars, point.seed)
        if m.trust_region in NEEDS_GRADIENTS:
            grads = [stats.abs_mean[t] for t in tasks]
        if m.components is not None:
            signed = [stats.signed_mean[t] for t in tasks]
    return plan_merge(
        ckpt.pretrained,
        [ckpt.finetuned[t] for t in tasks],
        method=m.method,
        trust_region=m.trust_region,
        ties_k=m.ties_k,
        components=m.components,
        gradients=grads,
        signed_gradients=signed,
        cache_pretrained=True,
    )


def tune_point(suite: Any, point: Point, spec: AblationSpec) -> PointResult:
    """Grid over (q, λ) on the tuning split, then the best (q, λ) on the evaluation split."""
    from tatr.suites.scoring import evaluate_merged

    start = time.perf_counter()
    t0 = time.perf_counter()
    plan = build_plan(suite, point)
    plan.prepare(point.qs)  # rank once for the lowest q; Ω is kept so the best q can be revisited
    plan_seconds = time.perf_counter() - t0
    trials: list[dict[str, Any]] = []
    best: tuple[float, float, float] | None = None
    for q in point.qs:
        for lam in point.lams:
            t0 = time.perf_counter()
            merged = plan.merged(q, lam)
            merge_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = evaluate_merged(suite, merged, spec.tune_split)
            trials.append(
                {
                    "q": q,
                    "lam": lam,
                    "accuracy": ev.accuracy,
                    "normalized": ev.normalized,
                    "merge_seconds": merge_seconds,
                    "eval_seconds": time.perf_counter() - t0,
                }
            )
            if best is None or ev.mean_accuracy > best[0]:
                best = (ev.mean_accuracy, q, lam)
    assert best is not None
    score, q, lam = best
    t0 = time.perf_counter()
    merged = plan.merged(q, lam)
    merge_seconds = plan_seconds + time.perf_counter() - t0
    t0 = time.perf_counter()
    final = evaluate_merged(suite, merged, spec.eval_split)
    result = PointResult(
        point,
        None if point.merge.trust_region == "off" else q,
        lam,
        score,
        final.accuracy,
        final.normalized,
        len(trials),
        time.perf_counter() - start,
    )
    result.grid = trials
    result.timing = {"merge_seconds": merge_seconds, "eval_seconds": time.perf_counter() - t0}
    return result


def point_rows(
    config: ExperimentConfig, spec: AblationSpec, point: Point, result: PointResult, key: str
) -> list[dict[str, Any]]:
    """Store rows of one point: each validation trial as its own run, then the test evaluation."""
    m = point.merge
    run_id = f"ablation-{spec.kind}-{new_run_id()}"
    common = {
        "study": config.name,
        "job_type": "ablation",
        "experiment": spec.kind,
        "benchmark": config.benchmark,
        "model": suite_model(config),
        "method": m.method,
        "trust_region": m.trust_region,
        "ties_k": m.ties_k if uses_ties_k(m.method) else None,
        "components": list(m.components) if m.components is not None else None,
        "exemplars": point.exemplars if point.uses_exemplars else None,
        "seed": point.seed,
        "config_hash": key,
        "git_commit": git_commit(),
    }
    rows = []
    for i, trial in enumerate(result.grid):
        q = None if m.trust_region == "off" else trial["q"]
        for task, acc in trial["accuracy"].items():
            rows.append(
                {
                    **common,
                    "run_id": f"{run_id}-t{i:03d}",
                    "trial": i,
                    "q": q,
                    "lam": trial["lam"],
                    "split": spec.tune_split,
                    "task": task,
                    "accuracy": acc,
                    "normalized_accuracy": trial["normalized"].get(task),
                    "merge_seconds": trial["merge_seconds"],
                    "eval_seconds": trial["eval_seconds"],
                }
            )
    timing = result.timing
    for task, acc in result.test.items():
        rows.append(
            {
                **common,
                "run_id": run_id,
                "q": result.q,
                "lam": result.lam,
                "split": spec.eval_split,
                "task": task,
                "accuracy": acc,
                "normalized_accuracy": result.normalized.get(task),
                "merge_seconds": timing["merge_seconds"],
                "eval_seconds": timing["eval_seconds"],
            }
        )
    stamp = time.time()
    return [{**r, "timestamp": stamp} for r in rows]


def baseline_rows(suite: Any, config: ExperimentConfig, spec: AblationSpec, root: str | Path, log: Log = print) -> None:
    """The two reference rows of every merging table: θ_0 (Pretrained) and each θ_t on its own task
    (Individual), on the evaluation split, as `job_type="baseline"` runs."""
    from tatr.suites.scoring import evaluate_merged

    individual = suite.individual_accuracy(spec.eval_split)
    start = time.perf_counter()
    pretrained = evaluate_merged(suite, None, spec.eval_split)
    seconds = time.perf_counter() - start
    stamp = time.time()
    for method, accuracy in (("pretrained", pretrained.accuracy), ("individual", individual)):
        run_id = f"baseline-{method}-{new_run_id()}"
        rows = [
            {
                "run_id": run_id,
                "study": config.name,
                "job_type": "baseline",
                "experiment": spec.kind,
                "benchmark": config.benchmark,
                "model": suite_model(config),
                "method": method,
                "split": spec.eval_split,
                "task": task,
                "accuracy": acc,
                "normalized_accuracy": 100.0 * acc / individual[task] if individual[task] > 0 else None,
                "eval_seconds": seconds if method == "pretrained" else None,
                "config_hash": content_hash("baseline", method, config.benchmark, config.suite)[:12],
                "git_commit": git_commit(),
                "timestamp": stamp,
            }
            for task, acc in accuracy.items()
        ]
        append_rows(root, rows, run_id)
        log(f"baseline {method}: {spec.eval_split} {sum(accuracy.values()) / len(accuracy):.2f}")


def wandb_record(
    config: ExperimentConfig, spec: AblationSpec, point: Point, result: PointResult, row: dict[str, Any]
) -> Any:
    """The point's test evaluation as a `tatr.runs.tracking.RunRecord` (the config says what was chosen)."""
    from tatr.runs.tracking import RunRecord

    merge = point.merge.model_copy(update={"lam": result.lam, "q": result.q if result.q is not None else 1.0})
    resolved = config.model_copy(
        update={
            "merge": merge,
            "exemplars": config.exemplars.model_copy(update={"n": point.exemplars, "seed": point.seed}),
            "seed": point.seed,
            "split": spec.eval_split,
        }
    )
    return RunRecord(
        run_id=row["run_id"],
        study=config.name,
        trial=None,
        job_type="ablation",
        config={**config_dict(resolved), "experiment": spec.kind, "ablation": spec.model_dump(mode="json")},
        config_hash=row["config_hash"],
        split=spec.eval_split,
        accuracy=dict(result.test),
        normalized=dict(result.normalized),
        merge_seconds=row["merge_seconds"],
        eval_seconds=row["eval_seconds"],
    )


# --- gradient correlation --------------------------------------------------------------------------
def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1…N with ties sharing their average rank (Spearman's convention), float64."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2  # mean of the 1-based ranks in each tie group
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(average, counts)
    return ranks


def spearman_matrix(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """T × T Spearman ρ between flat vectors: Pearson correlation of their average ranks."""
    ranks = torch.stack([average_ranks(v.reshape(-1).float()) for v in vectors])
    centered = ranks - ranks.mean(dim=1, keepdim=True)
    norms = centered.norm(dim=1)
    corr = (centered @ centered.T) / torch.outer(norms, norms)
    return corr.clamp(-1.0, 1.0)


def flat_gradients(files: Sequence[Path], max_coordinates: int, seed: int) -> list[torch.Tensor]:
    """Each task's mean |∇| over the keys all files share, flattened in sorted-key order.

    Above `max_coordinates` coordinates, the same seeded uniform subsample is taken from every
    task (with replacement: a random sample of a million coordinates pins ρ to about ±0.001).
    """
    from tatr.core.checkpoints import load_state_dict

    dicts = [load_state_dict(f) for f in files]
    keys = sorted(set.intersection(*(set(d) for d in dicts)))
    keys = [k for k in keys if dicts[0][k].is_floating_point()]
    if not keys:
        raise TatrError("the gradient files share no floating-point key")
    total = sum(dicts[0][k].numel() for k in keys)
    pick = None
    if total > max_coordinates:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(total, (max_coordinates,), generator=gen)
    out = []
    for d in dicts:
        flat = torch.cat([d[k].reshape(-1).float() for k in keys])
        out.append(flat if pick is None else flat[pick])
    return out


def gradient_correlation(
    suite: Any, config: ExperimentConfig, spec: AblationSpec, root: str | Path, log: Log = print
) -> list[PointResult]:
    """For each seed, ρ between every pair of tasks' mean |gradient| at θ_0; one row per pair."""
    tasks = list(suite.tasks)
    n = config.exemplars.n
    for seed in spec.seeds:
        start = time.perf_counter()
        stats = suite.exemplar_gradients(n, seed)
        vectors = flat_gradients([stats.abs_mean[t] for t in tasks], spec.max_coordinates, seed)
        corr = spearman_matrix(vectors)
        run_id = f"ablation-{spec.kind}-{new_run_id()}"
        stamp = time.time()
        rows = [
            {
                "run_id": run_id,
                "study": config.name,
                "job_type": "ablation",
                "experiment": spec.kind,
                "benchmark": config.benchmark,
                "model": suite_model(config),
                "exemplars": n,
                "seed": seed,
                "split": "train",
                "task": f"{a}{T.PAIR_SEPARATOR}{b}",
                "accuracy": float(corr[i, j]),
                "config_hash": content_hash("gradient-correlation", config.benchmark, config.suite, n, seed)[:12],
                "timestamp": stamp,
            }
            for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2)
        ]
        append_rows(root, rows, run_id)
        off = [float(corr[i, j]) for i, j in itertools.combinations(range(len(tasks)), 2)]
        log(
            f"gradient correlation n={n} seed={seed}: ρ mean {sum(off) / len(off):.3f}, "
            f"min {min(off):.3f}, max {max(off):.3f} over {vectors[0].numel()} coordinates "
            f"[{time.perf_counter() - start:.1f}s]"
        )
    return []


def ablation_files(paths: Sequence[str | Path]) -> Iterator[Path]:
    """Expand folders to their *.yaml files (sorted); files pass through."""
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.yaml"))
            if not found:
                raise TatrError(f"{p}: no *.yaml ablation files in this folder")
            yield from found
        else:
            yield p
