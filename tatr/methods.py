"""One generalized task-arithmetic merge; TA, TIES and averaging are configurations of it.

    sparsify (TIES: keep each task's top-k% |τ| globally) → sign consensus (TIES: elect the sign of
    Σ_t trimmed τ_t, keep only agreeing entries) → reduce (sum or mean) → scale by λ.

The trust-region mask and the component selection act on each τ_t *before* sparsification: they
define which parts of a task vector are admissible at all, so TIES' top-k budget is spent on
coordinates that survive the trust region instead of on coordinates that will be zeroed anyway.

Zero-sum convention: where the trimmed values of a coordinate sum to exactly 0, the elected sign is
+ (the TIES reference resolves such ties by the global majority sign; the case has measure zero for
real task vectors and only matters when all trimmed values are 0, where both give 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tatr.registry import Registry


@dataclass(frozen=True)
class MergeMethod:
    name: str
    trim: bool  # keep each task's top-k% magnitudes (TIES)
    elect_sign: bool  # TIES sign election and disjoint reduction
    reduce: Literal["sum", "mean"]  # mean with elect_sign is the disjoint mean
    default_lam: float
    summary: str

    @property
    def linear(self) -> bool:
        """Linear in the task vectors: a shared mask commutes with the merge (the fast path)."""
        return not self.trim and not self.elect_sign


METHODS: Registry[MergeMethod] = Registry("merge method")
for _m in (
    MergeMethod("ta", False, False, "sum", 0.3, "task arithmetic: θ0 + λ Σ τ_t"),
    MergeMethod("ties", True, True, "mean", 0.3, "TIES: trim top-k%, elect sign, disjoint mean"),
    MergeMethod("average", False, False, "mean", 1.0, "simple averaging: θ0 + λ·mean τ_t (λ=1: weight average)"),
):
    METHODS.add(_m.name, _m)


def get_method(name: str) -> MergeMethod:
    return METHODS.get(name)


class SignedSums:
    """Per-tensor running sums of positive and negative entries and their counts, over tasks.

    Enough to finish any configuration without holding the T task vectors of a tensor at once.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...]) -> None:
        self.pos = torch.zeros(shape)
        self.neg = torch.zeros(shape)
        self.n_pos = torch.zeros(shape, dtype=torch.int32)
        self.n_neg = torch.zeros(shape, dtype=torch.int32)
        self.tasks = 0

    def add(self, tau: Tensor) -> None:
        self.tasks += 1
        self.pos.add_(tau.clamp(min=0))
        self.neg.add_(tau.clamp(max=0))
        self.n_pos.add_(tau > 0)
        self.n_neg.add_(tau < 0)

    def finish(self, method: MergeMethod) -> Tensor:
        if method.elect_sign:
            positive = (self.pos + self.neg) >= 0
            if method.reduce == "mean":
                return torch.where(positive, self.pos / self.n_pos.clamp(min=1), self.neg / self.n_neg.clamp(min=1))
            return torch.where(positive, self.pos, self.neg)
        total = self.pos + self.neg
        return total / self.tasks if method.reduce == "mean" else total
