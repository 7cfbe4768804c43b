"""Ablation files: one YAML file each (`experiments/ablations/`), read into pydantic models.

An ablation file is an ordinary experiment (benchmark, suite options, base `merge`, `exemplars`)
plus an `ablation:` block that says what to vary:

    ablation:
      kind: components            # one of tatr.store.schema.AblationKind
      seeds: [0, 1, 2]            # exemplar draws; variants that use no exemplars run once
      lam: [0.1, 0.2, 0.3, …]     # λ grid, tuned on `tune_split`
      q: [0.9, 0.99, …]           # q grid, tuned with λ (a single value fixes q)
      variants:                   # merge settings that differ between the compared rows
        - {components: [positive]}
        - {components: [orthogonal, negative], lam_neg: tuned}   # λ_neg tuned over `lam_neg`
      lam_neg: [0.0, 0.2, …]      # λ_neg grid (the negative component's own λ), tuned with λ
      drops: [0, 1.0e-4, …]       # mask-ratio: the dropped fraction 1−q of each point (q fixed there)
      exemplars: [1, 2, 4, …]     # exemplar-count, exemplar-selection: exemplars per task of each point
      selections: [random, balanced]  # exemplar-selection: how each point draws its exemplars
      suite_seeds: false          # true: each seed is also the suite's `seed` (a testbed build per seed)

The three checks the paper leaves open (docs/method.md) are kinds too: `exemplar-selection` runs every
(exemplar count × selection × seed), `conflict-score` and `zero-shot-proxy` compare trust-region modes as
`sensitivity` does (each variant its own λ and q, tuned on validation).

Fisher merging and RegMean read per-task statistics the suite computes at each θ_t: the file's
`statistics:` section (`tatr.runs.config.StatisticsConfig`: n, seed, batch, fisher_estimator), which a
variant may change key by key, e.g. `{method: fisher, statistics: {fisher_estimator: per-sample}}`.

The file is read like an experiment (`tatr.runs.config`: one YAML reader, one `key=value`
override syntax, one error format); `ablation.x=…` overrides go to the block, through the same
value parser, and a misspelt key gets the one did-you-mean (`tatr.core.registry.did_you_mean`).
An unquoted `{trust_region: off}` is the mode "off": the reader's booleans are YAML 1.2's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from tatr.core.components import components_label
from tatr.core.errors import TatrError
from tatr.core.merge_inputs import check_lam_neg_method
from tatr.core.methods import get_method, merge_label
from tatr.core.registry import did_you_mean
from tatr.core.trust_region import check_q, uses_exemplars
from tatr.io.safe_yaml import read_yaml_mapping
from tatr.runs.config import (
    Components,
    ExperimentConfig,
    MergeConfig,
    Name,
    SelectionName,
    SplitName,
    StatisticsConfig,
    TrustRegionName,
    apply_override,
    option_fields,
    override_value,
    validation_error,
)
from tatr.runs.tune import refuse_test_tuning
from tatr.store.schema import AblationKind

DEFAULT_LAMS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_LAM_NEGS = (0.0, *DEFAULT_LAMS)  # λ_neg = 0: the negative part left out


class _Frozen(BaseModel):
    """Frozen, typo-proof, and no NaN or ±inf in any float (a λ grid with NaN would store NaN rows)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# The merge settings one compared row changes; unset fields keep the file's `merge` values. The method
# options are fields built from their declarations (`tatr.runs.config.option_fields`), as `MergeConfig`'s.
Variant = create_model(  # type: ignore[call-overload]
    "Variant",
    __base__=_Frozen,
    __module__=__name__,
    method=(Name | None, None),
    trust_region=(TrustRegionName | None, None),
    components=(Components | None, None),
    **option_fields("always", optional=True),
    # a number fixes the negative component's own λ_neg; `tuned` searches the block's `lam_neg` grid
    lam_neg=(float | Literal["tuned"] | None, None),
    # this variant's own λ grid instead of the block's `lam` (TSV-M and Iso-C default to λ = 1, outside
    # a grid tuned for TA); a variant without it is tuned on the block's grid, so its identity is unchanged
    lam_grid=(tuple[float, ...] | None, None),
    **option_fields("read", optional=True),
    # the keys of the file's `statistics` this variant changes (Fisher merging, RegMean; checked as the file's)
    statistics=(StatisticsConfig | None, None),
)


