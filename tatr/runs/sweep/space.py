"""Search spaces (`sweeps/*.yaml`): read once, every number checked at the door.

A space names the searched parameters (a float range `{low, high, log, step}` or a list of
values), the fixed `merge:` settings, the sampler, the pruner and the metric. Every mistake is a
one-line `TatrError` naming the file and the parameter, raised before any work: a NaN bound, an
infinite step or a `q` of 1.5 would otherwise reach trial 37, or worse, evaluate a NaN model and
store its rows.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError
from tatr.runs.config import ExperimentConfig, MergeConfig, config_dict, read_yaml_mapping

PARAMS = ("lam", "q", "method", "trust_region", "ties_k")
NUMERIC = ("lam", "q", "ties_k")
PAPER_DEFAULT = {"lam": 0.3, "q": 0.99, "ties_k": 20.0}  # ties_k: TIES as published (K=20)
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
METRICS = ("accuracy", "normalized_accuracy")
SPACE_KEYS = ("description", "merge", "params", "sampler", "pruner", "metric")
MAX_GRID = 100_000  # a grid is listed in memory: a tiny step must not allocate 10^12 values


# --- search spaces ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a float range (low, high, log, step) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

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


@dataclass(frozen=True)
class SearchSpace:
    """A `sweeps/*.yaml` file: fixed merge settings, searched parameters, sampler, pruner, metric."""

    name: str
    merge: dict[str, Any] = field(default_factory=dict)
    params: tuple[ParamSpec, ...] = ()
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "accuracy"
    description: str = ""

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        params = tuple(
            ParamSpec(**{**p, "choices": tuple(p["choices"]) if p.get("choices") is not None else None})
            for p in data["params"]
        )
        return cls(**{**data, "params": params})

    def with_options(self, sampler: str | None = None, pruner: str | None = None, where: object = None) -> SearchSpace:
        where = self.name if where is None else where
        out = dataclasses.replace(self, sampler=sampler or self.sampler, pruner=pruner or self.pruner)
        _check_choice("sampler", out.sampler, SAMPLERS, where)
        _check_choice("pruner", out.pruner, PRUNERS, where)
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
        """The paper default (λ=0.3, q=0.99) for the searched parameters whose range holds it."""
        out = {}
        for name, value in PAPER_DEFAULT.items():
            spec = self.param(name)
            if spec is not None and spec.contains(value):
                out[name] = value
        return out

    def merge_overrides(self) -> list[str]:
        """The fixed `merge:` settings as `merge.key=value` overrides (JSON is valid YAML)."""
        return [f"merge.{k}={json.dumps(v)}" for k, v in self.merge.items()]


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; every mistake is a one-line `TatrError`."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search-space file")
    for key in raw:
        if key not in SPACE_KEYS:
            raise TatrError(f"{path}: unknown key '{key}'{_did_you_mean(key, SPACE_KEYS)}")
    merge = raw.get("merge") or {}
    if not isinstance(merge, dict):
        raise TatrError(f"{path}: 'merge' must be a mapping of merge settings")
    for key, value in merge.items():
        if key not in MergeConfig.model_fields:
            raise TatrError(f"{path}: unknown merge setting '{key}'{_did_you_mean(key, MergeConfig.model_fields)}")
        if key in NUMERIC and not (key == "lam" and value is None):
            _check_value(f"{path}: merge.{key}", key, value)
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict) or not params_raw:
        raise TatrError(f"{path}: 'params' must map at least one of {', '.join(PARAMS)} to a range or a list")
    params = tuple(_param(path, name, spec) for name, spec in params_raw.items())
    space = SearchSpace(
        name=path.stem,
        merge=merge,
        params=params,
        sampler=str(raw.get("sampler", "tpe")),
        pruner=str(raw.get("pruner", "median")),
        metric=str(raw.get("metric", "accuracy")),
        description=str(raw.get("description", "")),
    )
    _check_choice("metric", space.metric, METRICS, path)
    return space.with_options(where=path)


def _param(path: Path, name: str, spec: Any) -> ParamSpec:
    if name not in PARAMS:
        raise TatrError(
            f"{path}: cannot search over '{name}'{_did_you_mean(name, PARAMS)} (known: {', '.join(PARAMS)})"
        )
    where = f"{path}: params.{name}"
    if isinstance(spec, list):
        if not spec:
            raise TatrError(f"{where}: the list of choices is empty")
        for value in spec:
            _check_value(where, name, value)
        if len(set(spec)) != len(spec):
            raise TatrError(f"{where}: the list of choices repeats a value")
        return ParamSpec(name, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise TatrError(f"{where}: give a range {{low: …, high: …}} or a list of values")
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown:
        raise TatrError(f"{where}: unknown field '{unknown[0]}' (known: low, high, log, step)")
    if name in ("method", "trust_region"):
        raise TatrError(f"{where}: give a list of names, not a range")
    if "low" not in spec or "high" not in spec:
        raise TatrError(f"{where}: a range needs numeric 'low' and 'high'")
    low, high = _number(where, "low", spec["low"]), _number(where, "high", spec["high"])
    step = None if spec.get("step") is None else _number(where, "step", spec["step"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise TatrError(f"{where}: log must be true or false, got {log!r}")
    if not low <= high:
        raise TatrError(f"{where}: low ({low}) must not be above high ({high})")
    if step is not None and not step > 0:
        raise TatrError(f"{where}: step must be above 0, got {step}")
    if log and step is not None:
        raise TatrError(f"{where}: a log-scale range cannot have a step")
    if log and not low > 0:
        raise TatrError(f"{where}: a log-scale range needs low > 0, got {low}")
    for value in (low, high):
        _check_value(where, name, value)
    return ParamSpec(name, low=low, high=high, log=log, step=step)


def _number(where: str, field_name: str, value: Any) -> float:
    """A finite float from YAML: a number or a numeric string (PyYAML reads `1e-3` as text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TatrError(f"{where}: {field_name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise TatrError(f"{where}: {field_name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise TatrError(f"{where}: {field_name} must be finite, got {value!r}")
    return number


def _check_value(where: str, name: str, value: Any) -> None:
    """Refuse a value the merge would refuse, now rather than in trial 37 (or never, for NaN)."""
    from tatr.core.methods import get_method
    from tatr.core.trust_region import check_mode

    try:
        if name == "method":
            get_method(str(value))
        elif name == "trust_region":
            check_mode(str(value))
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise TatrError(f"expected a number, got {value!r}")
        elif not math.isfinite(value):
            raise TatrError(f"{name} must be finite, got {value}")
        elif name == "q" and not 0 < value <= 1:
            raise TatrError(f"q must be in (0, 1], got {value}")
        elif name == "ties_k" and not 0 < value <= 100:
            raise TatrError(f"ties_k must be in (0, 100], got {value}")
    except TatrError as exc:
        raise TatrError(f"{where}: {exc}") from None


def _did_you_mean(name: str, known: Sequence[str] | Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_choice(what: str, value: str, known: Sequence[str], where: object) -> None:
    if value not in known:
        raise TatrError(f"{where}: unknown {what} '{value}'{_did_you_mean(value, known)} (known: {', '.join(known)})")


def trial_config(base: ExperimentConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    """The base experiment with the trial's parameters in `merge` (searched parameters win)."""
    raw = config_dict(base)
    raw["merge"] = {**raw["merge"], **params}
    return ExperimentConfig.model_validate(raw)


def make_sampler(space: SearchSpace, seed: int) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if space.sampler == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=seed)
        if space.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(name: str, num_tasks: int) -> Any:
    """Steps are tasks; a trial's intermediate value is the part of its mean already secured.

    A trial is judged once, when half of its tasks are in. Earlier, the comparison is as good as a
    task or two predict the mean, which on 8 unrelated tasks is poor (on the testbed, a pruner
    acting from the first task stopped the trial that would have been the best); judged at every
    later task too, a trial must beat the median four times in a row and most trials are stopped
    (41 of 50 in one testbed sweep). Once, at half, saves half of a below-median trial's evaluation.
    """
    import optuna

    half = max(1, num_tasks // 2)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=half - 1, interval_steps=num_tasks)
    if name == "halving":  # rungs at steps (half − 1)·2^r: the first once half of the tasks are in
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, half - 1), reduction_factor=2)
    return optuna.pruners.NopPruner()
