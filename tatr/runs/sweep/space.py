"""Search spaces (`sweeps/*.yaml`): pydantic models read once, every number checked at the door.

A space names the searched parameters (a float range `{low, high, log, step}` or a list of
values), the fixed `merge:` settings, the sampler, the pruner and the metric. It is read like an
experiment (`tatr.runs.config`: the same YAML reader, the same `key=value` overrides, the same
one-line error `<file>: <dotted key>: <problem>`). Every mistake is raised before any work: a NaN
bound, an infinite step or a `q` of 1.5 would otherwise reach trial 37, or worse, evaluate a NaN
model and store its rows.

Two forms of the same model: the file's (`params` maps a name to a range or a list) and the stored
one (`to_dict`: `params` a list of `ParamSpec`s with their names), which a study hashes into its
identity and hands to its worker processes.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tatr.core.errors import TatrError
from tatr.core.methods import METHODS, get_method
from tatr.core.options import all_options, get_option
from tatr.core.registry import did_you_mean
from tatr.io.safe_yaml import name_text, read_yaml_mapping
from tatr.runs.config import (
    ExperimentConfig,
    MergeConfig,
    apply_override,
    config_dict,
    validation_error,
)

NAMES = ("method", "trust_region")  # searched over names: a YAML number in their lists is its text
# The method options a sweep searches: the declared float ones (`tatr.core.options.Option.searchable`;
# a seed is set, not searched), each checked by its declaration.
SEARCHED_OPTIONS = tuple(o.name for o in all_options() if o.searchable)
PARAMS = ("lam", "q", "method", "trust_region", *SEARCHED_OPTIONS)
NUMERIC = ("lam", "q", *SEARCHED_OPTIONS)
# the paper's λ and q; each option's declared default (TIES' k=20 as published; DARE's and Breadcrumbs'
# sources: tatr.core.sparsify)
PAPER_DEFAULT = {"lam": 0.3, "q": 0.99, **{k: get_option(k).default for k in SEARCHED_OPTIONS}}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
METRICS = ("accuracy", "normalized_accuracy")
RANGE_KEYS = ("low", "high", "log", "step")
MAX_GRID = 100_000  # a grid is listed in memory: a tiny step must not allocate 10^12 values


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _error_at(key: str, message: str, value: Any) -> ValidationError:
    """A validation error at `key` inside the field or model being validated.

    Raised from a validator, pydantic puts the enclosing field before it, so a problem with the
    range of `lam` reads `params.lam: …` like any other dotted key."""
    detail = {"type": "value_error", "loc": (key,), "input": value, "ctx": {"error": ValueError(message)}}
    return ValidationError.from_exception_data("search space", [detail])  # type: ignore[list-item]


# --- one searched parameter ------------------------------------------------------------------------
class ParamSpec(_Frozen):
    """One searched parameter: a float range (low, high, log, step) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @classmethod
    def parse(cls, name: str, spec: Any) -> ParamSpec:
        """The file's form (`lam: {low: 0, high: 1}` or `lam: [0.1, 0.3]`), checked; ValueError if not."""
        if name not in PARAMS:
            raise ValueError(f"cannot search over '{name}'{did_you_mean(name, PARAMS)} (known: {', '.join(PARAMS)})")
        if isinstance(spec, list):
            if name in NAMES:
                spec = [name_text(value) for value in spec]
            if not spec:
                raise ValueError("the list of choices is empty")
            for value in spec:
                check_value(name, value)
            if len(set(spec)) != len(spec):
                raise ValueError("the list of choices repeats a value")
            return cls(name=name, choices=tuple(spec))
        if not isinstance(spec, dict):
            raise ValueError("give a range {low: …, high: …} or a list of values")
        unknown = sorted(set(spec) - set(RANGE_KEYS))
        if unknown:
            raise ValueError(f"unknown field '{unknown[0]}' (known: {', '.join(RANGE_KEYS)})")
        if name in ("method", "trust_region"):
            raise ValueError("give a list of names, not a range")
        if "low" not in spec or "high" not in spec:
            raise ValueError("a range needs numeric 'low' and 'high'")
        low, high = _number("low", spec["low"]), _number("high", spec["high"])
        step = None if spec.get("step") is None else _number("step", spec["step"])
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"log must be true or false, got {log!r}")
        if not low <= high:
            raise ValueError(f"low ({low}) must not be above high ({high})")
        if step is not None and not step > 0:
            raise ValueError(f"step must be above 0, got {step}")
        if log and step is not None:
            raise ValueError("a log-scale range cannot have a step")
        if log and not low > 0:
            raise ValueError(f"a log-scale range needs low > 0, got {low}")
        for value in (low, high):
            check_value(name, value)
        return cls(name=name, low=low, high=high, log=log, step=step)

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
        if count > MAX_GRID:
            raise TatrError(f"grid sampler: parameter '{self.name}' has {count:,} points (more than {MAX_GRID:,})")
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def smallest(self) -> float:
        return min(self.choices) if self.choices is not None else float(self.low)  # type: ignore[type-var,arg-type]


