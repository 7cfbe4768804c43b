"""Experiment configs: one YAML file per experiment, frozen pydantic models, dotted overrides.

Why pydantic and not Hydra: a config is plain data that must be hashed, saved beside every result
and put into `wandb.config`; validation with `extra="forbid"` turns a typo into a one-line error.

Every number is checked at the door (`allow_inf_nan=False` on every model: λ = NaN would merge and
evaluate a NaN model): λ finite (negative allowed, task negation is real), q in (0, 1]
(`tatr.core.trust_region.check_q`), each method option by its declaration (`tatr.core.options`:
ties_k in (0, 100], DARE's p in [0, 1), …), counts positive, seeds non-negative. Trust-region modes,
components and splits are checked against their registries (`TR_MODES`, `COMPONENTS`, `SPLITS`).
Names that end up in paths (`name`, `benchmark`) must be safe path components (`tatr.core.outputs.safe_name`).

All YAML tatr reads (experiments, ablations, sweep spaces, `key=value` overrides) goes through
`tatr.io.safe_yaml`, which refuses aliases (`*a` repeated inside `&a` nine levels deep expands
a 1 kB file into a billion nodes), reads booleans as YAML 1.2 does (`off`, `on`, `yes`, `no` stay
words: `merge.trust_region=off` is the mode "off") and makes any failure to parse one line
`<file>:<line>: <problem>`. A name field (`Name`) that gets a number takes its text back
(`benchmark: 2024` is the suite "2024").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from tatr.core.components import check_components
from tatr.core.errors import TatrError
from tatr.core.fisher import DEFAULT_FISHER_ESTIMATOR
from tatr.core.options import Option, all_options, check_together
from tatr.core.outputs import safe_name
from tatr.core.registry import did_you_mean
from tatr.core.trust_region import check_mode, check_q
from tatr.io.safe_yaml import load_yaml as _load
from tatr.io.safe_yaml import name_text, read_yaml_mapping
from tatr.store.schema import check_split
from tatr.suites.base import check_selection
from tatr.suites.task_statistics import check_fisher_estimator

# A name (method, suite, study): a YAML number written for it (`2024`) is read back as its text.
Name = Annotated[str, BeforeValidator(name_text)]


def _door(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A core check (a one-line `TatrError`) as a pydantic validator: a ValueError, so the message
    names the file and the key; the value itself is kept as pydantic typed it."""

    def validate(value: Any) -> Any:
        try:
            check(value)
        except TatrError as exc:
            raise ValueError(str(exc)) from None
        return value

    return validate


def _component(name: str) -> str:
    check_components([name])
    return name


