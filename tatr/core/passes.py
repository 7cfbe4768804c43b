"""The streaming passes over the task vectors: one tensor of one task in memory at a time.

* `first_pass`: Σ_t τ_t and Ω straight into their arenas (the (q, λ)-independent part of a plan).
* `trim_thresholds`: TIES' per-task magnitude threshold over the whole model, by radix select.
* `reduce_tasks`: the non-linear reductions (TIES, DARE, Breadcrumbs, component selection) into one arena.
* `reduce_split`: the same for a sum of two parts of each τ_t (λ_neg: the negative component apart).
* `apply_step`: θ_0 + λ·M for one tensor, in θ_0's dtype.

Each pass is a loop over keys of a one-tensor step (`key_sums`, `key_reducer`), which the out-of-core
merge (`tatr.core.out_of_core`) calls too, so the two paths compute every tensor the same way.

Sparsifiers (TIES' trim by its model-wide thresholds, DARE and Breadcrumbs per tensor, inside the
`Filter`) see one tensor of one task at a time, so every pass holds O(one tensor), whatever T is.

Arenas are float64 when any merged tensor is float64 (a 1e-9 task vector must not vanish in a
float32 round trip) and float32 otherwise, so bf16/fp16/fp32 models do not double their memory;
bf16 and fp16 values convert to float32 exactly. Ω is float32 in every case: it only ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tatr.core.components import select_components, split_negative
from tatr.core.errors import TatrError
from tatr.core.exact_selection import RadixSelect
from tatr.core.methods import MergeMethod, SignedSums
from tatr.core.options import COMBINERS
from tatr.core.sparsify import Sparsifier
from tatr.core.statistics import TaskStatistics
from tatr.core.trust_region import (
    NEEDS_GRADIENTS,
    PRETRAINED,
    ConflictAccumulator,
    conflict_terms,
    mode_statistic,
    reads_signed_gradients,
    ties_keep_rank,
)
from tatr.core.vectors import (
    ParamSpace,
    TaskSet,
    all_finite,
    check_finite,
    gradient_tensor,
    pretrained_tensor,
    task_vector,
)

Filter = Callable[[int, Tensor], Tensor]  # (task, τ_t of one tensor) -> its admissible part


def arena_dtype(task_set: TaskSet) -> torch.dtype:
    """float64 if any merged tensor is float64, else float32 (see the module docstring)."""
    if any(task_set.dtypes[k] == torch.float64 for k in task_set.candidate_keys):
        return torch.float64
    return torch.float32


def first_pass(
    task_set: TaskSet, mode: str, progress: bool, keep_sum: bool = True
) -> tuple[ParamSpace, Tensor, Tensor | None]:
    """Stream θ_t key by key, accumulating Σ_t τ_t and Ω straight into their arenas.

    `keep_sum=False` (a method that re-streams the tasks: TIES, DARE, the combiners) sums each key in a
    scratch buffer only, for the checks, and returns an empty Σ τ arena: one arena less at peak.

    Each key is `key_sums` into its arena slices. A key no task changed is overwritten by the next one
    (the write cursor does not advance), so it never enters Ω or N.
    """
    ts = task_set
    dtype = arena_dtype(ts)
    capacity = sum(torch.Size(ts.shapes[k]).numel() for k in ts.candidate_keys)
    tau_arena = torch.empty(capacity if keep_sum else 0, dtype=dtype)
    omega_arena = None if mode == "off" else torch.empty(capacity)
    changed = [False] * ts.num_tasks
    kept: list[str] = []
    cursor = 0
    for key in tqdm(ts.candidate_keys, desc="task vectors", disable=None if progress else True, leave=False):
        n = torch.Size(ts.shapes[key]).numel()
        sum_out = tau_arena[cursor : cursor + n] if keep_sum else None
        omega_out = None if omega_arena is None else omega_arena[cursor : cursor + n]
        if not key_sums(ts, key, mode, dtype, changed, sum_out, omega_out).changed:
            continue  # no task changed it: copied from θ_0, its arena slot is reused
        kept.append(key)
        cursor += n
    check_changed(ts, changed)
    space = ParamSpace.build(kept, ts.shapes)
    return (
        space,
        _trim(tau_arena, cursor) if keep_sum else tau_arena,
        None if omega_arena is None else _trim(omega_arena, cursor),
    )


def check_changed(ts: TaskSet, changed: list[bool]) -> None:
    """Refuse a fine-tuned model that changes no floating-point tensor (one line naming it)."""
    for t, flag in enumerate(changed):
        if not flag:
            raise TatrError(
                f"{_describe(ts.finetuned[t])}: identical to the pretrained model in every floating-point "
                "tensor (its task vector is zero)"
            )


@dataclass(frozen=True)
class KeySums:
    """One tensor's streamed sums: θ_0 and Σ_t τ_t in the arena dtype, Ω (None for mode "off" or a key
    no task changed), and whether any task changed the key."""

    theta0: Tensor
    tau_sum: Tensor
    omega: Tensor | None
    changed: bool


def key_sums(
    ts: TaskSet,
    key: str,
    mode: str,
    dtype: torch.dtype,
    changed: list[bool],
    sum_out: Tensor | None = None,
    omega_out: Tensor | None = None,
) -> KeySums:
    """Σ_t τ_t and Ω of one tensor, validated on the way; `changed[t]` is set for each task that changes it.

    The one computation of both, so that `first_pass` (into arena slices `sum_out`, `omega_out`) and the
    out-of-core passes (`tatr.core.out_of_core`, which recompute them tensor by tensor) agree bit for bit.
    Per task this is one read and a handful of element-wise passes; values are validated on the per-tensor
    sums (`all_finite`), and a task's "did it change anything" test stops at its first changed tensor.
    """
    theta0 = pretrained_tensor(ts, key).to(dtype)
    tau_sum = torch.empty_like(theta0) if sum_out is None else sum_out.view(theta0.shape)
    out = None if omega_out is None else omega_out.view(theta0.shape)
    acc = None if mode == "off" else ConflictAccumulator(theta0.shape, out=out)
    key_changed, missing_gradient = False, None
    signed = reads_signed_gradients(mode)  # the mode's statistic: in `signed_gradients`, else `gradients` (or θ_0)
    grad_keys = ts.signed_gradient_keys if signed else ts.gradient_keys
    scratch = torch.empty_like(theta0)  # one buffer per tensor, reused by every task
    for t in range(ts.num_tasks):
        tau = task_vector(ts, t, key, theta0, out=scratch)
        if not (changed[t] and key_changed) and bool(tau.any()):
            changed[t] = key_changed = True
        if t == 0:
            tau_sum.copy_(tau)
        else:
            tau_sum += tau
        if acc is None:
            continue
        magnitude = tau.abs_().float()  # τ itself is no longer needed: |τ| in place (Ω is float32)
        grad = theta0 if mode_statistic(mode) == PRETRAINED else None
        if mode in NEEDS_GRADIENTS:
            assert grad_keys is not None
            if key not in grad_keys[t]:
                missing_gradient = t
                continue
            grad = gradient_tensor(ts, t, key, signed=signed)
        acc.add(*conflict_terms(mode, magnitude, grad))
    if not all_finite(tau_sum, acc.sum_s if acc is not None else None):
        check_finite(ts, key, gradients=mode in NEEDS_GRADIENTS)
    if key_changed and missing_gradient is not None:
        gradient_tensor(ts, missing_gradient, key, signed=signed)  # raises the one-line error
    omega = acc.omega() if acc is not None and key_changed else None  # finalised into `omega_out` if given
    return KeySums(theta0, tau_sum, omega, key_changed)


def trim_thresholds(
    ts: TaskSet,
    space: ParamSpace,
    ties_k: float,
    admissible_for: Callable[[int], Filter],
    pretrained: Callable[[str], Tensor],
    dtype: torch.dtype,
) -> list[float] | None:
    """Per task, the magnitude TIES keeps down to (`ties_keep_rank`), or None to keep everything.

    N counts every floating coordinate of the model, as the reference flattens the whole state
    dict: keys no task changed are zeros of every task vector (fed as a count, never read).
    """
    n = sum(torch.Size(ts.shapes[k]).numel() for k in ts.candidate_keys)
    rank = ties_keep_rank(ties_k, n)
    if rank is None:
        return None
    selects = [RadixSelect(rank, dtype) for _ in range(ts.num_tasks)]
    for _ in range(selects[0].passes):
        for i, key in enumerate(space.keys):
            theta0 = pretrained(key).to(dtype)
            admissible = admissible_for(i)
            for t, select in enumerate(selects):
                select.feed(admissible(t, task_vector(ts, t, key, theta0)).abs())
        for select in selects:
            select.feed_zeros(n - space.numel)
            select.advance()
    return [s.value() for s in selects]


def reduce_tasks(
    ts: TaskSet,
    space: ParamSpace,
    method: MergeMethod,
    thresholds: list[float] | None,
    admissible_for: Callable[[int], Filter],
    pretrained: Callable[[str], Tensor],
    dtype: torch.dtype,
    progress: bool = False,
    options: Mapping[str, Any] | None = None,
    statistics: TaskStatistics | None = None,
) -> Tensor:
    """Stream the tasks tensor by tensor into the merged task vector M (an arena over `space`).

    Each tensor is `key_reducer`'s step. TIES' zero-sum coordinates take the model-wide majority sign,
    known only after the last tensor: each tensor reports its sign counts and its zero-sum coordinates'
    "−" result, applied at the end.
    """
    reduced = torch.empty(space.numel, dtype=dtype)
    positive = negative = 0
    flip_idx: list[Tensor] = []
    flip_val: list[Tensor] = []
    reduce_key = key_reducer(ts, method, thresholds, options, statistics)
    for i, key in enumerate(tqdm(space.keys, desc="merge", disable=None if progress else True, leave=False)):
        part = reduce_key(key, pretrained(key).to(dtype), admissible_for(i))
        space.view(reduced, i).copy_(part.result)
        positive, negative = positive + part.signs[0], negative + part.signs[1]
        flip_idx.append(part.flip_idx + space.offsets[i])
        flip_val.append(part.flip_val)
    if elects_negative(method, positive, negative) and flip_idx:
        reduced[torch.cat(flip_idx)] = torch.cat(flip_val)
    return reduced


@dataclass(frozen=True)
class KeyReduction:
    """One tensor's merged task vector M with every zero-sum coordinate elected +, and for TIES the
    "−" alternative of those coordinates (flat indices, values) and the tensor's (#Σ>0, #Σ<0)."""

    result: Tensor
    flip_idx: Tensor
    flip_val: Tensor
    signs: tuple[int, int]


