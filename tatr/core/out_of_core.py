"""The exact trust region out of core: no array over the N merged coordinates, so a 7B merge fits 24 GB.

The in-memory merge (`tatr.core.merging.MergePlan`) keeps arenas over all N coordinates: Ω in float32,
Σ τ (or the merged M) in the arena dtype, an N-byte keep mask for the re-streaming methods, then the
whole merged state dict before it is written: 6–10 bytes per parameter. Here each pass streams the
tensors in canonical order (keys sorted by name, row-major) and recomputes what it needs per tensor with
the in-memory path's own per-tensor steps (`tatr.core.passes.key_sums`, `key_reducer`, `apply_step`),
so the result is the same bits:

1. **Scan**: Σ τ and Ω per tensor, validated as in memory; Ω's high 15 bits go into the radix select's
   first histogram (`tatr.core.exact_selection.RadixSelect`), and each tensor's Ω range (min, max) is kept.
   N, hence k = ⌈(1−q)N⌉, is known at its end.
2. **Boundary**: Ω is recomputed for the tensors whose range meets the one bin holding the k-th largest,
   for the low 16 bits' histogram. Now the cut is known: every Ω above the k-th largest value v is
   dropped, and of the coordinates equal to v the first `tied_rank` in canonical order.
3. **Merge**: each tensor's keep mask comes from the cut (`cut_drops`), recomputing Ω only where its range
   contains v (a tensor entirely above v is dropped, one below kept); the ties are handed out in canonical
   order. The tensor is merged (TA: the masked Σ τ; TIES, DARE, Breadcrumbs, the combiners and component
   selections: the same per-tensor reduction as in memory, TIES' trim first by its own two-pass model-wide
   select, each pass recomputing the masks) and handed to a sink: a safetensors file written tensor by
   tensor (`tatr.core.streamed_safetensors`), or a dict. TIES' zero-sum coordinates, whose sign is the
   model-wide majority known only at the end, are patched in place before the file is committed.

Cost model. Memory: a few tensors of the largest key in float32 (θ_0, Σ τ, one τ, Ω's three running sums,
a gradient, the output), T of them for a combiner, and the two histograms (0.75 MiB); nothing scales
with N. Time: one read of the inputs per pass, each Ω recomputation adding T element-wise products (and
in exemplar mode T gradient reads): 3 for TA + TR (the boundary pass reads only the tensors whose Ω
range meets the boundary bin, the merge pass recomputes Ω only where a tensor straddles the cut); up to
8 for TIES + TR (scan and boundary, then its trim's two passes and the merge, each reading τ once more
for a straddling tensor's mask); 1 for TA without a trust region. In memory: 1 for TA, 4 for TIES + TR.
Recomputing was chosen over a memory-mapped Ω: that spill would need N·4 bytes of scratch disk (28 GB at
7B) written once and read back in every later pass, and it saves only the Ω products, not the reads of
the inputs the merge needs anyway; `benchmarks/bench_low_memory.py` measures a recomputation pass against
the spill's write and read, and both paths' time and peak memory.

What cannot run here: λ_neg's two-part merge (`--lam-neg`) and a `MergePlan` reused across (q, λ) trials
(sweeps): they keep arenas by design. Forced (`low_memory=True`) they are refused in one line; chosen
automatically, they stay in memory with a note (`tatr.core.memory_budget.choose_out_of_core`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tatr.core.exact_selection import RadixSelect, cut_drops
from tatr.core.methods import MergeMethod
from tatr.core.passes import (
    Filter,
    apply_step,
    arena_dtype,
    check_changed,
    elects_negative,
    key_reducer,
    key_sums,
    task_filter,
    trim_thresholds,
)
from tatr.core.sparsify import sparsifier
from tatr.core.statistics import TaskStatistics
from tatr.core.streamed_safetensors import streamed_safetensors
from tatr.core.trust_region import drop_count
from tatr.core.vectors import ParamSpace, TaskSet, pretrained_tensor


class Sink(Protocol):
    """Where merged tensors go, one at a time (`put`), with some coordinates rewritten later (`patch`)."""

    def put(self, key: str, tensor: Tensor) -> None: ...

    def patch(self, key: str, flat_index: Tensor, values: Tensor) -> None: ...


@dataclass
class DictSink:
    """Merged tensors gathered into a dict (the API's return value: the output, without the arenas)."""

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def put(self, key: str, tensor: Tensor) -> None:
        self.tensors[key] = tensor

    def patch(self, key: str, flat_index: Tensor, values: Tensor) -> None:
        self.tensors[key].view(-1)[flat_index] = values


@dataclass(frozen=True)
class StreamedMerge:
    """What an out-of-core merge reports: the same questions `tatr merge` asks a `MergePlan`, answered
    for the one q it ran at."""

    task_set: TaskSet
    space: ParamSpace
    dropped: int
    per_key: dict[str, tuple[int, int]]  # key -> (dropped, numel)

    @property
    def num_coordinates(self) -> int:
        return self.space.numel

    def drop_count(self, q: float) -> int:
        return self.dropped

    def mask_stats(self, q: float) -> dict[str, tuple[int, int]]:
        return self.per_key


# --- the cut: passes 1 and 2 -----------------------------------------------------------------------
@dataclass(frozen=True)
class Cut:
    """Where the exact selection cuts: drop every Ω above `value` and the first `ties` equal to it."""

    value: float
    bits: int  # `value`'s float32 bit pattern: non-negative floats order like their bits
    ties: int


@dataclass(frozen=True)
class Scan:
    """Pass 1's result: the merged coordinates, each tensor's Ω range as bit patterns, the cut."""

    space: ParamSpace
    ranges: tuple[tuple[int, int], ...]
    cut: Cut | None  # None: nothing is dropped (mode "off", or k = 0)


def scan(ts: TaskSet, mode: str, q: float, dtype: torch.dtype, progress: bool) -> Scan:
    """Passes 1 and 2 (see the module docstring): validation, N, and the exact cut for k = ⌈(1−q)N⌉."""
    changed = [False] * ts.num_tasks
    kept: list[str] = []
    ranges: list[tuple[int, int]] = []
    select = None if mode == "off" else RadixSelect(1, torch.float32)  # k is set once N is known
    for key in _bar(ts.candidate_keys, "check" if select is None else "trust region 1/2", progress):
        sums = key_sums(ts, key, mode, dtype, changed)
        if not sums.changed:
            continue
        kept.append(key)
        if select is not None and sums.omega is not None:
            bits = sums.omega.view(torch.int32)
            ranges.append((int(bits.min()), int(bits.max())))
            select.feed(sums.omega)
    check_changed(ts, changed)
    space = ParamSpace.build(kept, ts.shapes)
    k = 0 if select is None else drop_count(q, space.numel)
    if select is None or k == 0:
        return Scan(space, tuple(ranges), None)
    select.k = k
    select.advance()
    low, high = select.prefix_range()
    for i, key in enumerate(_bar(space.keys, "trust region 2/2", progress)):
        if ranges[i][1] >= low and ranges[i][0] <= high:  # Ω meets the boundary bin
            select.feed(_omega(ts, key, mode, dtype))
    select.advance()
    value = select.value()
    return Scan(space, tuple(ranges), Cut(value, _bits(value), select.tied_rank()))


def _omega(ts: TaskSet, key: str, mode: str, dtype: torch.dtype) -> Tensor:
    omega = key_sums(ts, key, mode, dtype, [True] * ts.num_tasks).omega
    assert omega is not None
    return omega


class KeepMasks:
    """Each merged tensor's keep mask under the cut, recomputed on demand; ties handed out in canonical order.

    A tensor's share of the tied coordinates is fixed the first time it is asked for, in key order
    (every pass walks the keys in order; a jump ahead fills in the tensors before it)."""

    def __init__(self, ts: TaskSet, found: Scan, mode: str, dtype: torch.dtype) -> None:
        self.ts, self.found, self.mode, self.dtype = ts, found, mode, dtype
        self.ties: list[int] = []  # ties allotted to tensors 0, 1, …
        self.left = 0 if found.cut is None else found.cut.ties
        self.dropped: dict[int, int] = {}

    def needs_omega(self, i: int) -> bool:
        """Whether tensor i's mask needs its Ω: its range contains the cut value."""
        cut = self.found.cut
        return cut is not None and self.found.ranges[i][0] <= cut.bits <= self.found.ranges[i][1]

    def keep(self, i: int, omega: Tensor | None = None) -> Tensor | None:
        """Tensor i's keep mask (True = kept), or None when it keeps everything; `omega`: its Ω if at hand."""
        cut, shape = self.found.cut, self.found.space.shapes[i]
        if cut is None:
            return None
        self._allot_before(i)
        if not self.needs_omega(i):
            above = self.found.ranges[i][0] > cut.bits
            self._record(i, 0, _numel(shape) if above else 0)
            return torch.zeros(shape, dtype=torch.bool) if above else None
        if omega is None:
            omega = _omega(self.ts, self.found.space.keys[i], self.mode, self.dtype)
        known = i < len(self.ties)  # fixed by an earlier pass; else its share of the ties left, in key order
        ties = self.ties[i] if known else min(self.left, int((omega == cut.value).sum()))
        drop, used = cut_drops(omega, cut.value, ties)
        dropped = int(drop.sum())
        self._record(i, used, dropped)
        return None if dropped == 0 else ~drop

    def _allot_before(self, i: int) -> None:
        for j in range(len(self.ties), i):
            self.keep(j)

    def _record(self, i: int, ties: int, dropped: int) -> None:
        if i == len(self.ties):
            self.ties.append(ties)
            self.left -= ties
        self.dropped[i] = dropped

    def summary(self) -> tuple[int, dict[str, tuple[int, int]]]:
        space = self.found.space
        per_key = {k: (self.dropped.get(i, 0), _numel(space.shapes[i])) for i, k in enumerate(space.keys)}
        return sum(d for d, _ in per_key.values()), per_key


# --- the merge: pass 3 -----------------------------------------------------------------------------
def merge_streamed(
    ts: TaskSet,
    method: MergeMethod,
    mode: str,
    q: float,
    lam: float,
    options: Mapping[str, Any],
    components: frozenset[str] | None,
    statistics: TaskStatistics | None,
    progress: bool,
    *,
    out: str | Path | Sink | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[dict[str, Tensor] | None, StreamedMerge]:
    """`merge_out_of_core` into a safetensors file `out` (streamed, committed whole or not at all), into a
    caller's `Sink` (e.g. a model folder's shards; the caller commits it), or into a dict in θ_0's key order
    when `out` is None (returned; None for a file or a sink)."""
    kw = {"options": options, "components": components, "statistics": statistics, "progress": progress}
    if out is None:
        sink = DictSink()
        summary = merge_out_of_core(ts, method, mode, q, lam, sink, **kw)
        return {key: sink.tensors[key] for key in ts.output_keys}, summary
    if not isinstance(out, str | Path):
        return None, merge_out_of_core(ts, method, mode, q, lam, out, **kw)
    with streamed_safetensors(out, layout(ts), metadata) as stream:
        summary = merge_out_of_core(ts, method, mode, q, lam, stream, **kw)
    return None, summary


def merge_out_of_core(
    ts: TaskSet,
    method: MergeMethod,
    mode: str,
    q: float,
    lam: float,
    sink: Sink,
    *,
    options: Mapping[str, Any],
    components: frozenset[str] | None = None,
    statistics: TaskStatistics | None = None,
    progress: bool = False,
) -> StreamedMerge:
    """θ_0 + λ·M(q) into `sink`, every key of θ_0, the same bits as `MergePlan.merged(q, λ)`."""
    dtype = arena_dtype(ts)
    linear = method.linear and components is None
    if linear and mode == "off":
        return _plain_sum(ts, method, lam, sink, dtype, progress)
    found = scan(ts, mode, q, dtype, progress)
    masks = KeepMasks(ts, found, mode, dtype)
    space = found.space
    if linear:
        alpha = lam * (1.0 / ts.num_tasks if method.reduce == "mean" else 1.0)
        for i, key in enumerate(_bar(space.keys, "merge", progress)):
            omega_needed = masks.needs_omega(i)
            sums = key_sums(ts, key, mode if omega_needed else "off", dtype, [True] * ts.num_tasks)
            keep = masks.keep(i, sums.omega if omega_needed else None)
            masked = sums.tau_sum if keep is None else sums.tau_sum.masked_fill_(~keep, 0)
            sink.put(key, apply_step(key, pretrained_tensor(ts, key), masked * alpha, f"λ={alpha:g}"))
    else:
        _reduce_streamed(ts, method, masks, lam, sink, dtype, options, components, statistics, progress)
    _copy_unmerged(ts, space, sink)
    dropped, per_key = masks.summary()
    return StreamedMerge(ts, space, dropped, per_key)


def _reduce_streamed(
    ts: TaskSet,
    method: MergeMethod,
    masks: KeepMasks,
    lam: float,
    sink: Sink,
    dtype: torch.dtype,
    options: Mapping[str, Any],
    components: frozenset[str] | None,
    statistics: TaskStatistics | None,
    progress: bool,
) -> None:
    """The re-streaming methods, tensor by tensor: TIES' trim thresholds first (two model-wide passes),
    then each tensor's reduction, with TIES' zero-sum coordinates patched once the majority sign is known."""
    space = masks.found.space

    def admissible_for(i: int) -> Filter:
        key = space.keys[i]
        keep = masks.keep(i)
        if keep is None and components is not None:
            keep = torch.ones(space.shapes[i], dtype=torch.bool)  # the components need a mask
        one = ParamSpace.build([key], ts.shapes)
        flat = None if keep is None else keep.reshape(-1)
        return task_filter(ts, one, 0, flat, components, sparsifier(method.sparsify, options, key))

    def pretrained(key: str) -> Tensor:
        return pretrained_tensor(ts, key)

    ties_k = float(options["ties_k"])
    thresholds = trim_thresholds(ts, space, ties_k, admissible_for, pretrained, dtype) if method.trim else None
    reduce_key = key_reducer(ts, method, thresholds, options, statistics)
    positive = negative = 0
    flips: list[tuple[str, Tensor, Tensor]] = []
    what = f"λ={lam:g}"
    for i, key in enumerate(_bar(space.keys, "merge", progress)):
        theta0 = pretrained(key)
        part = reduce_key(key, theta0.to(dtype), admissible_for(i))
        step = part.result.to(dtype).reshape(theta0.shape) * lam
        sink.put(key, apply_step(key, theta0, step, what))
        positive, negative = positive + part.signs[0], negative + part.signs[1]
        if part.flip_idx.numel():
            flips.append((key, part.flip_idx, part.flip_val.to(dtype)))
    if elects_negative(method, positive, negative):
        for key, idx, alt in flips:
            theta0 = pretrained(key).reshape(-1)[idx]
            sink.patch(key, idx, apply_step(key, theta0, alt * lam, what))


def _plain_sum(
    ts: TaskSet, method: MergeMethod, lam: float, sink: Sink, dtype: torch.dtype, progress: bool
) -> StreamedMerge:
    """TA or averaging without a trust region: one pass, each tensor merged as soon as it is summed."""
    alpha = lam * (1.0 / ts.num_tasks if method.reduce == "mean" else 1.0)
    changed = [False] * ts.num_tasks
    kept = []
    for key in _bar(ts.candidate_keys, "merge", progress):
        sums = key_sums(ts, key, "off", dtype, changed)
        if sums.changed:
            kept.append(key)
            sink.put(key, apply_step(key, pretrained_tensor(ts, key), sums.tau_sum * alpha, f"λ={alpha:g}"))
    check_changed(ts, changed)  # before the sink commits anything
    space = ParamSpace.build(kept, ts.shapes)
    _copy_unmerged(ts, space, sink)
    return StreamedMerge(ts, space, 0, {k: (0, _numel(ts.shapes[k])) for k in kept})


def _copy_unmerged(ts: TaskSet, space: ParamSpace, sink: Sink) -> None:
    """Every key of θ_0 no task changed (buffers, frozen tensors): θ_0's tensor, a copy for an in-memory θ_0."""
    merged = set(space.keys)
    for key in ts.output_keys:
        if key not in merged:
            theta0 = pretrained_tensor(ts, key)
            sink.put(key, theta0.clone() if isinstance(ts.pretrained, Mapping) else theta0)


def layout(ts: TaskSet) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The merged file's keys, shapes and dtypes: θ_0's (the merge keeps every key in its dtype)."""
    return {k: (tuple(ts.shapes[k]), ts.dtypes[k]) for k in ts.output_keys}


def _bar(items: Any, desc: str, progress: bool) -> Any:
    return tqdm(items, desc=desc, disable=None if progress else True, leave=False)


def _bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


def _numel(shape: tuple[int, ...] | Any) -> int:
    return math.prod(int(s) for s in shape)
