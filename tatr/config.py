"""Experiment configs: one YAML file per experiment, frozen pydantic models, dotted overrides.

Why pydantic and not Hydra: a config is plain data that must be hashed, saved beside every result
and put into `wandb.config`; validation with `extra="forbid"` turns a typo into a one-line error.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tatr.errors import TatrError

TrustRegionMode = Literal["off", "zero-shot", "exemplar", "gradient-only", "magnitude-only"]
Component = Literal["orthogonal", "positive", "negative"]
Split = Literal["train", "validation", "test"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MergeConfig(_Frozen):
    method: str = "ta"
    trust_region: TrustRegionMode = "zero-shot"
    q: float = Field(0.99, gt=0.0, le=1.0)
    lam: float | None = None  # None: the method's default scaling factor
    ties_k: float = Field(20.0, gt=0.0, le=100.0)
    # None: the plain trust-region mask (TATR). A subset: the component ablation (needs signed gradients).
    components: tuple[Component, ...] | None = None

    @field_validator("components")
    @classmethod
    def _components_unique(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("components must be a non-empty list without repeats")
        return value


class ExemplarConfig(_Frozen):
    n: int = Field(32, ge=1)
    seed: int = 0


class ExperimentConfig(_Frozen):
    name: str = "experiment"
    benchmark: str = "testbed"
    suite: dict[str, Any] = Field(default_factory=dict)
    merge: MergeConfig = MergeConfig()
    exemplars: ExemplarConfig = ExemplarConfig()
    split: Split = "validation"
    seed: int = 0


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment and apply `key.sub=value` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {} if path is None else read_yaml_mapping(path, "experiment file")
    for item in overrides:
        apply_override(raw, item)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise TatrError(_one_line(exc, path)) from None


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; every problem is a one-line `TatrError`."""
    path = Path(path)
    if not path.is_file():
        raise TatrError(f"{path}: no such {what}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TatrError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TatrError(f"{path}: a {what} must be a mapping of keys to values")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict, refusing keys the schema does not know."""
    if "=" not in item:
        raise TatrError(f"override '{item}' must look like key=value, e.g. merge.q=0.95")
    dotted, value_text = item.split("=", 1)
    parts = dotted.strip().split(".")
    model: type[BaseModel] | None = ExperimentConfig
    node = raw
    for depth, part in enumerate(parts):
        if model is not None:
            fields = model.model_fields
            if part not in fields:
                known = sorted(fields)
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"; did you mean '{'.'.join([*parts[:depth], close[0]])}'?" if close else ""
                raise TatrError(f"unknown config key '{dotted}'{hint}")
            annotation = fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(value_text)
            except yaml.YAMLError:
                node[part] = value_text
        else:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TatrError(f"config key '{'.'.join(parts[: depth + 1])}' is not a section")
            node = child


def config_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_hash(config: BaseModel) -> str:
    """A short stable hash of the resolved config, stored with every result row."""
    blob = json.dumps(config_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _one_line(exc: ValidationError, path: Path | None) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    prefix = f"{path}: " if path else ""
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{prefix}{where}: {err['msg']}{more}"