def key_reducer(
    ts: TaskSet,
    method: MergeMethod,
    thresholds: list[float] | None,
    options: Mapping[str, Any] | None = None,
    statistics: TaskStatistics | None = None,
) -> Callable[[str, Tensor, Filter], KeyReduction]:
    """(key, θ_0 in the arena dtype, its admissible filter) ↦ that tensor's `KeyReduction`: the step of
    `reduce_tasks` for one tensor, which the out-of-core merge (`tatr.core.out_of_core`) streams too.

    A method with a combiner (`MergeMethod.combine`) gets the T masked task vectors of the tensor
    together, with the merge `options` (and, for a combiner that reads them, the key's per-task
    `statistics`); the combiner's `prepare` over all statistics runs once, here."""
    kind = COMBINERS.get(method.combine) if method.combine is not None else None
    combine = None if kind is None else kind.combine
    if kind is not None and kind.statistics is not None:
        if statistics is None:
            raise TatrError(f"method '{method.name}' needs per-task {kind.statistics.what} statistics (--statistics)")
        combine = _with_statistics(kind.combine, statistics, statistics.prepared())
    none = torch.empty(0, dtype=torch.int64)

    def reduce_key(key: str, theta0: Tensor, admissible: Filter) -> KeyReduction:
        if combine is not None:  # the T masked task vectors of this tensor together (T tensors at once)
            taus = [admissible(t, task_vector(ts, t, key, theta0)) for t in range(ts.num_tasks)]
            return KeyReduction(combine(key, taus, theta0, options or {}), none, theta0.new_empty(0), (0, 0))
        sums = SignedSums(theta0.shape, theta0.dtype, method)
        for t in range(ts.num_tasks):
            tau = admissible(t, task_vector(ts, t, key, theta0))
            if thresholds is not None:
                tau = torch.where(tau.abs() >= thresholds[t], tau, torch.zeros((), dtype=tau.dtype))
            sums.add(tau)
        result, idx, alt = sums.finish(method)
        return KeyReduction(result, idx, alt, sums.sign_counts() if method.elect_sign else (0, 0))

    return reduce_key


