"""How small a difference of average accuracy a benchmark can resolve, from the binomial variance.

Why one owner: the report (`tatr.report.findings`) and the suites' data cards both state it, and a
reader compares the two. The average over T tasks of accuracies measured on n_t examples has
variance (1/T²) Σ_t p_t(1 − p_t)/n_t; the half-width of its 95% interval, at the worst case
p = ½, is what one accuracy can be trusted to. Two methods measured independently differ with √2
times that; measured on the same examples (paired), the variance of the difference is
(1/T²) Σ_t (r_t − δ_t²)/n_t ≤ (1/T²) Σ_t r_t/n_t with r_t the fraction of examples on which they
disagree, which is why paired intervals are narrower. S seeds (independent builds or draws) divide
each variance by S.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
PAIRED_EXAMPLE = 0.10  # the disagreement rate data cards quote a paired resolution at (reports: the observed)


def resolvable_difference(
    n_per_task: Sequence[int], discordant: float | None = None, seeds: int = 1, z: float = Z_95
) -> float:
    """The 95% half-width, in accuracy points, of a difference of two average accuracies over tasks with
    `n_per_task` examples: unpaired at p = ½ when `discordant` is None, else paired with that fraction
    of examples on which the two disagree."""
    if not n_per_task or any(n < 1 for n in n_per_task) or seeds < 1:
        raise ValueError("need at least one task, every task with at least one example, and a seed")
    per_example = 2 * 0.25 if discordant is None else float(discordant)
    variance = sum(per_example / n for n in n_per_task) / len(n_per_task) ** 2 / seeds
    return 100.0 * z * math.sqrt(variance)


def level_half_width(n_per_task: Sequence[int], seeds: int = 1, z: float = Z_95) -> float:
    """The 95% half-width, in points, of one average accuracy at the worst case p = ½."""
    return resolvable_difference(n_per_task, seeds=seeds, z=z) / math.sqrt(2)
