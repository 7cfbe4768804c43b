"""Streaming TATR merges: one pass over the tasks, tensor by tensor, then cheap trials.

`plan_merge` does everything that does not depend on (q, λ): it streams the T task vectors once,
key by key, keeping only running sums — Σ_t τ_t and Ω as float32 arenas over the merged
coordinates — and never T task vectors. `MergePlan.merged(q, λ)` then costs, for the linear
methods (TA, averaging), one multiply-add plus O(|Δk|) writes to move the mask from the last q:
    θ(q, λ) = θ_0 + λ·c·(m_q ⊙ Σ_t τ_t),  c = 1 (sum) or 1/T (mean).
Non-linear configurations (TIES, component selection) need the per-task vectors after masking,
so they stream the tasks again for each new q (and reuse that result across λ).

Every result is computed from θ_0 afresh: trying λ₁ then λ₂ gives θ_0 + λ₂·M, never
θ_0 + (λ₁+λ₂)·M.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tatr.components import check_components, select_components
from tatr.errors import TatrError
from tatr.methods import MergeMethod, SignedSums, get_method
from tatr.trust_region import (
    NEEDS_GRADIENTS,
    ConflictAccumulator,
    bin_of_rank,
    check_mode,
    conflict_terms,
    drop_count,
    drop_order,
    float_from_bits,
    high_histogram,
    keep_count,
    low_histogram,
)
from tatr.vectors import (
    ParamSpace,
    TaskSet,
    all_finite,
    check_finite,
    gradient_tensor,
    open_task_set,
    pretrained_tensor,
    task_vector,
)

StateInput = str | Path | Mapping[str, Tensor]


class MergePlan:
    """The (q, λ)-independent part of a merge, computed once; see the module docstring."""

    def __init__(
        self,
        task_set: TaskSet,
        method: MergeMethod,
        trust_region: str,
        ties_k: float = 20.0,
        components: frozenset[str] | None = None,
        cache_pretrained: bool = False,
        progress: bool = False,
    ) -> None:
        self.task_set = task_set
        self.method = method
        self.mode = trust_region
        self.ties_k = ties_k
        self.components = components
        self.progress = progress
        self._theta0: dict[str, Tensor] | None = {} if cache_pretrained else None
        self.space, self.tau_sum, self.omega = _first_pass(task_set, trust_region, progress)
        self._order = torch.empty(0, dtype=torch.int64)  # coordinates ranked by Ω, highest first
        self._masked: Tensor | None = None  # Σ τ with the first `_k` ranked coordinates zeroed
        self._k = 0
        self._consume_sum = False
        self._reduced: tuple[float, Tensor] | None = None

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
    def merged(self, q: float = 0.99, lam: float | None = None) -> dict[str, Tensor]:
        """θ_0 + λ·M(q) as a full state dict (every key of θ_0, in its dtype).

        For TA/averaging this is one multiply-add per tensor on the masked sum.
        """
        lam = self.method.default_lam if lam is None else float(lam)
        ts, space = self.task_set, self.space
        if self.method.linear and self.components is None:
            scale = 1.0 / ts.num_tasks if self.method.reduce == "mean" else 1.0
            reduced, alpha = self.masked_sum(q), lam * scale
        else:
            reduced, alpha = self.merged_task_vector(q), lam
        out: dict[str, Tensor] = {}
        position = {k: i for i, k in enumerate(space.keys)}
        for key in ts.output_keys:
            theta0 = self._pretrained(key)
            i = position.get(key)
            if i is None:
                out[key] = theta0.clone() if isinstance(ts.pretrained, Mapping) else theta0
                continue
            out[key] = torch.add(theta0.float(), space.view(reduced, i), alpha=alpha).to(theta0.dtype)
        return out

    def merged_task_vector(self, q: float) -> Tensor:
        """M(q) as a float32 arena over the merged coordinates (cached for the last q)."""
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

        folder = Path(folder)
        arrays = {"tau_sum": self.tau_sum, "order": self._order}
        if self.omega is not None:
            arrays["omega"] = self.omega
        save_file(arrays, str(folder / "plan.safetensors"))
        layout = {"keys": list(self.space.keys), "mode": self.mode, "method": self.method.name}
        (folder / "plan.json").write_text(json.dumps(layout))

    @classmethod
    def load(
        cls,
        folder: str | Path,
        task_set: TaskSet,
        method: MergeMethod,
        trust_region: str,
        ties_k: float = 20.0,
        components: frozenset[str] | None = None,
        cache_pretrained: bool = False,
        progress: bool = False,
    ) -> MergePlan:
        """Rebuild a plan saved by `save` for the same inputs, skipping the streaming pass."""
        from safetensors.torch import load_file

        folder = Path(folder)
        layout = json.loads((folder / "plan.json").read_text())
        if layout["mode"] != trust_region:
            raise ValueError(f"saved plan is for mode {layout['mode']}, not {trust_region}")
        arrays = load_file(str(folder / "plan.safetensors"))
        plan = cls.__new__(cls)
        plan.task_set, plan.method, plan.mode = task_set, method, trust_region
        plan.ties_k, plan.components, plan.progress = ties_k, components, progress
        plan._theta0 = {} if cache_pretrained else None
        plan.space = ParamSpace.build(layout["keys"], task_set.shapes)
        plan.tau_sum, plan.omega, plan._order = arrays["tau_sum"], arrays.get("omega"), arrays["order"]
        plan._masked, plan._k, plan._consume_sum, plan._reduced = None, 0, False, None
        return plan

    # --- internals -----------------------------------------------------------------------------
    def _pretrained(self, key: str) -> Tensor:
        if self._theta0 is None:
            return pretrained_tensor(self.task_set, key)
        if key not in self._theta0:
            self._theta0[key] = pretrained_tensor(self.task_set, key)
        return self._theta0[key]

    def _task_filter(self, i: int, keep: Tensor | None) -> Callable[[int, Tensor], Tensor]:
        """τ_t ↦ the admissible part of τ_t for tensor i: masked, or the chosen components."""
        ts, key = self.task_set, self.space.keys[i]
        keep_view = None if keep is None else self.space.view(keep, i)
        if self.components is None:
            if keep_view is None:
                return lambda t, tau: tau
            return lambda t, tau: torch.where(keep_view, tau, torch.zeros((), dtype=tau.dtype))
        assert keep_view is not None
        total = sum(gradient_tensor(ts, t, key, signed=True) for t in range(ts.num_tasks))
        chosen = self.components
        return lambda t, tau: select_components(
            tau, keep_view, total - gradient_tensor(ts, t, key, signed=True), chosen
        )

    def _stream_reduce(self, q: float) -> Tensor:
        ts, space = self.task_set, self.space
        keep = None if self.mode == "off" else self.keep_mask(q)
        thresholds = self._trim_thresholds(keep) if self.method.trim else None
        reduced = torch.empty(space.numel)
        for i, key in enumerate(tqdm(space.keys, desc="merge", disable=None if self.progress else True, leave=False)):
            theta0 = self._pretrained(key).float()
            admissible = self._task_filter(i, keep)
            sums = SignedSums(theta0.shape)
            for t in range(ts.num_tasks):
                tau = admissible(t, task_vector(ts, t, key, theta0))
                if thresholds is not None:
                    tau = torch.where(tau.abs() >= thresholds[t], tau, torch.zeros((), dtype=tau.dtype))
                sums.add(tau)
            space.view(reduced, i).copy_(sums.finish(self.method))
        return reduced

    def _trim_thresholds(self, keep: Tensor | None) -> list[float]:
        """Per task, the ⌈k%·N⌉-th largest |admissible τ_t| over all merged coordinates (2 passes)."""
        ts, space = self.task_set, self.space
        k = keep_count(self.ties_k, space.numel)
        if k >= space.numel:
            return [0.0] * ts.num_tasks

        def magnitudes() -> object:
            for i, key in enumerate(space.keys):
                theta0 = self._pretrained(key).float()
                admissible = self._task_filter(i, keep)
                yield [admissible(t, task_vector(ts, t, key, theta0)).abs().reshape(-1) for t in range(ts.num_tasks)]

        high = torch.zeros(ts.num_tasks, 1 << 15, dtype=torch.int64)
        for per_task in magnitudes():
            for t, values in enumerate(per_task):
                high[t] += high_histogram([values])
        bins = [bin_of_rank(high[t], k) for t in range(ts.num_tasks)]
        low = torch.zeros(ts.num_tasks, 1 << 16, dtype=torch.int64)
        for per_task in magnitudes():
            for t, values in enumerate(per_task):
                low[t] += low_histogram([values], bins[t][0])
        return [float_from_bits(b, bin_of_rank(low[t], k - above)[0]) for t, (b, above) in enumerate(bins)]


def _first_pass(task_set: TaskSet, mode: str, progress: bool) -> tuple[ParamSpace, Tensor, Tensor | None]:
    """Stream θ_t key by key, accumulating Σ_t τ_t and Ω straight into their arenas.

    Per task and tensor this is one read and a handful of element-wise passes; values are
    validated on the per-tensor sums (`all_finite`), and a task's "did it change anything" test
    stops as soon as one changed tensor is seen. A key no task changed is overwritten by the next
    one (the write cursor does not advance), so it never enters Ω or N.
    """
    ts = task_set
    capacity = sum(torch.Size(ts.shapes[k]).numel() for k in ts.candidate_keys)
    tau_arena = torch.empty(capacity)
    omega_arena = None if mode == "off" else torch.empty(capacity)
    changed = [False] * ts.num_tasks
    kept: list[str] = []
    cursor = 0
    for key in tqdm(ts.candidate_keys, desc="task vectors", disable=None if progress else True, leave=False):
        theta0 = pretrained_tensor(ts, key).float()
        n = theta0.numel()
        tau_sum = tau_arena[cursor : cursor + n].view(theta0.shape)
        out = None if omega_arena is None else omega_arena[cursor : cursor + n].view(theta0.shape)
        acc = None if mode == "off" else ConflictAccumulator(theta0.shape, out=out)
        key_changed, missing_gradient = False, None
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
            magnitude = tau.abs_()  # τ itself is no longer needed: |τ| in place
            grad = None
            if mode in NEEDS_GRADIENTS:
                assert ts.gradient_keys is not None
                if key not in ts.gradient_keys[t]:
                    missing_gradient = t
                    continue
                grad = gradient_tensor(ts, t, key)
            acc.add(*conflict_terms(mode, magnitude, grad))
        if not all_finite(tau_sum, acc.sum_s if acc is not None else None):
            check_finite(ts, key, gradients=mode in NEEDS_GRADIENTS)
        if not key_changed:
            continue  # no task changed it: copied from θ_0, its arena slot is reused
        if missing_gradient is not None:
            gradient_tensor(ts, missing_gradient, key)  # raises the one-line error
        if acc is not None:
            acc.omega()  # finalises Ω into its arena slot
        kept.append(key)
        cursor += n
    for t, flag in enumerate(changed):
        if not flag:
            raise TatrError(
                f"{_describe(ts.finetuned[t])}: identical to the pretrained model (its task vector is zero)"
            )
    space = ParamSpace.build(kept, ts.shapes)
    return space, _trim(tau_arena, cursor), None if omega_arena is None else _trim(omega_arena, cursor)


def _trim(arena: Tensor, size: int) -> Tensor:
    """The used part of an arena; copied only when unchanged keys left much of it unused."""
    return arena if size == arena.numel() else (arena[:size].clone() if size < arena.numel() // 2 else arena[:size])


def _describe(source: object) -> str:
    from tatr.checkpoints import describe

    return describe(source)  # type: ignore[arg-type]


def plan_merge(
    pretrained: StateInput,
    finetuned: Sequence[StateInput],
    *,
    method: str = "ta",
    trust_region: str = "zero-shot",
    ties_k: float = 20.0,
    components: Sequence[str] | None = None,
    gradients: Sequence[StateInput] | None = None,
    signed_gradients: Sequence[StateInput] | None = None,
    cache_pretrained: bool = False,
    progress: bool = False,
) -> MergePlan:
    """Validate the inputs and compute the (q, λ)-independent part of a merge."""
    merge_method = get_method(method)
    check_mode(trust_region)
    chosen = check_components(components)
    if not 0 < ties_k <= 100:
        raise TatrError(f"ties_k must be in (0, 100], got {ties_k}")
    if trust_region in NEEDS_GRADIENTS and gradients is None:
        raise TatrError(f"trust-region mode '{trust_region}' needs exemplar gradients (--gradients, one file per task)")
    if chosen is not None:
        if trust_region == "off":
            raise TatrError("components need a trust region: choose a trust-region mode other than 'off'")
        if signed_gradients is None:
            raise TatrError("components need signed mean gradients (--signed-gradients, one file per task)")
    task_set = open_task_set(pretrained, finetuned, gradients, signed_gradients)
    return MergePlan(task_set, merge_method, trust_region, ties_k, chosen, cache_pretrained, progress)


def merge(
    pretrained: StateInput,
    finetuned: Sequence[StateInput],
    *,
    method: str = "ta",
    trust_region: str = "zero-shot",
    q: float = 0.99,
    lam: float | None = None,
    ties_k: float = 20.0,
    components: Sequence[str] | None = None,
    gradients: Sequence[StateInput] | None = None,
    signed_gradients: Sequence[StateInput] | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Merge once: θ_0 + λ·M with the trust region at q. Returns every key of θ_0."""
    drop_count(q, 1)  # validates q before any work
    plan = plan_merge(
        pretrained,
        finetuned,
        method=method,
        trust_region=trust_region,
        ties_k=ties_k,
        components=components,
        gradients=gradients,
        signed_gradients=signed_gradients,
        progress=progress,
    )
    plan.prepare([q], release_scores=True)
    return plan.merged(q, lam)
