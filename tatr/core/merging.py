"""Streaming TATR merges: one pass over the tasks, tensor by tensor, then cheap trials.

`plan_merge` does everything that does not depend on (q, λ): it streams the T task vectors once,
key by key, keeping only running sums — Σ_t τ_t and Ω as arenas over the merged coordinates
(`tatr.core.passes`: float64 when the model has float64 tensors, else float32) — and never T task
vectors. `MergePlan.merged(q, λ)` then costs, for the linear
methods (TA, averaging), one multiply-add plus O(|Δk|) writes to move the mask from the last q:
    θ(q, λ) = θ_0 + λ·c·(m_q ⊙ Σ_t τ_t),  c = 1 (sum) or 1/T (mean).
Non-linear configurations (TIES, DARE, Breadcrumbs, component selection) need the per-task
vectors after masking, so they stream the tasks again for each new q (and reuse that result across
λ). With a λ_neg (`merged(q, λ, λ_neg)`) the component merge is kept as two arenas, the negative
part and the rest, θ(q, λ, λ_neg) = θ_0 + λ·M_rest(q) + λ_neg·M_neg(q): one stream per q, then a
multiply-add per (λ, λ_neg) trial.

Every result is computed from θ_0 afresh: trying λ₁ then λ₂ gives θ_0 + λ₂·M, never
θ_0 + (λ₁+λ₂)·M.

A one-shot merge (`tatr.core.one_shot`: `merge`, `merge_once`, `tatr merge`) whose arenas would not fit in
memory runs out of core instead (`tatr.core.out_of_core`: the same bits); a plan, which keeps its arenas for many
(q, λ) trials, always runs in memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from tatr.core.components import check_components
from tatr.core.errors import TatrError
from tatr.core.exact_selection import drop_order
from tatr.core.merge_inputs import check_lam_neg_method, check_numbers
from tatr.core.methods import MergeMethod, fixed_method
from tatr.core.options import COMBINERS, OptionValues, check_options
from tatr.core.passes import (
    Filter,
    Split,
    apply_step,
    arena_dtype,
    first_pass,
    reduce_split,
    reduce_tasks,
    task_filter,
    task_split,
    trim_thresholds,
)
from tatr.core.sparsify import Sparsifier, Sparsity, sparsifier
from tatr.core.statistics import TaskStatistics, open_statistics
from tatr.core.trust_region import check_mode, drop_count, missing_statistic
from tatr.core.vectors import ParamSpace, TaskSet, open_task_set, pretrained_tensor

StateInput = str | Path | Mapping[str, Tensor]


class MergePlan:
    """The (q, λ)-independent part of a merge, computed once; see the module docstring."""

    def __init__(
        self,
        task_set: TaskSet,
        method: MergeMethod,
        trust_region: str,
        ties_k: float | None = None,
        components: frozenset[str] | None = None,
        cache_pretrained: bool = False,
        progress: bool = False,
        sparsity: Sparsity | Mapping[str, object] | None = None,
        *,
        statistics: TaskStatistics | Sequence[StateInput] | None = None,
        _arenas: tuple[ParamSpace, Tensor, Tensor | None, Tensor] | None = None,
    ) -> None:
        """`ties_k` and `sparsity` (any mapping of option values, `tatr.core.options`) give the options the
        method reads; values `plan_merge` checked are not checked again. `statistics`: one file or mapping
        per task (or opened) for a method whose combiner reads them (Fisher, RegMean; `open_statistics`).
        `_arenas`: a saved plan's (`load`)."""
        self.task_set = task_set
        self.method = method
        self.statistics = plan_statistics(method, task_set, statistics)
        self.mode = trust_region
        self.options = _option_values(ties_k, sparsity)  # every option; the method reads its own
        self.ties_k = float(self.options["ties_k"])
        self.components = components
        self.progress = progress
        self._theta0: dict[str, Tensor] | None = {} if cache_pretrained else None
        self.dtype = arena_dtype(task_set)  # of every arena: float64 if a merged tensor is, else float32
        if _arenas is None:
            # Σ τ is read only by a linear method's masked sum; the others re-stream the tasks
            keep_sum = method.linear and components is None
            self.space, self.tau_sum, self.omega = first_pass(task_set, trust_region, progress, keep_sum)
            self._order = torch.empty(0, dtype=torch.int64)  # coordinates ranked by Ω, highest first
        else:
            self.space, self.tau_sum, self.omega, self._order = _arenas
        self._masked: Tensor | None = None  # Σ τ with the first `_k` ranked coordinates zeroed
        self._k = 0
        self._consume_sum = False
        self._reduced: tuple[float, Tensor] | None = None
        self._split: tuple[float, tuple[Tensor, Tensor]] | None = None  # (q, (M_rest, M_neg)) for λ_neg

    # --- the mask ------------------------------------------------------------------------------
    @property
    def num_coordinates(self) -> int:
        return self.space.numel

    def drop_count(self, q: float) -> int:
        return 0 if self.mode == "off" else drop_count(q, self.space.numel)

    def prepare(self, qs: Sequence[float], release_scores: bool = False) -> None:
        """Rank enough coordinates for every q in `qs`.

        `release_scores=True` declares that only these q will be asked for: Ω is freed and Σ τ is
        masked in place instead of in a copy, so a one-shot merge holds two arenas, not four.
        """
        k = max((self.drop_count(q) for q in qs), default=0)
        if k > self._order.numel():
            if self.omega is None:
                raise RuntimeError("conflict scores were released; prepare all q values up front")
            self._order = drop_order(self.omega, k)
        if release_scores:
            self.omega = None
            self._consume_sum = True

    def drop_indices(self, q: float) -> Tensor:
        """Global indices of the ⌈(1−q)N⌉ dropped coordinates, highest conflict first."""
        k = self.drop_count(q)
        self.prepare([q])
        return self._order[:k]

    def keep_mask(self, q: float) -> Tensor:
        """Boolean arena over the merged coordinates: True where the trust region keeps τ."""
        keep = torch.ones(self.space.numel, dtype=torch.bool)
        keep[self.drop_indices(q)] = False
        return keep

    def mask_stats(self, q: float) -> dict[str, tuple[int, int]]:
        """key → (dropped, numel): where the trust region cuts, per tensor."""
        counts = torch.bincount(self.space.key_of(self.drop_indices(q)), minlength=len(self.space.keys))
        return {
            key: (int(counts[i]), int(torch.Size(self.space.shapes[i]).numel()))
            for i, key in enumerate(self.space.keys)
        }

    def masked_sum(self, q: float) -> Tensor:
        """m_q ⊙ Σ_t τ_t as an arena (shared: do not modify).

        The drop order is a ranking, so moving from k₀ to k dropped coordinates zeroes order[k₀:k]
        or restores order[k:k₀] from Σ τ: O(|k − k₀|) writes per trial, no sort and no full mask.
        """
        if self.tau_sum.numel() != self.space.numel:
            raise RuntimeError(f"this plan did not keep Σ τ ({self.method.name} re-streams the tasks)")
        k = self.drop_count(q)
        if k == 0 and self._masked is None:
            return self.tau_sum
        self.prepare([q])
        if self._masked is None:
            self._masked = self.tau_sum if self._consume_sum else self.tau_sum.clone()
        if k > self._k:
            self._masked[self._order[self._k : k]] = 0
        elif k < self._k:
            if self._consume_sum:
                raise RuntimeError("this plan was prepared for fewer dropped coordinates (release_scores=True)")
            idx = self._order[k : self._k]
            self._masked[idx] = self.tau_sum[idx]
        self._k = k
        return self._masked

    # --- merging -------------------------------------------------------------------------------
    def merged(
        self,
        q: float = 0.99,
        lam: float | None = None,
        lam_neg: float | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> dict[str, Tensor]:
        """θ_0 + λ·M(q) as a full state dict: every key of θ_0, each in its own dtype (every floating one in
        `out_dtype` if given, mergekit's out_dtype: a merged tensor rounded once, from the arena's precision).

        For TA/averaging this is one multiply-add per tensor on the masked sum. A coordinate the
        merge does not move (dropped, never changed, Σ exactly 0, or λ = 0) keeps θ_0's bits,
        −0.0 included; a moved one is rounded once, from the arena's precision to its dtype.
        `lam_neg` (components with negative and another part, a method without sign election):
        θ_0 + λ·M(rest) + λ_neg·M(negative); None scales every part by λ.
        """
        check_numbers(q=q, lam=lam, lam_neg=lam_neg)
        lam = self.method.default_lam if lam is None else float(lam)
        ts, space = self.task_set, self.space
        if lam_neg is not None:
            self.check_lam_neg()
            rest, neg = self.split_task_vectors(q)
            lam_n = float(lam_neg)

            def step(i: int) -> Tensor:
                return space.view(rest, i) * lam + space.view(neg, i) * lam_n

            what = f"λ={lam:g}, λ_neg={lam_n:g}"
        else:
            if self.method.linear and self.components is None:
                scale = 1.0 / ts.num_tasks if self.method.reduce == "mean" else 1.0
                reduced, alpha = self.masked_sum(q), lam * scale
            else:
                reduced, alpha = self.merged_task_vector(q), lam

            def step(i: int) -> Tensor:
                return space.view(reduced, i) * alpha

            what = f"λ={alpha:g}"
        out: dict[str, Tensor] = {}
        position = {k: i for i, k in enumerate(space.keys)}
        for key in ts.output_keys:
            theta0 = self._pretrained(key)
            i = position.get(key)
            if i is None:
                out[key] = theta0.clone() if isinstance(ts.pretrained, Mapping) else theta0
                out[key] = out[key].to(out_dtype) if out_dtype is not None and theta0.is_floating_point() else out[key]
                continue
            if out_dtype is None:
                out[key] = apply_step(key, theta0, step(i), what)
            else:
                out[key] = _rounded(key, apply_step(key, theta0.to(self.dtype), step(i), what), out_dtype, what)
        return out

    def check_lam_neg(self) -> None:
        """Refuse λ_neg for a plan it cannot apply to (one line): see `check_lam_neg_method`; a combiner
        (TSV-M, Fisher, …) merges the parts together, so it cannot scale one apart either."""
        check_lam_neg_method(self.method, self.components)
        if self.method.combine is not None:
            raise TatrError(f"lam_neg needs a method that sums the parts; {self.method.name} combines them together")

    def split_task_vectors(self, q: float) -> tuple[Tensor, Tensor]:
        """(M_rest(q), M_neg(q)): the merge of the chosen components other than negative, and of the
        negative one, as two arenas (cached for the last q); they add up to `merged_task_vector(q)`."""
        self.check_lam_neg()
        if self._split is not None and self._split[0] == q:
            return self._split[1]
        keep = self.keep_mask(q)

        def split_for(i: int) -> Split:
            return self._task_split(i, keep)

        parts = reduce_split(
            self.task_set,
            self.space,
            self.method.reduce,
            split_for,
            self._pretrained,
            self.dtype,
            self.progress,
        )
        self._split = (q, parts)
        return parts

    def merged_task_vector(self, q: float) -> Tensor:
        """M(q) as an arena over the merged coordinates (cached for the last q)."""
        if self.method.linear and self.components is None:
            scale = 1.0 / self.task_set.num_tasks if self.method.reduce == "mean" else 1.0
            return self.masked_sum(q) * scale
        if self._reduced is not None and self._reduced[0] == q:
            return self._reduced[1]
        reduced = self._stream_reduce(q)
        self._reduced = (q, reduced)
        return reduced

    # --- persistence (sweep workers share one plan through a content-addressed cache) -----------
    def save(self, folder: str | Path) -> None:
        """Write the arenas (Σ τ, Ω, the ranked drop order) and the coordinate layout to `folder`."""
        from safetensors.torch import save_file

        from tatr.core.outputs import writing

        folder = Path(folder)
        arrays = {"tau_sum": self.tau_sum, "order": self._order}
        if self.omega is not None:
            arrays["omega"] = self.omega
        with writing(folder / "plan.safetensors"):  # a full disk is one line, whichever library wrote
            save_file(arrays, str(folder / "plan.safetensors"))
        layout = {"keys": list(self.space.keys), "mode": self.mode, "method": self.method.name}
        with writing(folder / "plan.json"):
            (folder / "plan.json").write_text(json.dumps(layout))

    @classmethod
    def load(
        cls,
        folder: str | Path,
        task_set: TaskSet,
        method: MergeMethod,
        trust_region: str,
        ties_k: float | None = None,
        components: frozenset[str] | None = None,
        cache_pretrained: bool = False,
        progress: bool = False,
        sparsity: Sparsity | Mapping[str, object] | None = None,
        *,
        statistics: TaskStatistics | Sequence[StateInput] | None = None,
    ) -> MergePlan:
        """Rebuild a plan saved by `save` for the same inputs, skipping the streaming pass."""
        from safetensors.torch import load_file

        folder = Path(folder)
        layout = json.loads((folder / "plan.json").read_text())
        if layout["mode"] != trust_region:
            raise ValueError(f"saved plan is for mode {layout['mode']}, not {trust_region}")
        arrays = load_file(str(folder / "plan.safetensors"))
        if arrays["tau_sum"].dtype != arena_dtype(task_set):
            raise ValueError(f"saved plan is in {arrays['tau_sum'].dtype}, not {arena_dtype(task_set)}")
        space = ParamSpace.build(layout["keys"], task_set.shapes)
        arenas = (space, arrays["tau_sum"], arrays.get("omega"), arrays["order"])
        args = (task_set, method, trust_region, ties_k, components, cache_pretrained, progress, sparsity)
        return cls(*args, statistics=statistics, _arenas=arenas)

    # --- internals -----------------------------------------------------------------------------
    def _pretrained(self, key: str) -> Tensor:
        if self._theta0 is None:
            return pretrained_tensor(self.task_set, key)
        if key not in self._theta0:
            self._theta0[key] = pretrained_tensor(self.task_set, key)
        return self._theta0[key]

    def _task_filter(self, i: int, keep: Tensor | None) -> Filter:
        return task_filter(self.task_set, self.space, i, keep, self.components, self._sparsifier(i))

    def _task_split(self, i: int, keep: Tensor) -> Split:
        assert self.components is not None
        return task_split(self.task_set, self.space, i, keep, self.components, self._sparsifier(i))

    def _sparsifier(self, i: int) -> Sparsifier | None:
        return sparsifier(self.method.sparsify, self.options, self.space.keys[i])

    def _stream_reduce(self, q: float) -> Tensor:
        keep = None if self.mode == "off" else self.keep_mask(q)
        dtype = self.dtype

        def admissible_for(i: int) -> Filter:
            return self._task_filter(i, keep)

        ts, space = self.task_set, self.space
        thresholds = (
            trim_thresholds(ts, space, self.ties_k, admissible_for, self._pretrained, dtype)
            if self.method.trim
            else None
        )
        args = (ts, space, self.method, thresholds, admissible_for, self._pretrained, dtype, self.progress)
        return reduce_tasks(*args, self.options, self.statistics)


def _option_values(ties_k: float | None, sparsity: Sparsity | Mapping[str, object] | None) -> OptionValues:
    """Every option's value from a plan's arguments; checked unless `check_options` made them."""
    if isinstance(sparsity, OptionValues) and (ties_k is None or ties_k == sparsity["ties_k"]):
        return sparsity
    given = dict(sparsity.values() if isinstance(sparsity, Sparsity) else (sparsity or {}))
    if ties_k is not None:
        given["ties_k"] = ties_k
    return check_options(given)


def plan_statistics(
    method: MergeMethod, task_set: TaskSet, given: TaskStatistics | Sequence[StateInput] | None
) -> TaskStatistics | None:
    """The method's per-task statistics, opened and checked (`MergeMethod.check_statistics` first)."""
    method.check_statistics(given is not None)
    if given is None or isinstance(given, TaskStatistics):
        return given
    return open_statistics(given, task_set, COMBINERS.get(method.combine))  # type: ignore[arg-type]


def _rounded(key: str, value: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """`value` (θ_0 + λ·M in the arena's precision) rounded once to `dtype`, refused where it overflows."""
    result = value.to(dtype)
    if not bool(torch.isfinite(result).all()):
        raise TatrError(f"key '{key}': {what} overflows {dtype} (the merged values are infinite)")
    return result


def plan_merge(
    pretrained: StateInput,
    finetuned: Sequence[StateInput],
    *,
    method: str | MergeMethod = "ta",
    trust_region: str = "zero-shot",
    components: Sequence[str] | None = None,
    gradients: Sequence[StateInput] | None = None,
    signed_gradients: Sequence[StateInput] | None = None,
    cache_pretrained: bool = False,
    progress: bool = False,
    options: Mapping[str, object] | None = None,
    statistics: Sequence[StateInput] | None = None,
    **given: object,
) -> MergePlan:
    """Validate the inputs and compute the (q, λ)-independent part of a merge.

    The method's options are keywords (`ties_k=20`, `dare_p=0.5`, `breadcrumbs_density=0.9`, …) or an
    `options` mapping: each is checked against its declaration (`tatr.core.options`; their defaults'
    sources are in `tatr.core.sparsify`), an unknown name gets "did you mean"; a method reads its own.
    `statistics`: Fisher merging's diagonal Fishers or RegMean's Gram matrices, one file or mapping per task
    in the order of `finetuned`, keyed by the parameter each applies to (`tatr.core.fisher`, `regmean`)."""
    values = options if isinstance(options, OptionValues) and not given else check_options({**(options or {}), **given})
    inputs = (pretrained, finetuned, method, trust_region, components, gradients, signed_gradients, statistics)
    task_set, merge_method, chosen = open_inputs(*inputs)
    merge_method.check_tasks(values, task_set.num_tasks)
    args = (task_set, merge_method, trust_region, None, chosen, cache_pretrained, progress, values)
    return MergePlan(*args, statistics=statistics)


def open_inputs(
    pretrained: StateInput,
    finetuned: Sequence[StateInput],
    method: str | MergeMethod,
    trust_region: str,
    components: Sequence[str] | None,
    gradients: Sequence[StateInput] | None,
    signed_gradients: Sequence[StateInput] | None,
    statistics: Sequence[StateInput] | None,
) -> tuple[TaskSet, MergeMethod, frozenset[str] | None]:
    """The checks every merge runs at the door, then the opened, structurally validated task set. `method`: a
    name, or a configuration (`MergeMethod.weighted`: mergekit's per-model weights and normalize)."""
    merge_method = method if isinstance(method, MergeMethod) else fixed_method(method)
    check_mode(trust_region)
    merge_method.check_statistics(statistics is not None)
    chosen = check_components(components)
    unread = missing_statistic(trust_region, gradients is not None, signed_gradients is not None)
    if unread is not None:
        raise TatrError(unread)
    if chosen is not None:
        if trust_region == "off":
            raise TatrError("components need a trust region: choose a trust-region mode other than 'off'")
        if signed_gradients is None:
            raise TatrError("components need signed mean gradients (--signed-gradients, one file per task)")
    return open_task_set(pretrained, finetuned, gradients, signed_gradients), merge_method, chosen