class AblationSpec(_Frozen):
    kind: AblationKind
    seeds: tuple[Annotated[int, Field(ge=0)], ...] = (0,)
    lam: tuple[float, ...] = DEFAULT_LAMS  # finite (allow_inf_nan=False); negative λ is task negation
    lam_neg: tuple[float, ...] = DEFAULT_LAM_NEGS  # the λ_neg grid of variants with `lam_neg: tuned`
    q: tuple[float, ...] = (0.99,)
    variants: tuple[Variant, ...] = ()
    drops: tuple[float, ...] = ()
    exemplars: tuple[int, ...] = ()
    selections: tuple[SelectionName, ...] = ("random", "balanced")  # exemplar-selection's draws
    max_coordinates: int = Field(2_000_000, ge=100)
    tune_split: SplitName = "validation"
    eval_split: SplitName = "test"
    allow_test_tuning: bool = False
    baselines: bool = False  # also record θ_0 and the fine-tuned θ_t on the evaluation split
    suite_seeds: bool = False  # each seed is also the suite's `seed` option: one suite (build) per seed

    @model_validator(mode="after")
    def _check(self) -> AblationSpec:
        if not self.seeds or not self.lam or not self.q or not self.lam_neg:
            raise ValueError("seeds, lam, lam_neg and q need at least one value each")
        try:
            for q in self.q:
                check_q(q)
        except TatrError as exc:
            raise ValueError(str(exc)) from None
        if self.kind == AblationKind.MASK_RATIO and not self.drops:
            raise ValueError("a mask-ratio ablation needs `drops` (the dropped fractions 1−q)")
        if any(not 0.0 <= d < 1.0 for d in self.drops):
            raise ValueError("every drop must be in [0, 1)")
        if self.kind in (AblationKind.EXEMPLAR_COUNT, AblationKind.EXEMPLAR_SELECTION) and not self.exemplars:
            raise ValueError(f"an {self.kind} ablation needs `exemplars` (counts per task)")
        if not self.selections or len(set(self.selections)) != len(self.selections):
            raise ValueError("selections must be a non-empty list without repeats")
        if any(n < 1 for n in self.exemplars):
            raise ValueError("exemplar counts must be at least 1")
        if self.kind != AblationKind.GRADIENT_CORRELATION and not self.variants:
            raise ValueError(f"a {self.kind} ablation needs `variants` (the merge settings it compares)")
        try:
            refuse_test_tuning(self.tune_split, self.allow_test_tuning, "set ablation.allow_test_tuning=true")
        except TatrError as exc:
            raise ValueError(str(exc)) from None
        return self


@dataclass(frozen=True)
class Point:
    """One tuned evaluation: a merge configuration, its exemplars, and the (q, λ) grid it searches."""

    merge: MergeConfig
    seed: int
    exemplars: int
    qs: tuple[float, ...]
    lams: tuple[float, ...]
    lam_negs: tuple[float, ...] | None = None  # tune λ_neg over these too (None: merge.lam_neg as set)
    statistics: StatisticsConfig | None = None  # those of a method that reads them (Fisher, RegMean), else None
    selection: str = "random"  # how the exemplars are drawn (`exemplars.selection`)

    @property
    def uses_exemplars(self) -> bool:
        return uses_exemplars(self.merge.trust_region, self.merge.components)

    def describe(self) -> str:
        m = self.merge
        text = merge_label(m.method, m.trust_region)
        if m.components is not None:
            own = self.lam_negs if m.lam_neg is None else m.lam_neg  # the negative part's own λ, if any
            text += f" components={components_label(list(m.components), own)}"
        if self.uses_exemplars:
            text += f" n={self.exemplars} seed={self.seed}" + (
                "" if self.selection == "random" else f" {self.selection}"
            )
        kind = get_method(m.method).statistics
        if kind is not None and self.statistics is not None:
            s = self.statistics
            text += f" [{s.fisher_estimator + ' ' if kind == 'fisher' else ''}statistics n={s.n} seed={s.seed}]"
        if len(self.qs) == 1 and m.trust_region != "off":
            text += f" q={self.qs[0]:g}"
        return text


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
        raise TatrError(validation_error(exc, path)) from None
    try:
        spec = AblationSpec.model_validate(block)
    except ValidationError as exc:
        raise TatrError(validation_error(exc, path, "ablation")) from None
    return config, spec


