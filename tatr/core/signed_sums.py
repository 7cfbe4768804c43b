"""Per-tensor running sums over the tasks, from which every sum-and-elect configuration finishes its merge.

Why a module of its own: the sums are the arithmetic of `tatr.core.methods.MergeMethod`'s sign election and
reduction (TIES' disjoint sum and mean, mergekit's weighted ones), kept apart from the registry of methods.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class MergeMethod(Protocol):
    """What the sums read of a `tatr.core.methods.MergeMethod` (named here, not imported: methods imports this)."""

    @property
    def elect_sign(self) -> bool: ...
    @property
    def reduce(self) -> str: ...
    @property
    def zero_sum_positive(self) -> bool: ...
    @property
    def weights(self) -> tuple[float, ...] | None: ...


class SignedSums:
    """Per-tensor running sums over tasks: positive and negative entries, their counts, the total.

    Enough to finish any configuration without holding the T task vectors of a tensor at once.
    `total` is summed in task order, as the reference's `Tensor.sum(dim=0)`, because its sign
    elects the kept entries. A method without sign election needs the total alone, and one that
    elects + on zero sums with a disjoint sum (DARE-TIES) no counts: only what `method` reads is kept.
    """

    def __init__(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32, method: MergeMethod | None = None
    ) -> None:
        self.signs = method is None or method.elect_sign
        mean = method is None or method.reduce == "mean"
        weights = None if method is None else method.weights
        # as mergekit's `torch.tensor(weights, dtype=deltas.dtype)`: each w_t rounded to the arena dtype once
        self.weights = None if weights is None else torch.tensor(weights, dtype=dtype)
        self.counts = self.signs and ((mean and weights is None) or method is None or not method.zero_sum_positive)
        self.weight_sums = self.signs and mean and weights is not None  # the weighted disjoint mean's divisors
        self.total = torch.zeros(shape, dtype=dtype)
        if self.signs:
            self.pos = torch.zeros(shape, dtype=dtype)
            self.neg = torch.zeros(shape, dtype=dtype)
        if self.counts:
            self.n_pos = torch.zeros(shape, dtype=torch.int32)
            self.n_neg = torch.zeros(shape, dtype=torch.int32)
        if self.weight_sums:
            self.w_pos = torch.zeros(shape, dtype=dtype)
            self.w_neg = torch.zeros(shape, dtype=dtype)
        self.tasks = 0

    def add(self, tau: Tensor) -> None:
        """Add the next task's (sparsified) τ_t, times its weight where the method has weights."""
        weight = None if self.weights is None else self.weights[self.tasks]
        if weight is not None:
            tau = tau * weight
        self.tasks += 1
        self.total.add_(tau)
        if self.signs:
            self.pos.add_(tau.clamp(min=0))
            self.neg.add_(tau.clamp(max=0))
        if self.counts:
            self.n_pos.add_(tau > 0)
            self.n_neg.add_(tau < 0)
        if self.weight_sums:  # mergekit's `(weights * mask).sum(dim=0)`, one task at a time
            assert weight is not None
            zero = torch.zeros((), dtype=weight.dtype)
            self.w_pos.add_(torch.where(tau > 0, weight, zero))
            self.w_neg.add_(torch.where(tau < 0, weight, zero))

    def divisor(self) -> int | Tensor:
        """The mean's divisor without sign election: T, or the weights' sum (mergekit's `weights.sum(dim=0)`
        over weights shaped as its deltas), 1 where that is below 1e-8 in magnitude."""
        if self.weights is None:
            return self.tasks
        total = self.weights[: self.tasks].view(-1, *[1] * self.total.dim()).sum(dim=0)
        total[total.abs() < 1e-8] = 1
        return total

    def sign_counts(self) -> tuple[int, int]:
        """(#coordinates with Σ > 0, #with Σ < 0): this tensor's share of the majority sign."""
        return int((self.total > 0).sum()), int((self.total < 0).sum())

    def finish(self, method: MergeMethod) -> tuple[Tensor, Tensor, Tensor]:
        """(result with zero sums elected +, flat indices of the zero-sum coordinates with entries,
        their result if elected − instead). Linear methods have no zero-sum alternatives."""
        none = torch.empty(0, dtype=torch.int64)
        if not method.elect_sign:
            total = self.total
            return (total / self.divisor() if method.reduce == "mean" else total), none, total.new_empty(0)
        if method.reduce == "mean" and self.weight_sums:  # mergekit: `divisor[divisor == 0] = 1`
            one = torch.ones((), dtype=self.w_pos.dtype)
            up = self.pos / torch.where(self.w_pos == 0, one, self.w_pos)
            down = self.neg / torch.where(self.w_neg == 0, one, self.w_neg)
        elif method.reduce == "mean":
            up = self.pos / self.n_pos.clamp(min=1)
            down = self.neg / self.n_neg.clamp(min=1)
        else:
            up, down = self.pos, self.neg
        if method.zero_sum_positive:
            return torch.where(self.total >= 0, up, down), none, up.new_empty(0)
        positive = self.total > 0
        zero = (self.total == 0) & ((self.n_pos + self.n_neg) > 0)
        result = torch.where(positive | zero, up, down)
        idx = torch.nonzero(zero.reshape(-1)).flatten()
        return result, idx, down.reshape(-1)[idx]
