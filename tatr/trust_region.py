"""The trust region: conflict scores Ω and the exact global selection of the coordinates to drop.

Conflict. Ω = Σ_{i≠j} s_i ⊙ a_j, with a_j = |τ_j|. Expanding (Σ s)(Σ a) − Σ s⊙a is O(T) but
cancels catastrophically where one task dominates a coordinate (float32 loses every digit there;
see the tests). The same running sums, ordered as prefix sums, give an O(T) form with no
subtraction at all: adding task i contributes s_i ⊙ A_{<i} + a_i ⊙ S_{<i}, where S_{<i}, A_{<i}
are the sums over the tasks before it. Every term is ≥ 0, so float32 suffices: each product and
each of the ≤ 2T additions rounds once, and the result is within (2T+2)·2⁻²⁴ relative of the
pairwise sum, coordinate by coordinate (checked against the literal O(T²) loop in the tests). The
modes only change s and a: zero-shot s=|τ|; exemplar s=mean|∇ℓ|; gradient-only a=1, so
Ω=(T−1)Σs_i; magnitude-only s=1, so Ω=(T−1)Σ|τ_j| (the constant T−1 does not move the mask).

Selection. The mask drops exactly k = ⌈(1−q)·N⌉ coordinates with the largest Ω over all N merged
coordinates (q from its decimal text, so q=0.99 with N=100 drops 1, not 2). Ties at the boundary
are broken by canonical position (keys sorted by name, then row-major index): the earlier one is
dropped first. The k-th largest value is found by an exact two-pass radix select on the float32
bit patterns (non-negative floats order like their integer bits): a 2¹⁵-bin histogram of the high
bits, then a 2¹⁶-bin histogram of the low bits inside the one bin that holds the boundary. That is
O(N) with no copy of Ω, no full sort, and no 2²⁴ limit (unlike `torch.quantile`).

Relation to "keep Ω < sorted(Ω)[⌊qN⌋]" (FusionBench): without ties both drop N−⌊qN⌋ = ⌈(1−q)N⌉
coordinates. With ties at that value it drops every tied coordinate, so more than ⌈(1−q)N⌉;
and q=1 indexes past the end. Here the count is always exact and q=1 drops nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction

import torch
from torch import Tensor

MODES = ("off", "zero-shot", "exemplar", "gradient-only", "magnitude-only")
NEEDS_GRADIENTS = ("exemplar", "gradient-only")
CHUNK = 1 << 22
_HI_BINS = 1 << 15  # sign bit is 0 for non-negative floats
_LO_BINS = 1 << 16


def check_mode(mode: str) -> str:
    from tatr.errors import TatrError
    from tatr.registry import unknown_name

    if mode not in MODES:
        raise TatrError(unknown_name("trust-region mode", mode, MODES))
    return mode


def drop_count(q: float, n: int) -> int:
    """⌈(1−q)·n⌉, computed on q's decimal value so binary rounding cannot add a coordinate."""
    if not 0.0 < q <= 1.0:
        from tatr.errors import TatrError

        raise TatrError(f"q must be in (0, 1], got {q}")
    return math.ceil((1 - Fraction(repr(float(q)))) * n)


def keep_count(percent: float, n: int) -> int:
    """⌈percent/100 · n⌉ on the decimal value (TIES' top-k%)."""
    return min(n, math.ceil(Fraction(repr(float(percent))) / 100 * n))