def _unique(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value or len(set(value)) != len(value):
        raise ValueError("components must be a non-empty list without repeats")
    return value


# Names checked against their registries (`TR_MODES`, `COMPONENTS`, `SPLITS`, `FISHER_ESTIMATORS`): one list
# each, and an unknown name gets the registries' one line with "did you mean".
TrustRegionName = Annotated[str, AfterValidator(_door(check_mode))]
ComponentName = Annotated[str, AfterValidator(_door(_component))]
Components = Annotated[tuple[ComponentName, ...], AfterValidator(_unique)]
SplitName = Annotated[str, AfterValidator(_door(check_split))]
FisherEstimatorName = Annotated[str, AfterValidator(_door(check_fisher_estimator))]  # FISHER_ESTIMATORS
Quantile = Annotated[float, AfterValidator(_door(check_q))]
SelectionName = Annotated[str, AfterValidator(_door(check_selection))]  # SELECTIONS


class _Frozen(BaseModel):
    """Frozen, typo-proof, and no NaN or ±inf in any float field."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def option_field(option: Option, optional: bool = False) -> tuple[Any, Any]:
    """A method option's pydantic field, from its declaration (`tatr.core.options.Option`): its type,
    its default (None where `optional`: an ablation variant leaves it as the file sets it), its range
    checked by `Option.check`, the one check every door uses."""
    kind = Annotated[option.kind, AfterValidator(_door(option.check))]  # type: ignore[name-defined]
    if optional:
        return kind | None, Field(None, description=option.help)
    return kind, Field(option.default, description=option.help)


def option_fields(identity: str, optional: bool = False) -> dict[str, tuple[Any, Any]]:
    """The fields of the declared options with this identity policy, in declaration order."""
    return {o.name: option_field(o, optional) for o in all_options() if o.identity == identity}


class _MergeSettings(_Frozen):
    """What `MergeConfig` does; its fields are below, the method options' derived from their declarations."""

    def identity(self) -> dict[str, Any]:
        """The merge's part of a result's identity (`tatr.runs.ablations.point_hash`): every field, less
        λ_neg when unset and the options a method does not read.

        Why not the whole dump: DARE's and Breadcrumbs' options and λ_neg came after the first stores, so
        `--resume` would re-run their finished points, and a TA point would re-run when only DARE's p
        changed. TIES' k stays in every identity, as in the first stores. An option declares which it
        is (`Option.identity`: "always" or "read"); a new non-option field joins every identity."""
        from tatr.core.methods import unread_identity_options

        data = self.model_dump(mode="json")
        unread = unread_identity_options(getattr(self, "method"))  # noqa: B009
        if getattr(self, "lam_neg") is None:  # noqa: B009
            unread.add("lam_neg")
        return {k: v for k, v in data.items() if k not in unread}

    def options(self) -> dict[str, Any]:
        """Every method option's value (each method reads its own: `MergeMethod.options`)."""
        return {o.name: getattr(self, o.name) for o in all_options()}

    @model_validator(mode="after")
    def _combinations(self) -> _MergeSettings:
        """A sparsifier's options together (Breadcrumbs' β + density ≤ 1); λ_neg only where it scales a part
        apart (`tatr.core.merge_inputs.check_lam_neg_method`)."""
        from tatr.core.merge_inputs import check_lam_neg_method
        from tatr.core.methods import get_method

        try:
            check_together(self.options())
            if getattr(self, "lam_neg") is not None:  # noqa: B009
                check_lam_neg_method(get_method(getattr(self, "method")), getattr(self, "components"))  # noqa: B009
        except TatrError as exc:
            raise ValueError(str(exc)) from None
        return self


# A method's options are fields named after them (`ties_k`, `dare_p`, …), built from their declarations:
# those in every identity after λ, the others after λ_neg (the order of the first stores' configs).
MergeConfig = create_model(  # type: ignore[call-overload]
    "MergeConfig",
    __base__=_MergeSettings,
    __module__=__name__,
    method=(Name, "ta"),
    trust_region=(TrustRegionName, "zero-shot"),
    q=(Quantile, 0.99),
    lam=(float | None, None),  # None: the method's default scaling factor; finite, may be negative
    **option_fields("always"),
    # None: the plain trust-region mask (TATR). A subset: the component ablation (needs signed gradients).
    components=(Components | None, None),
    # The negative component's own scaling factor (components with negative and another part); None: λ.
    lam_neg=(float | None, None),
    **option_fields("read"),
)


class ExemplarConfig(_Frozen):
    """The exemplars a merge's gradient statistics are computed on: `n` per task, drawn with `seed`, by
    `selection` (`tatr.suites.base.SELECTIONS`: "random", a uniform draw, or "balanced", the classes in
    turn). A config with the default selection reads and hashes as it did before the option existed
    (`config_dict` leaves it out), so every stored row and cached result keeps its identity."""

    n: int = Field(32, ge=1)
    seed: int = Field(0, ge=0)
    selection: SelectionName = "random"


class StatisticsConfig(_Frozen):
    """The per-task statistics of the methods that read them (Fisher merging, RegMean), which a suite
    computes at each θ_t (`tatr.suites.task_statistics`); the defaults are FusionBench's CLIP settings
    (`clip_fisher_merging.yaml`, `clip_regmean.yaml`: 256 examples of the task's training split in
    batches of 32).

    `fisher_estimator`: `fusionbench` (FusionBench's CLIP estimator, the published numbers' one),
    `per-sample` (the diagonal Fisher, Σ_y p·(∇ log p)²) or `empirical` (the labels' squared gradient);
    RegMean's Gram matrices have one estimator. `seed` draws the examples (as `exemplars.seed` draws
    the exemplars: the first `exemplars.n` of a draw are the exemplars of the same seed). Everything
    here that a method's statistics depend on enters its results' identity (`identity`)."""

    n: int = Field(256, ge=1)
    seed: int = Field(0, ge=0)
    batch: int = Field(32, ge=1)
    fisher_estimator: FisherEstimatorName = DEFAULT_FISHER_ESTIMATOR

    def identity(self, kind: str) -> dict[str, Any]:
        """What statistics of `kind` ("fisher", "gram") depend on: the estimator only for the Fisher."""
        data = self.model_dump(mode="json")
        if kind != "fisher":
            data.pop("fisher_estimator")
        return data


def reads_statistics(method: object) -> str | None:
    """The statistics kind ("fisher", "gram") a registered method reads, or None (unknown names: None)."""
    from tatr.core.methods import METHODS

    return METHODS.get(method).statistics if isinstance(method, str) and method in METHODS else None


class AdaMergingConfig(_Frozen):
    """AdaMerging's settings (`tatr.core.adamerging`); the defaults are the paper's (ViT-B/32, 500 steps).

    Task-wise or layer-wise is the method's name (`adamerging-task`, `adamerging-layer`), not a key
    here. The testbed files set `steps: 100`: a testbed step costs about half a TA trial (merge and
    evaluation on the 8 validation sets; benchmarks/bench_adamerging.py), and an AdaMerging run is made
    for every q of a trust-region grid. `inputs`: whose unlabeled inputs the coefficients are
    learned on; the paper uses the test inputs without their labels (transductive), `validation`
    keeps the test split unseen. Their labels are never read either way.
    """

    steps: int = Field(500, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch: int = Field(16, ge=1)
    batches_per_step: int = Field(2, ge=1)  # per task; the reference's loop takes 2 (`if i > 0: break`)
    init: float = Field(0.3, ge=0.0, le=1.0)  # the reference's prior; λ is clamped to [0, 1]
    inputs: Literal["test", "validation"] = "test"
    max_memory_gib: float | None = Field(None, gt=0.0)  # None: what the machine (or the GPU) has free


def name_field(value: object, what: str) -> str:
    """`safe_name` as a pydantic check: a ValueError, so the message names the file and the key."""
    try:
        return safe_name(value, what)
    except TatrError as exc:
        raise ValueError(str(exc)) from None


class ExperimentConfig(_Frozen):
    name: Name = "experiment"  # the study of ablations and the prefix of sweep studies: a path component
    benchmark: Name = "testbed"  # names the report folder results/<benchmark>/
    suite: dict[str, Any] = Field(default_factory=dict)
    merge: MergeConfig = MergeConfig()
    exemplars: ExemplarConfig = ExemplarConfig()
    adamerging: AdaMergingConfig = AdaMergingConfig()
    statistics: StatisticsConfig = StatisticsConfig()
    split: SplitName = "validation"
    seed: int = Field(0, ge=0)

    @field_validator("name", "benchmark")
    @classmethod
    def _safe(cls, value: str, info: Any) -> str:
        return name_field(value, info.field_name)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment and apply `key.sub=value` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {} if path is None else read_yaml_mapping(path, "experiment file")
    for item in overrides:
        apply_override(raw, item)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise TatrError(validation_error(exc, path)) from None


def apply_override(raw: dict[str, Any], item: str, schema: type[BaseModel] | None = None) -> None:
    """Set `a.b.c=value` in a nested dict, refusing keys the schema (default: an experiment's) does not know."""
    if "=" not in item:
        raise TatrError(f"override '{item}' must look like key=value, e.g. merge.q=0.95")
    dotted, value_text = item.split("=", 1)
    parts = dotted.strip().split(".")
    model: type[BaseModel] | None = schema or ExperimentConfig
    node = raw
    for depth, part in enumerate(parts):
        if model is not None:
            fields = model.model_fields
            if part not in fields:
                parent = "".join(f"{p}." for p in parts[:depth])
                hint = did_you_mean(part, sorted(fields), prefix=parent)
                raise TatrError(f"unknown config key '{dotted}'{hint}")
            annotation = fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if depth == len(parts) - 1:
            node[part] = override_value(value_text)
        else:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TatrError(f"config key '{'.'.join(parts[: depth + 1])}' is not a section")
            node = child


def override_value(text: str) -> Any:
    """The value of a `key=value` override, parsed as YAML (without aliases); the text if not YAML."""
    try:
        return _load(text, f"override value {text[:40]!r}")
    except yaml.YAMLError:
        return text


def config_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as JSON-able data (saved beside results, hashed, given to W&B). An experiment's
    `statistics` section is left out where its method reads none and it holds the defaults: reading the
    dict back gives the same config, and the configs and hashes of every other method stay as they were
    before the section existed (a sweep resumes, an ablation point keeps its identity)."""
    data = config.model_dump(mode="json")
    if (
        isinstance(config, ExperimentConfig)
        and reads_statistics(config.merge.method) is None
        and config.statistics == StatisticsConfig()
    ):
        data.pop("statistics")
    if isinstance(config, ExperimentConfig) and config.exemplars.selection == "random":
        data["exemplars"].pop("selection")  # the default: the config and hash of before the option
    return data


def config_hash(config: BaseModel) -> str:
    """A short stable hash of the resolved config, stored with every result row."""
    blob = json.dumps(config_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def validation_error(exc: ValidationError, path: str | Path | None, prefix: str = "") -> str:
    """The one line a pydantic error becomes, for every tatr file: `<file>: <dotted key>: <problem>`.

    `prefix` is the key of the section the model was read from (`ablation` for an ablation block)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "") or "config"
    source = f"{path}: " if path else ""
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}{where}: {str(err['msg']).removeprefix('Value error, ')}{more}"