def elects_negative(method: MergeMethod, positive: int, negative: int) -> bool:
    """Whether TIES' zero-sum coordinates take "−": the model-wide majority sign is − (or 0: the reference's
    `> 0` fails), known only once every tensor's sign counts are in."""
    return method.elect_sign and positive <= negative


def _with_statistics(
    combine: Callable[..., Tensor], statistics: TaskStatistics, prepared: Any
) -> Callable[..., Tensor]:
    def with_stats(key: str, taus: list[Tensor], theta0: Tensor, values: Mapping[str, Any]) -> Tensor:
        return combine(key, taus, theta0, values, statistics.tensors(key), prepared)

    return with_stats


Split = Callable[[int, Tensor], tuple[Tensor, Tensor]]  # (task, τ_t of one tensor) -> (rest, negative)


def task_filter(
    ts: TaskSet,
    space: ParamSpace,
    i: int,
    keep: Tensor | None,
    components: frozenset[str] | None,
    sparsify: Sparsifier | None,
) -> Filter:
    """τ_t ↦ what tensor i of τ_t contributes: masked (or the chosen components), then sparsified
    per tensor (DARE, Breadcrumbs). TIES' trim is model-wide: `reduce_tasks` applies it after."""
    admissible = _admissible(ts, space, i, keep, components)
    if sparsify is None:
        return admissible

    def sparsified(t: int, tau: Tensor) -> Tensor:
        part = admissible(t, tau)
        return sparsify(t, part)(part)

    return sparsified