class ConflictAccumulator:
    """Ω for one tensor from running (prefix) sums over the tasks, in float32, nothing cancelling.

    Adding task i contributes every pair it forms with the tasks before it:
        Ω += s_i ⊙ A_{<i} + a_i ⊙ S_{<i},   then S_{<i} += s_i, A_{<i} += a_i.
    `s=None` stands for s=1 and `a=None` for a=1 (the ablation modes; Ω is then (T−1)·Σa or
    (T−1)·Σs); passing the same tensor as s and a (zero-shot) adds 2·a_i ⊙ A_{<i}.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], out: Tensor | None = None) -> None:
        """`out`, if given, receives Ω (e.g. a view into the arena), saving a copy."""
        self.shape = tuple(shape)
        self.out = out
        self.sum_s: Tensor | None = None
        self.sum_a: Tensor | None = None
        self.pairs: Tensor | None = None
        self.tasks = 0
        self.unit_s = self.unit_a = False

    def add(self, s: Tensor | None, a: Tensor | None) -> None:
        if s is None and a is None:
            raise ValueError("at least one of s and a must be a tensor")
        self.tasks += 1
        self.unit_s, self.unit_a = s is None, a is None
        if s is not None and a is not None:
            if self.pairs is None:
                self.pairs = torch.zeros(self.shape) if self.out is None else self.out.zero_()
            elif s is a:
                self.pairs.addcmul_(a, self.sum_a, value=2.0)
            else:
                self.pairs.addcmul_(s, self.sum_a).addcmul_(a, self.sum_s)
        if a is not None:
            self.sum_a = a.clone() if self.sum_a is None else self.sum_a.add_(a)
        if s is not None and s is not a:
            self.sum_s = s.clone() if self.sum_s is None else self.sum_s.add_(s)

    def sums(self) -> tuple[Tensor | None, ...]:
        return self.sum_s, self.sum_a, self.pairs

    def omega(self) -> Tensor:
        """Ω for this tensor (float32, ≥ 0), in `out` when one was given."""
        if self.unit_s or self.unit_a:  # Σ_{i≠j} 1·a_j = (T−1)Σa and Σ_{i≠j} s_i·1 = (T−1)Σs
            total = self.sum_a if self.unit_s else self.sum_s
            return torch.mul(total, self.tasks - 1, out=self.out) if self.out is not None else total * (self.tasks - 1)
        return self.pairs


def conflict_terms(mode: str, mag: Tensor, grad: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(s, a) for one task and tensor under `mode`, given mag = |τ|; None means the factor is 1."""
    if mode == "zero-shot":
        return mag, mag
    if mode == "exemplar":
        return grad, mag
    if mode == "gradient-only":
        return grad, None
    if mode == "magnitude-only":
        return None, mag
    raise ValueError(f"no conflict terms for mode '{mode}'")


def pairwise_conflict(s: list[Tensor], a: list[Tensor]) -> Tensor:
    """Literal Σ_{i≠j} s_i ⊙ a_j in float64: the O(T²) reference the tests check against."""
    out = torch.zeros_like(s[0], dtype=torch.float64)
    for i, si in enumerate(s):
        for j, aj in enumerate(a):
            if i != j:
                out += si.double() * aj.double()
    return out


# --- exact selection --------------------------------------------------------------------------


def _bits(values: Tensor) -> Tensor:
    return values.contiguous().view(torch.int32)


def high_histogram(chunks: Iterable[Tensor]) -> Tensor:
    """Histogram of the high 15 bits of non-negative float32 values."""
    hist = torch.zeros(_HI_BINS, dtype=torch.int64)
    for c in chunks:
        hist += torch.bincount(_bits(c) >> 16, minlength=_HI_BINS)
    return hist


def low_histogram(chunks: Iterable[Tensor], high: int) -> Tensor:
    hist = torch.zeros(_LO_BINS, dtype=torch.int64)
    for c in chunks:
        b = _bits(c)
        sel = b[(b >> 16) == high]
        hist += torch.bincount(sel & 0xFFFF, minlength=_LO_BINS)
    return hist


def bin_of_rank(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element (k ≥ 1), and how many elements lie above it."""
    above = torch.cumsum(hist.flip(0), 0)  # above[i] = count in the top i+1 bins
    i = int(torch.searchsorted(above, torch.tensor(k)).item())
    b = hist.numel() - 1 - i
    return b, int(above[i - 1].item()) if i > 0 else 0


def kth_largest(chunks: Callable[[], Iterator[Tensor]], k: int) -> float:
    """Exact k-th largest of non-negative float32 values given as re-iterable chunks (two passes)."""
    hist = high_histogram(chunks())
    total = int(hist.sum())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    high, above = bin_of_rank(hist, k)
    low, _ = bin_of_rank(low_histogram(chunks(), high), k - above)
    return float_from_bits(high, low)


def float_from_bits(high: int, low: int) -> float:
    return torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item()


def arena_chunks(arena: Tensor, size: int = CHUNK) -> Callable[[], Iterator[Tensor]]:
    return lambda: (arena[i : i + size] for i in range(0, arena.numel(), size))


def drop_order(omega: Tensor, k: int) -> Tensor:
    """Global indices of the k largest Ω, largest first; ties by ascending index. O(N + k log k)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    if k > omega.numel():
        raise ValueError(f"cannot drop {k} of {omega.numel()} coordinates")
    v = kth_largest(arena_chunks(omega), k)
    parts = []
    for start in range(0, omega.numel(), CHUNK):
        c = omega[start : start + CHUNK]
        parts.append(torch.nonzero(c >= v).flatten() + start)
    candidates = torch.cat(parts)
    values = omega[candidates]
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    return candidates[order]
