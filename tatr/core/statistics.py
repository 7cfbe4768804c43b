"""Per-task statistics for the combiners that read them (Fisher's F_t, RegMean's G_t): opened and
checked against the model from the file headers, then read one key at a time.

Why a module of its own: a statistics file is a user's file like a checkpoint, and every way it can be
wrong (the count, a file twice, another kind of statistics, keys or shapes that do not fit the model,
NaN) is one line naming the file and the key, before any merging starts; the merge passes
(`tatr.core.passes`) only ask for a key's T tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tatr.core.checkpoints import Source, as_source, header, read_tensor, source_error
from tatr.core.errors import TatrError
from tatr.core.options import CombinerKind
from tatr.core.outputs import same_file
from tatr.core.vectors import FLOATING, TaskSet


@dataclass(eq=False)
class TaskStatistics:
    """A combiner's per-task statistics (Fisher's F_t, RegMean's G_t), opened and checked against the
    model by `open_statistics`; read one key at a time, checked finite."""

    combiner: CombinerKind
    sources: tuple[Source, ...]
    keys: tuple[str, ...]  # in the first file's order
    _prepared: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._key_set = frozenset(self.keys)

    def read(self, t: int, key: str) -> Tensor:
        value = read_tensor(self.sources[t], key)
        if not bool(torch.isfinite(value).all()):
            raise source_error(self.sources[t], key, "contains NaN or infinite values")
        return value

    def tensors(self, key: str) -> list[Tensor] | None:
        """The T statistics of `key` in task order, or None where the files have none for it."""
        return [self.read(t, key) for t in range(len(self.sources))] if key in self._key_set else None

    def prepared(self) -> Any:
        """The combiner's `prepare` over every key (once per opened statistics), or None."""
        if not self._prepared:
            self._prepared.append(None if self.combiner.prepare is None else self.combiner.prepare(self))
        return self._prepared[0]


def open_statistics(sources: Sequence[Source | str | Path], ts: TaskSet, combiner: CombinerKind) -> TaskStatistics:
    """One statistics file (or mapping) per task, checked from headers: the count, no file twice, not
    empty, the kind its `tatr_statistics` metadata names (if any), the same keys in every file, each a
    floating key of the fine-tuned files of the shape the combiner's `StatisticKind` gives. Each failure
    is one line naming the file and the key."""
    kind = combiner.statistics
    assert kind is not None
    if len(sources) != ts.num_tasks:
        raise TatrError(f"{len(sources)} statistics files for {ts.num_tasks} fine-tuned models: give one per task")
    paths = [(i, Path(s)) for i, s in enumerate(sources) if not isinstance(s, Mapping)]
    for n, (i, a) in enumerate(paths):
        for j, b in paths[n + 1 :]:
            if same_file(a, b):
                raise TatrError(f"{b}: given twice as --statistics (positions {i + 1} and {j + 1}); give each once")
    opened = tuple(s if isinstance(s, Mapping) else as_source(s) for s in sources)
    first: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    candidates = set(ts.candidate_keys)
    for src in opened:
        h = header(src)
        if not h:
            raise source_error(src, None, "the statistics file is empty (it holds no tensors)")
        _check_statistics_kind(src, kind.name, kind.what)
        first = first or h
        differ = sorted(set(first) ^ set(h))
        if differ:
            where = "not" if differ[0] in h else "missing"
            raise source_error(src, differ[0], f"{where} in task 1's statistics: every task's keys must match")
        for key, (shape, dtype) in h.items():
            if key not in candidates:
                raise source_error(
                    src, key, "not a floating-point key of the fine-tuned files (statistics keys must be)"
                )
            want = kind.shape(tuple(ts.shapes[key]))
            if want is None or tuple(shape) != want:
                got = "it takes none" if want is None else f"not {list(shape)}"
                raise source_error(
                    src, key, f"a {kind.what} is {kind.rule}: the parameter is {list(ts.shapes[key])}, {got}"
                )
            if dtype not in FLOATING:
                raise source_error(src, key, f"statistics must be floating point, got {dtype}")
    return TaskStatistics(combiner, opened, tuple(first))


def _check_statistics_kind(src: Source, name: str, what: str) -> None:
    """Refuse a file whose metadata names another kind of statistics (Gram matrices given to Fisher)."""
    if not isinstance(src, Path) or src.suffix != ".safetensors":
        return
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as fh:
        held = (fh.metadata() or {}).get("tatr_statistics")
    if held is not None and held != name:
        raise source_error(src, None, f"holds '{held}' statistics, but this method reads {what} ('{name}') ones")