def _admissible(
    ts: TaskSet, space: ParamSpace, i: int, keep: Tensor | None, components: frozenset[str] | None
) -> Filter:
    """τ_t ↦ the admissible part of τ_t for tensor i: masked, or the chosen components."""
    keep_view = None if keep is None else space.view(keep, i)
    if components is None:
        if keep_view is None:
            return lambda t, tau: tau
        return lambda t, tau: torch.where(keep_view, tau, torch.zeros((), dtype=tau.dtype))
    assert keep_view is not None
    others = _others_gradient(ts, space.keys[i])
    return lambda t, tau: select_components(tau, keep_view, others(t), components)


def _others_gradient(ts: TaskSet, key: str) -> Callable[[int], Tensor]:
    """t ↦ G₋ₜ = Σ_{s≠t} ḡ_s on one tensor (the other tasks' signed mean gradients)."""
    total = sum(gradient_tensor(ts, t, key, signed=True) for t in range(ts.num_tasks))
    return lambda t: total - gradient_tensor(ts, t, key, signed=True)


def task_split(
    ts: TaskSet, space: ParamSpace, i: int, keep: Tensor, components: frozenset[str], sparsify: Sparsifier | None
) -> Split:
    """τ_t ↦ (chosen parts but negative, negative part) of tensor i, each with the one sparsity
    pattern of their union (one DARE draw, one Breadcrumbs band), so the two add up to what
    `task_filter` gives."""
    keep_view, others = space.view(keep, i), _others_gradient(ts, space.keys[i])

    def split(t: int, tau: Tensor) -> tuple[Tensor, Tensor]:
        whole, rest, neg = split_negative(tau, keep_view, others(t), components)
        if sparsify is None:
            return rest, neg
        transform = sparsify(t, whole)
        return transform(rest), transform(neg)

    return split


def reduce_split(
    ts: TaskSet,
    space: ParamSpace,
    reduce: str,
    split_for: Callable[[int], Split],
    pretrained: Callable[[str], Tensor],
    dtype: torch.dtype,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """(Σ_t rest_t, Σ_t negative_t) as two arenas (÷T for `reduce="mean"`), in one stream.

    Only for methods without sign election (an election sees the parts together), so each part's
    reduction is the plain (scaled) sum and the two add up to the merge of their union."""
    rest = torch.empty(space.numel, dtype=dtype)
    neg = torch.empty(space.numel, dtype=dtype)
    for i, key in enumerate(tqdm(space.keys, desc="merge", disable=None if progress else True, leave=False)):
        theta0 = pretrained(key).to(dtype)
        split = split_for(i)
        r, n = space.view(rest, i), space.view(neg, i)
        r.zero_()
        n.zero_()
        for t in range(ts.num_tasks):
            a, b = split(t, task_vector(ts, t, key, theta0))
            r += a
            n += b
        if reduce == "mean":
            r /= ts.num_tasks
            n /= ts.num_tasks
    return rest, neg


def apply_step(key: str, theta0: Tensor, step: Tensor, what: str) -> Tensor:
    """θ_0 + step for one tensor (step = λ·M, …), in θ_0's dtype, θ_0's bits wherever the step is 0.

    Element-wise, so a subset of a tensor's coordinates gets the bits the whole tensor would (the
    out-of-core merge patches TIES' zero-sum coordinates that way)."""
    moved = step != 0
    result = torch.where(moved, (theta0.to(step.dtype) + step).to(theta0.dtype), theta0)
    if not bool(torch.isfinite(result.sum())) and not bool(torch.isfinite(result).all()):
        raise TatrError(f"key '{key}': {what} overflows {theta0.dtype} (the merged values are infinite)")
    return result


def _trim(arena: Tensor, size: int) -> Tensor:
    """The used part of an arena; copied only when unchanged keys left much of it unused."""
    return arena if size == arena.numel() else (arena[:size].clone() if size < arena.numel() // 2 else arena[:size])


def _describe(source: object) -> str:
    from tatr.core.checkpoints import describe

    return describe(source)  # type: ignore[arg-type]
