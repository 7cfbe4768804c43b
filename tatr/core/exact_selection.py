"""The exact global selection of the coordinates the trust region drops: the k largest Ω of N, in O(N).

The mask drops exactly k = ⌈(1−q)·N⌉ coordinates with the largest Ω over all N merged
coordinates (q from its decimal text, so q=0.99 with N=100 drops 1, not 2). Ties at the boundary
are broken by canonical position (keys sorted by name, then row-major index): the earlier one is
dropped first. The k-th largest value is found by an exact two-pass radix select on the float32
bit patterns (non-negative floats order like their integer bits): a 2¹⁵-bin histogram of the high
bits, then a 2¹⁶-bin histogram of the low bits inside the one bin that holds the boundary. That is
O(N) with no copy of Ω, no full sort, and no 2²⁴ limit (unlike `torch.quantile`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

CHUNK = 1 << 22


class RadixSelect:
    """Exact k-th largest of non-negative float32/float64 values streamed in several passes.

    Non-negative floats order like their integer bit patterns, so the k-th largest is found digit
    by digit from the top: 15 bits (the sign bit is 0), then 16 bits per pass. Each pass histograms
    only the values whose higher digits match the prefix chosen so far: float32 takes 2 passes,
    float64 takes 4, with memory O(2¹⁶) and no copy of the values. Call `feed` (and `feed_zeros`
    for values known to be +0.0) for every value, then `advance`, once per pass. The first pass
    does not read k, so a caller that learns the count only while streaming (the out-of-core merge)
    may set `k` after its first feeds, before the first `advance`.
    """

    def __init__(self, k: int, dtype: torch.dtype) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"radix select needs float32 or float64 values, got {dtype}")
        self.k, self.dtype = k, dtype
        self.int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        width = 32 if dtype == torch.float32 else 64
        self.digits = [(width - 16, 15)] + [(s, 16) for s in range(width - 32, -1, -16)]
        self.step, self.prefix, self.total = 0, 0, 0
        self.hist = torch.zeros(1 << 15, dtype=torch.int64)

    @property
    def passes(self) -> int:
        return len(self.digits)

    def feed(self, values: Tensor) -> None:
        bits = values.contiguous().view(self.int_dtype).reshape(-1)
        shift, width = self.digits[self.step]
        if self.step > 0:
            bits = bits[(bits >> (shift + width)) == self.prefix]
        else:
            self.total += bits.numel()
        self.hist += torch.bincount(((bits >> shift) & ((1 << width) - 1)).long(), minlength=1 << width)

    def feed_zeros(self, count: int) -> None:
        """Account for `count` values equal to +0.0 without materialising them."""
        if self.step == 0:
            self.total += count
        if self.prefix == 0:
            self.hist[0] += count

    def advance(self) -> None:
        if self.step == 0 and not 1 <= self.k <= self.total:
            raise ValueError(f"k={self.k} outside 1..{self.total}")
        digit, above = bin_of_rank(self.hist, self.k)
        self.k -= above
        self.prefix = (self.prefix << self.digits[self.step][1]) | digit
        self.step += 1
        if self.step < len(self.digits):
            self.hist = torch.zeros(1 << self.digits[self.step][1], dtype=torch.int64)

    def value(self) -> float:
        if self.step != len(self.digits):
            raise RuntimeError("radix select: not every pass was run")
        return torch.tensor([self.prefix], dtype=self.int_dtype).view(self.dtype).item()

    def tied_rank(self) -> int:
        """After every pass: how many of the values equal to `value()` are among the k largest (the
        others among them are larger)."""
        if self.step != len(self.digits):
            raise RuntimeError("radix select: not every pass was run")
        return self.k

    def prefix_range(self) -> tuple[int, int]:
        """The bit patterns [low, high] the next pass histograms: a chunk of values whose bits all lie
        outside it contributes nothing and may be skipped."""
        shift = self.digits[self.step][0] + self.digits[self.step][1] if self.step < len(self.digits) else 0
        return self.prefix << shift, ((self.prefix + 1) << shift) - 1


def bin_of_rank(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element (k ≥ 1), and how many elements lie above it."""
    above = torch.cumsum(hist.flip(0), 0)  # above[i] = count in the top i+1 bins
    i = int(torch.searchsorted(above, torch.tensor(k)).item())
    b = hist.numel() - 1 - i
    return b, int(above[i - 1].item()) if i > 0 else 0


def kth_largest(chunks: Callable[[], Iterator[Tensor]], k: int, dtype: torch.dtype = torch.float32) -> float:
    """Exact k-th largest of non-negative values given as re-iterable chunks (2 passes, 4 for float64)."""
    select = RadixSelect(k, dtype)
    for _ in range(select.passes):
        for c in chunks():
            select.feed(c)
        select.advance()
    return select.value()


def arena_chunks(arena: Tensor, size: int = CHUNK) -> Callable[[], Iterator[Tensor]]:
    return lambda: (arena[i : i + size] for i in range(0, arena.numel(), size))


def cut_drops(omega: Tensor, value: float, ties: int) -> tuple[Tensor, int]:
    """The dropped coordinates of one tensor, given where the global selection cuts: every Ω > `value`,
    then the first `ties` coordinates with Ω == `value` in row-major order. Returns (dropped, ties used).

    Streamed over the tensors in canonical order, with `ties` the k-th largest's `tied_rank` less the
    ties used by earlier tensors, this drops exactly the coordinates `drop_order(Ω, k)` ranks first: its
    k largest are every value above the k-th, then the ties at it by ascending global index."""
    drop = omega > value
    if ties <= 0:
        return drop, 0
    tied = (omega == value).reshape(-1)
    where = torch.nonzero(tied).flatten()[:ties]
    drop.reshape(-1)[where] = True  # drop is contiguous: reshape is a view
    return drop, int(where.numel())


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
