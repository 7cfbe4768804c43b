"""Trials that cost one multiply-add: a `MergePlan` whose mask moves incrementally between trials.

`MergePlan.merged` (linear fast path) adds λ·Σ_t τ_t to θ_0 and then resets the k dropped
coordinates from θ_0. That reset needs the dropped positions *sorted* (to split them by tensor),
and a sweep asks for a new q, so a new k, in almost every trial: sorting k ≈ (1−q)·N indices then
costs several plain TA merges (measured ~6× on a 3M-parameter model at q ∈ [0.9, 1]).

Here the plan keeps one extra arena, M = Σ_t τ_t with the currently dropped coordinates zeroed.
The drop order (by Ω, ties by position) is a ranking, so going from k₀ to k dropped coordinates
only zeroes order[k₀:k] or restores order[k:k₀] from Σ τ: O(|k − k₀|) scattered writes, no sort.
The merge is then exactly TA's single multiply-add, θ_0 + λ·c·M, tensor by tensor.

Restoring copies from Σ τ gathered once in drop order, so either direction is one scattered pass.
The result equals `MergePlan.merged` value for value (a kept coordinate gets the same
θ_0 + λ·c·Στ; a dropped one gets θ_0 + λ·0 = θ_0). Non-linear configurations (TIES, component
selection) fall through to `MergePlan.merged`. Memory: one extra float32 arena over the merged
coordinates, allocated on the first trial that drops anything.

Proposed for the core: this could replace the sort in `MergePlan.merged` (see the sweep's notes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tatr.merging import MergePlan


class IncrementalPlan(MergePlan):
    """A `MergePlan` for sweeps: `merged(q, λ)` costs one multiply-add plus O(|Δk|) writes."""

    _masked: Tensor | None = None  # Σ τ with the first `_k` coordinates of the drop order zeroed
    _values: Tensor | None = None  # Σ τ at the ranked coordinates, in drop order (for restoring)
    _k: int = 0

    @property
    def fast(self) -> bool:
        """True when the merge is linear in the task vectors, so one shared mask commutes with it."""
        return self.method.linear and self.components is None

    def masked_sum(self, q: float) -> Tensor:
        """Σ_t τ_t with the ⌈(1−q)N⌉ highest-conflict coordinates zeroed (shared, do not modify)."""
        k = self.drop_count(q)
        if k == 0 and self._masked is None:
            return self.tau_sum
        self.prepare([q])  # ranks at least k coordinates (no-op when already ranked)
        order = self._order
        if self._masked is None:
            self._masked, self._k = self.tau_sum.clone(), 0
        if self._values is None or self._values.numel() != order.numel():
            self._values = self.tau_sum[order]  # contiguous source: a restore is one scattered pass
        k0 = self._k
        if k > k0:
            self._masked.index_fill_(0, order[k0:k], 0.0)
        elif k < k0:
            self._masked.index_copy_(0, order[k:k0], self._values[k:k0])
        self._k = k
        return self._masked

    def merged(self, q: float = 0.99, lam: float | None = None) -> dict[str, Tensor]:
        """θ_0 + λ·c·(m_q ⊙ Σ τ) for every key of θ_0; equals `MergePlan.merged(q, λ)`."""
        if not self.fast:
            return super().merged(q, lam)
        lam = self.method.default_lam if lam is None else float(lam)
        ts, space = self.task_set, self.space
        scale = 1.0 / ts.num_tasks if self.method.reduce == "mean" else 1.0
        masked = self.masked_sum(q)
        position = {k: i for i, k in enumerate(space.keys)}
        out: dict[str, Tensor] = {}
        for key in ts.output_keys:
            theta0 = self._pretrained(key)
            i = position.get(key)
            if i is None:  # no task changes it: θ_0's tensor, as `MergePlan.merged` returns it
                out[key] = theta0.clone() if isinstance(ts.pretrained, Mapping) else theta0
                continue
            out[key] = torch.add(theta0.float(), space.view(masked, i), alpha=lam * scale).to(theta0.dtype)
        return out

    def mask_stats(self, q: float) -> dict[str, tuple[int, int]]:
        """key → (dropped, numel), from the drop ranking directly (no sort of the dropped indices)."""
        k = self.drop_count(q)
        self.prepare([q])
        counts = torch.bincount(self.space.key_of(self._order[:k]), minlength=len(self.space.keys))
        return {
            key: (int(counts[i]), int(torch.Size(self.space.shapes[i]).numel()))
            for i, key in enumerate(self.space.keys)
        }
