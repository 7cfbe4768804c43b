"""A merge method's options, each declared once: name, type, default, range, flag, help, identity.

Why a module of its own: an option (TIES' k, DARE's drop rate, Breadcrumbs' β) is one fact that the
API keywords, the experiment config (`tatr.runs.config.MergeConfig`), the `tatr merge` flags, the
store's columns (`tatr.store.schema`), the search-space checks (`tatr.runs.sweep.space`), a point's
identity and the report's labels all need. Each of them derives what it needs from the `Option`
declared here, as mergekit's `ConfigParameterDef`; none of them lists an option again.

Options are grouped by the sparsifier that reads them (`SparsifierKind`, registered in `SPARSIFIERS`):
a `MergeMethod` names its sparsifier (`tatr.core.methods`), so a method reads exactly its sparsifier's
options. A sparsifier may add a check over its options together (Breadcrumbs: β + density ≤ 1) and one
over the model's tensor sizes (Breadcrumbs: a density that keeps nothing anywhere). Several sparsifiers may
read one declaration (mergekit's density). A per-tensor sparsifier's option may take one value per task, a
tuple in task order (mergekit's per-model density; `task_values`, `check_per_task`).

Adding a sparsifying method with its options (see tests/test_method_options.py):
  1. its per-tensor sparsifier and a `SPARSIFIERS.add(name, SparsifierKind(name, (Option(…), …), make=…))`
     beside it (`tatr.core.sparsify`);
  2. a `MergeMethod(…, sparsify=name, …)` in `tatr.core.methods`.
Everything else (config fields, flags, columns, search space, identity, labels) follows.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tatr.core.errors import TatrError
from tatr.core.registry import Registry, unknown_name

Number = int | float


@dataclass(frozen=True)
class Option:
    """One merge option of a sparsifier, declared once.

    `low`/`high` bound the value (None: unbounded), open or closed; `what` names it in an error
    ("DARE drop rate p"), `label` in a report ("p"; `unit` follows the value, e.g. "%"). `identity`:
    "read" (the option enters a point's identity only for the methods that read it; new options) or
    "always" (every identity has it, as TIES' k in the first stores). `more` is an extra check after the
    range (a value the range admits but the merge cannot use), raising a one-line `TatrError`.
    """

    name: str  # the config key, the API keyword and the store column
    kind: type[int] | type[float]
    default: Number
    flag: str  # the `tatr merge` flag
    help: str
    what: str
    label: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    unit: str = ""
    metavar: str = "X"
    identity: Literal["read", "always"] = "read"
    more: Callable[[Number], None] | None = None

    def __post_init__(self) -> None:
        self.check(self.default)  # a declaration cannot default to a value it refuses

    @property
    def searchable(self) -> bool:
        """Searched by sweeps (a float range or list); an integer option (a seed) is set, not searched."""
        return self.kind is float

    def range_text(self) -> str:
        if self.kind is int and self.low == 0 and self.high is None:
            return "a non-negative integer"
        lo = "-∞" if self.low is None else f"{self.low:g}"
        hi = "∞" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{'an integer' if self.kind is int else ''} in {left}{lo}, {hi}{right}".strip()

    def check(self, value: object) -> Number:
        """The value if it is one this option takes, else the one-line `TatrError` every door raises."""
        if self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = _real(value) and math.isfinite(float(value))  # type: ignore[arg-type]
        if ok:
            v = float(value)  # type: ignore[arg-type]
            ok = (self.low is None or (v > self.low if self.low_open else v >= self.low)) and (
                self.high is None or (v < self.high if self.high_open else v <= self.high)
            )
        if not ok:
            raise TatrError(f"{self.what} must be {self.range_text()}, got {value!r}")
        if self.more is not None:
            self.more(value)  # type: ignore[arg-type]
        return value  # type: ignore[return-value]

    def parse(self, text: str) -> Number:
        """A flag's text as this option's type (one line naming the flag if it is not); `check` it next."""
        try:
            return self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise TatrError(f"{self.flag} must be {what}, got {text!r}") from None

    def text(self, value: object) -> str:
        """The report's label of a value: 'p=0.5', 'k=20%'."""
        shown = f"{value:g}" if _real(value) else str(value)
        return f"{self.label}={shown}{self.unit}"


@dataclass(frozen=True)
class SparsifierKind:
    """A sparsifier and the options it reads.

    `make(values, key)` gives the per-task sparsifier of one tensor (`tatr.core.sparsify.Sparsifier`),
    or None where the merge does it elsewhere (TIES' model-wide trim, no sparsifier). `together(values)`
    checks its options jointly; `sizes(values, sizes)` checks them against the model's tensor sizes."""

    name: str
    options: tuple[Option, ...] = ()
    make: Callable[[Mapping[str, Any], str], Any] | None = None
    together: Callable[[Mapping[str, Any]], None] | None = None
    sizes: Callable[[Mapping[str, Any], Iterable[int]], None] | None = None


SPARSIFIERS: Registry[SparsifierKind] = Registry("sparsifier")


@dataclass(frozen=True)
class StatisticKind:
    """Per-task statistics a combiner reads beside the task vectors (Fisher merging's diagonal Fisher F_t,
    RegMean's Gram matrices G_t): one file per task, keyed by the parameter each tensor applies to.

    `shape(parameter shape)` is the statistic's shape for that parameter, None where the parameter takes
    none (a Gram matrix applies to a 2-D weight only); `rule` says it in words, for the one-line errors."""

    name: str  # "fisher", "gram": also the `tatr_statistics` metadata a statistics file may carry
    what: str  # "diagonal Fisher", "Gram matrix"
    shape: Callable[[tuple[int, ...]], tuple[int, ...] | None]
    rule: str


@dataclass(frozen=True)
class CombinerKind:
    """A per-key combination of the T (masked) task vectors of one tensor into its merged task vector,
    for methods that need the T tensors of a key together (TSV-M, Iso-C, Iso-CTS, Consensus), and the
    options it reads. `combine(key, taus, theta0, values)` returns M for that key (θ = θ_0 + λ·M);
    `together(values)` checks its options jointly.

    A combiner that also reads per-task statistics (Fisher, RegMean) declares them in `statistics`; it is
    then called as `combine(key, taus, theta0, values, stats, prepared)`, `stats` the T statistics of the
    key in task order (None where the files have none for it), `prepared` the value of `prepare(opened)`,
    computed once per merge over every key of the opened statistics (`tatr.core.statistics.TaskStatistics`;
    Fisher merging's per-task norms), or None without a `prepare`."""

    name: str
    combine: Callable[..., Any]
    options: tuple[Option, ...] = ()
    together: Callable[[Mapping[str, Any]], None] | None = None
    statistics: StatisticKind | None = None
    prepare: Callable[[Any], Any] | None = None


COMBINERS: Registry[CombinerKind] = Registry("combiner")


def _option_groups() -> list[SparsifierKind | CombinerKind]:
    return [*SPARSIFIERS.values(), *COMBINERS.values()]


def all_options() -> list[Option]:
    """Every declared option, in registration order (the order of columns, fields and flags):
    the sparsifiers', then the combiners'. Several sparsifiers may read one option (mergekit's density is
    read by its magnitude, random and outlier sparsifiers): it is listed once, and a name declared twice
    with two different declarations is refused."""
    seen: dict[str, Option] = {}
    for kind in _option_groups():
        for option in kind.options:
            if seen.setdefault(option.name, option) is not option:
                raise ValueError(f"merge option '{option.name}' is declared twice, differently")
    return list(seen.values())


def get_option(name: str) -> Option:
    for option in all_options():
        if option.name == name:
            return option
    raise TatrError(unknown_name("merge option", name, [o.name for o in all_options()]))


def is_option(name: object) -> bool:
    return any(o.name == name for o in all_options())


def defaults() -> dict[str, Number]:
    return {o.name: o.default for o in all_options()}


class OptionValues(dict[str, Any]):
    """Every option's value, checked (only `check_options` makes one): a merge given one does not
    check it again, so one `tatr merge` call checks each number once."""


def check_options(given: Mapping[str, object]) -> OptionValues:
    """Every option's value (the default where not given), each given one checked, then each
    sparsifier's options together: the one check behind the API, the config and the CLI.

    A value may be a tuple or list with one value per task (mergekit's per-model density): each is
    checked, the checks together run for each task, and `check_per_task` checks the method and the count."""
    if isinstance(given, OptionValues):
        return given
    values = OptionValues(defaults())
    for name, value in given.items():
        option = get_option(name)
        if isinstance(value, tuple | list):
            values[name] = tuple(option.check(v) for v in value)
        else:
            values[name] = option.check(value)
    for task in task_values(values) or [values]:
        check_together(task)
    return values


def task_values(values: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Each task's option values where some option has one value per task (a tuple), else None."""
    counts = {len(v) for v in values.values() if isinstance(v, tuple)}
    if not counts:
        return None
    if len(counts) > 1:
        per = ", ".join(f"{k} ({len(v)})" for k, v in values.items() if isinstance(v, tuple))
        raise TatrError(f"per-task option values must all have one value per task, got {per}")
    return [{k: v[t] if isinstance(v, tuple) else v for k, v in values.items()} for t in range(counts.pop())]


def check_per_task(values: Mapping[str, Any], sparsify: str, tasks: int) -> None:
    """Per-task values (one per task, in task order) only for the options of a per-tensor sparsifier the
    method reads (TIES' model-wide k and a combiner's options are one number), and exactly one per task."""
    kind = SPARSIFIERS.get(sparsify)
    for name, value in values.items():
        if not isinstance(value, tuple):
            continue
        if kind.make is None or all(o.name != name for o in kind.options):
            raise TatrError(f"option {name}: one value per task applies to a per-tensor sparsifier's options; give one")
        if len(value) != tasks:
            raise TatrError(f"option {name}: {len(value)} per-task values for {tasks} tasks; give one per task")


def check_together(values: Mapping[str, Any]) -> None:
    """Each sparsifier's and combiner's check of its options together (values already checked one by one)."""
    for kind in _option_groups():
        if kind.together is not None:
            kind.together(values)


def check_sizes(sparsify: str, values: Mapping[str, Any], sizes: Iterable[int]) -> None:
    """The sparsifier's check against the model's floating tensor sizes (from the file headers)."""
    kind = SPARSIFIERS.get(sparsify)
    if kind.sizes is not None:
        kind.sizes(values, sizes)


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
