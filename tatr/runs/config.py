"""Experiment configs: one YAML file per experiment, frozen pydantic models, dotted overrides.

Why pydantic and not Hydra: a config is plain data that must be hashed, saved beside every result
and put into `wandb.config`; validation with `extra="forbid"` turns a typo into a one-line error.

Every number is checked at the door (`allow_inf_nan=False` on every model: λ = NaN would merge and
evaluate a NaN model): λ finite (negative allowed, task negation is real), q in (0, 1], ties_k in
(0, 100], counts positive, seeds non-negative. Names that end up in paths (`name`, `benchmark`)
must be safe path components (`tatr.core.outputs.safe_name`).

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
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from tatr.core.errors import TatrError
from tatr.core.outputs import safe_name
from tatr.core.registry import did_you_mean
from tatr.core.sparsify import BREADCRUMBS_BETA, BREADCRUMBS_DENSITY, DARE_P, DARE_SEED
from tatr.io.safe_yaml import load_yaml as _load
from tatr.io.safe_yaml import name_text, read_yaml_mapping

# A name (method, suite, study): a YAML number written for it (`2024`) is read back as its text.
Name = Annotated[str, BeforeValidator(name_text)]
TrustRegionMode = Literal["off", "zero-shot", "exemplar", "gradient-only", "magnitude-only"]
Component = Literal["orthogonal", "positive", "negative"]
Split = Literal["train", "validation", "test"]


class _Frozen(BaseModel):
    """Frozen, typo-proof, and no NaN or ±inf in any float field."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class MergeConfig(_Frozen):
    method: Name = "ta"
    trust_region: TrustRegionMode = "zero-shot"
    q: float = Field(0.99, gt=0.0, le=1.0)
    lam: float | None = None  # None: the method's default scaling factor; finite, may be negative
    ties_k: float = Field(20.0, gt=0.0, le=100.0)
    # None: the plain trust-region mask (TATR). A subset: the component ablation (needs signed gradients).
    components: tuple[Component, ...] | None = None
    # The negative component's own scaling factor (components with negative and another part); None: λ.
    lam_neg: float | None = None
    # DARE (dare, dare-ties) and Breadcrumbs options; each method reads its own. Defaults and their
    # sources (FusionBench's CLIP-ViT DARE, mergekit's Breadcrumbs): tatr.core.sparsify.
    dare_p: float = Field(DARE_P, ge=0.0, lt=1.0)  # drop rate
    dare_seed: int = Field(DARE_SEED, ge=0)  # seeds every (task, tensor) mask
    breadcrumbs_beta: float = Field(BREADCRUMBS_BETA, ge=0.0, le=1.0)  # the largest |τ| fraction dropped
    breadcrumbs_density: float = Field(BREADCRUMBS_DENSITY, ge=0.0, le=1.0)  # the fraction kept

    def identity(self) -> dict[str, Any]:
        """The merge's part of a result's identity (`tatr.runs.ablations.point_hash`): every field, less
        λ_neg when unset and the sparsifiers' options a method does not read.

        Why not the whole dump: DARE's and Breadcrumbs' options and λ_neg came after the first stores, so
        `--resume` would re-run their finished points, and a TA point would re-run when only DARE's p
        changed. TIES' k stays in every identity, as in the first stores. A new field joins every
        identity unless it is a sparsifier's option (`tatr.core.methods.SPARSIFY_OPTIONS`)."""
        from tatr.core.methods import SPARSIFY_OPTIONS, uses_option

        data = self.model_dump(mode="json")
        options = {o for opts in SPARSIFY_OPTIONS.values() for o in opts} - {"ties_k"}
        unread = {o for o in options if not uses_option(self.method, o)}
        if self.lam_neg is None:
            unread.add("lam_neg")
        return {k: v for k, v in data.items() if k not in unread}

    @field_validator("components")
    @classmethod
    def _components_unique(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("components must be a non-empty list without repeats")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> MergeConfig:
        """β + density ≤ 1; λ_neg only where it scales a part apart (`tatr.core.merge_inputs.check_lam_neg_method`)."""
        from tatr.core.merge_inputs import check_lam_neg_method
        from tatr.core.methods import get_method
        from tatr.core.sparsify import check_sparsity

        try:
            check_sparsity(beta=self.breadcrumbs_beta, density=self.breadcrumbs_density)
            if self.lam_neg is not None:
                check_lam_neg_method(get_method(self.method), self.components)
        except TatrError as exc:
            raise ValueError(str(exc)) from None
        return self


class ExemplarConfig(_Frozen):
    n: int = Field(32, ge=1)
    seed: int = Field(0, ge=0)


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
    split: Split = "validation"
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
    return config.model_dump(mode="json")


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