def _set_ablation(block: dict[str, Any], item: str, path: Path) -> None:
    if "=" not in item:
        raise TatrError(f"override '{item}' must look like key=value, e.g. ablation.seeds=[0]")
    dotted, value = item.split("=", 1)
    key = dotted.strip().removeprefix("ablation.")
    if key not in AblationSpec.model_fields:
        hint = did_you_mean(key, AblationSpec.model_fields, prefix="ablation.")
        raise TatrError(f"{path}: unknown ablation key '{key}'{hint}")
    block[key] = override_value(value)


def suite_model(config: ExperimentConfig) -> str | None:
    """The model a suite's options name (clip8: `suite.model`), for the store's `model` column."""
    model = config.suite.get("model")
    return None if model is None else str(model)


# --- what to run -----------------------------------------------------------------------------------
def points(config: ExperimentConfig, spec: AblationSpec) -> list[Point]:
    """Every tuned evaluation the ablation needs, in a fixed order."""
    out: list[Point] = []
    variants = spec.variants or (Variant(),)
    for index, variant in enumerate(variants):
        tune_neg = variant.lam_neg == "tuned"
        skip = {"lam_grid", "statistics", *(("lam_neg",) if tune_neg else ())}
        settings = variant.model_dump(exclude_none=True, exclude=skip)
        if variant.lam_grid is not None and not variant.lam_grid:
            raise TatrError(f"ablation.variants.{index}.lam_grid: give at least one λ")
        lams = tuple(variant.lam_grid) if variant.lam_grid is not None else tuple(spec.lam)
        try:
            merge = MergeConfig.model_validate({**config.merge.model_dump(), **settings})
        except ValidationError as exc:
            raise TatrError(validation_error(exc, None, f"ablation.variants.{index}")) from None
        if tune_neg:
            check_lam_neg_method(get_method(merge.method), merge.components)  # one line, before any work
        statistics = _statistics(config, variant, merge, index)
        uses = uses_exemplars(merge.trust_region, merge.components)
        seeds = spec.seeds if uses or spec.suite_seeds else spec.seeds[:1]
        drawn = spec.kind in (AblationKind.EXEMPLAR_COUNT, AblationKind.EXEMPLAR_SELECTION)
        counts = spec.exemplars if drawn else (config.exemplars.n,)
        compare = spec.kind == AblationKind.EXEMPLAR_SELECTION and uses  # without exemplars the draw does not matter
        selections = spec.selections if compare else (config.exemplars.selection,)
        if spec.kind == AblationKind.MASK_RATIO:
            grids = [(round(1.0 - d, 12),) for d in spec.drops]
        elif merge.trust_region == "off":
            grids = [(1.0,)]  # no mask: q has no effect, tune λ only
        else:
            grids = [tuple(spec.q)]
        for qs, n, selection, seed in itertools.product(grids, counts, selections, seeds):
            negs = tuple(spec.lam_neg) if tune_neg else None
            out.append(Point(merge, seed, n, qs, lams, negs, statistics, selection))
    return out


def _statistics(config: ExperimentConfig, variant: Any, merge: Any, index: int) -> StatisticsConfig | None:
    """A point's statistics: the file's, with the keys its variant sets, for a method that reads them;
    None for the others (a variant's statistics for one of them is refused in one line)."""
    if get_method(merge.method).statistics is None:
        if variant.statistics is not None:
            raise TatrError(f"ablation.variants.{index}.statistics: method '{merge.method}' reads no statistics")
        return None
    if variant.statistics is None:
        return config.statistics
    return config.statistics.model_copy(update=variant.statistics.model_dump(exclude_unset=True))


def per_suite_seed(config: ExperimentConfig, spec: AblationSpec) -> list[tuple[ExperimentConfig, AblationSpec]]:
    """The (config, spec) pairs to run: one per seed with `suite_seeds` (the suite's `seed` option set
    to it, as the testbed baselines build one testbed per seed), else the file as it is."""
    if not spec.suite_seeds:
        return [(config, spec)]
    return [
        (
            config.model_copy(update={"suite": {**config.suite, "seed": seed}}),
            spec.model_copy(update={"seeds": (seed,)}),
        )
        for seed in spec.seeds
    ]


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
