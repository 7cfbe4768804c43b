"""The statement (docs/method.md) of how tatr's drop count relates to FusionBench's threshold rule.

FusionBench keeps the coordinates with Ω below the value at sorted index min(int(N·q), N−1). Transcribed
literally below; tatr drops exactly ⌈(1−q)N⌉, ties broken by position.
"""

from __future__ import annotations

import torch

from tatr.core.exact_selection import drop_order
from tatr.core.trust_region import drop_count


def fusionbench_dropped(omega: torch.Tensor, q: float) -> int:
    """FusionBench's rule as it is written: sort, index with int(N*q) clamped to N-1, keep Ω < value."""
    flat = omega.flatten()
    index = min(int(flat.numel() * q), flat.numel() - 1)
    value = torch.sort(flat).values[index]
    keep = flat < value
    return int((~keep).sum())


def test_same_count_without_ties_or_rounding() -> None:
    omega = torch.randperm(1000).float()
    for q in (0.5, 0.9, 0.99, 0.999):
        assert fusionbench_dropped(omega, q) == drop_count(q, 1000) == drop_order(omega, drop_count(q, 1000)).numel()


def test_binary_rounding_drops_one_more_at_n100_q029() -> None:
    omega = torch.randperm(100).float()
    assert int(100 * 0.29) == 28  # 28.999… in binary
    assert fusionbench_dropped(omega, 0.29) == 72
    assert drop_count(0.29, 100) == 71
    assert drop_order(omega, 71).numel() == 71


def test_q1_drops_every_coordinate_tied_at_the_maximum_there_and_nothing_here() -> None:
    omega = torch.tensor([1.0, 5.0, 2.0, 5.0, 5.0])
    assert fusionbench_dropped(omega, 1.0) == 3
    assert drop_count(1.0, 5) == 0


def test_ties_at_the_threshold_drop_all_tied_there_and_exactly_k_here() -> None:
    omega = torch.tensor([0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 2.0, 0.5, 0.25, 0.125])
    k = drop_count(0.8, 10)
    assert k == 2
    assert fusionbench_dropped(omega, 0.8) == 4
    assert drop_order(omega, k).tolist() == [2, 3]  # the earliest tied positions