def _number(field_name: str, value: Any) -> float:
    """A finite float from YAML: a number or a numeric string (PyYAML reads `1e-3` as text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{field_name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{field_name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{field_name} must be finite, got {value!r}")
    return number


def check_value(name: str, value: Any) -> None:
    """Refuse a value the merge would refuse (ValueError), now rather than in trial 37 (or never, for NaN).

    q by `check_q`, a method option by its declaration (`Option.check`): the checks the merge runs."""
    from tatr.core.methods import fixed_method
    from tatr.core.options import is_option
    from tatr.core.trust_region import check_mode, check_q

    try:
        if name == "method":
            fixed_method(str(value))
        elif name == "trust_region":
            check_mode(str(value))
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        elif not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        elif name == "q":
            check_q(value)
        elif is_option(name):
            get_option(name).check(value)
    except TatrError as exc:
        raise ValueError(str(exc)) from None


def _choice(what: str, value: Any, known: Sequence[str]) -> str:
    text = str(value)
    if text not in known:
        raise ValueError(f"unknown {what} '{text}'{did_you_mean(text, known)} (known: {', '.join(known)})")
    return text


# --- the space ---------------------------------------------------------------------------------------
class SearchSpace(_Frozen):
    """A `sweeps/*.yaml` file: fixed merge settings, searched parameters, sampler, pruner, metric.

    `name` is the file's stem, given by `load_search_space` through the validation context (a file
    cannot set it)."""

    name: str
    merge: dict[str, Any] = Field(default_factory=dict)
    params: tuple[ParamSpec, ...] = Field(default=(), validate_default=True)
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "accuracy"
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any, info: Any) -> Any:
        """Unknown keys get a did-you-mean; a file's space takes its name from the context."""
        stem = (info.context or {}).get("name")
        if stem is None or not isinstance(data, dict):
            return data
        known = [k for k in cls.model_fields if k != "name"]
        for key in data:
            if key not in known:
                raise _error_at(str(key), f"unknown key '{key}'{did_you_mean(key, known)}", data[key])
        return {**data, "name": stem}

    @field_validator("merge", mode="before")
    @classmethod
    def _merge(cls, merge: Any) -> dict[str, Any]:
        if merge is None:
            return {}
        if not isinstance(merge, dict):
            raise ValueError("'merge' must be a mapping of merge settings")
        merge = {key: name_text(value) if key in NAMES else value for key, value in merge.items()}
        for key, value in merge.items():
            try:
                if key not in MergeConfig.model_fields:
                    raise ValueError(f"unknown merge setting '{key}'{did_you_mean(key, MergeConfig.model_fields)}")
                if key in NUMERIC and not (key == "lam" and value is None):
                    check_value(key, value)
            except ValueError as exc:
                raise _error_at(str(key), str(exc), value) from None
        return merge

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, params: Any, info: Any) -> Any:
        from_file = "name" in (info.context or {})
        if not from_file and isinstance(params, list | tuple) and params:  # the stored form
            return params
        if not isinstance(params, dict) or not params:
            raise ValueError(f"'params' must map at least one of {', '.join(PARAMS)} to a range or a list")
        out = []
        for name, spec in params.items():  # the file's form, in the file's order (the suggestion order)
            try:
                out.append(ParamSpec.parse(str(name), spec))
            except ValueError as exc:
                raise _error_at(str(name), str(exc), spec) from None
        return tuple(out)

    @field_validator("sampler", "pruner", "metric", "description", mode="before")
    @classmethod
    def _text(cls, value: Any, info: Any) -> str:
        known = {"sampler": SAMPLERS, "pruner": PRUNERS, "metric": METRICS}.get(info.field_name)
        return str(value) if known is None else _choice(info.field_name, value, known)

    @model_validator(mode="after")
    def _band(self) -> SearchSpace:
        """A sparsifier's options together (Breadcrumbs' β + density ≤ 1) for every trial, not only the
        first: the largest value the space can suggest of each (or its fixed value, or the default)."""
        from tatr.core.options import SPARSIFIERS

        def largest(name: str) -> Any:
            spec = self.param(name)
            if spec is not None:
                return max(spec.choices) if spec.choices is not None else float(spec.high)  # type: ignore[arg-type,type-var]
            return self.merge.get(name, get_option(name).default)

        for kind in SPARSIFIERS.values():
            if kind.together is None or not any(self.param(o.name) is not None for o in kind.options):
                continue
            try:
                kind.together({o.name: largest(o.name) for o in kind.options})
            except TatrError as exc:
                raise ValueError(f"{exc} (the largest values this space can suggest)") from None
        return self

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (what a study's identity hashes; what worker processes receive)."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        return cls.model_validate(dict(data))

    def with_options(self, sampler: str | None = None, pruner: str | None = None, where: object = None) -> SearchSpace:
        """This space with another sampler or pruner (the command line's), checked like the file's."""
        where = self.name if where is None else where
        try:
            out = self.from_dict(
                {**self.to_dict(), "sampler": sampler or self.sampler, "pruner": pruner or self.pruner}
            )
        except ValidationError as exc:
            raise TatrError(validation_error(exc, str(where))) from None
        if out.sampler == "grid":
            for p in out.params:
                try:
                    p.grid_values()
                except TatrError as exc:
                    raise TatrError(f"{where}: {exc}") from None
        return out

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: p.grid_values() for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values()) if self.params else 1

    def default_params(self) -> dict[str, Any]:
        """The paper default (λ=0.3, q=0.99) for the searched parameters whose range holds it; λ is the
        method's own default where the space fixes a method (TSV-M and Iso-C: 1.0, FusionBench's)."""
        out = {}
        method = self.merge.get("method")
        lam = get_method(method).default_lam if isinstance(method, str) and method in METHODS else PAPER_DEFAULT["lam"]
        for name, value in {**PAPER_DEFAULT, "lam": lam}.items():
            spec = self.param(name)
            if spec is not None and spec.contains(value):
                out[name] = value
        return out

    def merge_overrides(self) -> list[str]:
        """The fixed `merge:` settings as `merge.key=value` overrides (JSON is valid YAML)."""
        return [f"merge.{k}={json.dumps(v)}" for k, v in self.merge.items()]


def load_search_space(path: str | Path, overrides: Sequence[str] = ()) -> SearchSpace:
    """Read and validate a search-space file, then `key=value` overrides; one-line `TatrError`s."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search-space file")
    for item in overrides:
        apply_override(raw, item, SearchSpace)
    try:
        space = SearchSpace.model_validate(raw, context={"name": path.stem})
    except ValidationError as exc:
        raise TatrError(validation_error(exc, path)) from None
    return space.with_options(where=path)


def trial_config(base: ExperimentConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    """The base experiment with the trial's parameters in `merge` (searched parameters win)."""
    raw = config_dict(base)
    raw["merge"] = {**raw["merge"], **params}
    return ExperimentConfig.model_validate(raw)


def make_sampler(space: SearchSpace, seed: int) -> Any:
    """The space's sampler, seeded (TPE multivariate with constant liar for parallel workers)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if space.sampler == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=seed)
        if space.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
