"""Consensus merging (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024): TA restricted to the weights that at least k tasks' TALL masks hold.

Why a per-key combiner: a TALL mask compares, coordinate by coordinate, each task's distance to θ_0 with
its distance to the multi-task model θ_MTL = θ_0 + Σ_t τ_t, so a coordinate's mask needs the T task
vectors of that coordinate together and nothing else: the reference flattens the whole model into one
vector, but every step after the flattening is element-wise, so key by key gives the same masks. It runs
in tatr's stream as a `CombinerKind` (`tatr.core.options.COMBINERS`), holding one key's T τ_t at a time:

    m_t = |θ_0 − θ_t| > λ_tall · |θ_MTL − θ_t|           (TALL mask of task t; θ_t = θ_0 + τ_t)
    c   = Σ_t m_t ≥ k                                     (consensus mask: weights held by ≥ k tasks)
    M   = c ⊙ Σ_t τ_t,   θ = θ_0 + λ·M                    (λ applied outside, as for TA)

Reference code. FusionBench 0.2.33 (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1; the
files are unchanged at its later commit 54c9e8c9) ships `fusion_bench/method/tall_mask/utils.py`, a copy
of the original repository's `src/utils/tallmask_utils.py` (nik-dim/tall_masks, commit d10af8b2):
`generate_task_masks` and `construct_consensus_mask`. FusionBench has no consensus merge algorithm (its
`TallMaskTaskArithmeticAlgorithm` is the compression method: one retrieved model θ_0 + m_t ⊙ Σ τ per
task); the merge that uses those functions is the original's `src/eval/aggregation.py::
create_task_vector` (method "consensus"), followed here:

* θ_MTL is the *unscaled* TA sum: `merged_tv = tv_flat_checks.sum(dim=0)` (its `topk_values_mask` at the
  default k = 100 is a no-op) is passed as `tv`, and `flat_multi = flat_ptm + tv`. The masks therefore do
  not depend on the merge's λ, and the combiner needs no λ of its own.
* λ_tall (`tall_mask_lambda`) is one value for all tasks, FusionBench's `config/method/tall_mask/
  task_arithmetic.yaml` default 0.6. The original instead builds masks for λ_tall ∈ {0.2, …, 0.6} and
  keeps, per task, the one with the best validation accuracy (`find_optimal_mask`), which needs each task's
  evaluation inside the merge; a sweep over `tall_mask_lambda` is the tatr counterpart.
* k (`prun_thre_k`, default 2 in the original's `config/method/consensus.yaml`) counts masks with `>=`:
  k = 0 keeps every weight (TA), k = 1 drops the "catastrophic" weights no task holds, k = 2 also the
  "selfish" ones only one task holds.
* M = Σ_t τ_t ⊙ c, and the merged model is θ_0 + α·M with α tuned on validation over {0.1, …, 1.0}
  (`evaluate_task_vector`): neither FusionBench nor the original fixes a default α.

Arithmetic, so that masks (strict comparisons, where a rounding flips a tie) match the reference bit for
bit where its inputs are reproduced: |θ_0 − θ_t| is |τ_t| (tatr's τ_t = θ_t − θ_0 in the same dtype, and
a difference and its negation round alike); θ_MTL − θ_t is computed as (θ_0 + Σ τ) − (θ_0 + τ_t), the
reference's own expression, with θ_t rebuilt as θ_0 + τ_t, which is θ_t exactly whenever the subtraction
was exact (Sterbenz: θ_t and θ_0 within a factor 2 of each other, as fine-tuned weights mostly are);
λ_tall multiplies the distance as the reference does; Σ τ is a left fold in task order, as FusionBench's
`state_dict_sum` (torch's `sum(dim=0)` over a (T, N) tensor, the original's, is a left fold at small T
and N-dependent otherwise: the two then differ in the last bit of a few coordinates).

Deliberate differences from the reference:

* k > T is refused (one line, at the first key): no weight can then be held by k tasks, so the merge
  would silently be θ_0 (the original documents it as "reduce to zero-shot"); likewise the door refuses
  λ_tall < 0, where every mask holds everything.
* the masks are computed one task at a time into a count per coordinate: the T masks (and T flattened
  models) are never held.
* integer keys never reach a combiner: tatr copies them from θ_0 (the reference would flatten them with
  the floats; their τ is 0, so they are not moved there either). Half/bfloat16 models are merged in
  float32, tatr's arena precision, where the reference would compute in their dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tatr.core.errors import TatrError
from tatr.core.options import COMBINERS, CombinerKind, Option

TALL_MASK_LAMBDA = 0.6  # FusionBench's config/method/tall_mask/task_arithmetic.yaml
CONSENSUS_K = 2  # the original's config/method/consensus.yaml `prun_thre_k`

CONSENSUS_OPTIONS = (
    Option(
        "tall_mask_lambda",
        float,
        TALL_MASK_LAMBDA,
        "--tall-mask-lambda",
        "Consensus: task t holds a weight where |θ0 − θt| > λ·|θ_MTL − θt| (θ_MTL = θ0 + Σ τ), λ ≥ 0",
        "TALL mask λ (tall_mask_lambda)",
        "λ_tall",
        low=0.0,
        metavar="L",
    ),
    Option(
        "consensus_k",
        int,
        CONSENSUS_K,
        "--consensus-k",
        "Consensus: merge only the weights that at least k tasks' TALL masks hold (0: TA), k ≤ T",
        "Consensus k (prun_thre_k)",
        "k",
        low=0,
        metavar="K",
    ),
)


def task_sum(taus: list[Tensor]) -> Tensor:
    """Σ_t τ_t as a left fold in task order (FusionBench's `state_dict_sum`): the same bits whatever the
    tensor's shape, unlike torch's `sum(dim=0)` of the stacked τ."""
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total.add_(tau)
    return total


def tall_mask(tau: Tensor, theta0: Tensor, multi: Tensor, tall_mask_lambda: float) -> Tensor:
    """Task t's TALL mask |θ_0 − θ_t| > λ·|θ_MTL − θ_t| (see the module docstring for the arithmetic)."""
    finetuned = theta0 + tau
    return tau.abs() > (multi - finetuned).abs() * tall_mask_lambda


def consensus_count(taus: list[Tensor], theta0: Tensor, tall_mask_lambda: float, total: Tensor | None = None) -> Tensor:
    """How many tasks' TALL masks hold each coordinate (int32), one task at a time."""
    total = task_sum(taus) if total is None else total
    multi = theta0 + total  # θ_MTL = θ_0 + Σ τ: `flat_multi = flat_ptm + tv`
    count = torch.zeros(theta0.shape, dtype=torch.int32)
    for tau in taus:
        count += tall_mask(tau, theta0, multi, tall_mask_lambda)
    return count


def consensus(taus: list[Tensor], theta0: Tensor, tall_mask_lambda: float, k: int) -> Tensor:
    """M = (Σ_t m_t ≥ k) ⊙ Σ_t τ_t for one tensor: its consensus-masked task-arithmetic sum."""
    total = task_sum(taus)
    if k == 0:  # every count is ≥ 0: the reference's mask holds everything (TA)
        return total
    return total * (consensus_count(taus, theta0, tall_mask_lambda, total) >= k)


def check_k(k: int, num_tasks: int) -> None:
    if k > num_tasks:
        raise TatrError(
            f"consensus k={k} exceeds the number of tasks ({num_tasks}): no weight can be held by {k} tasks' "
            f"TALL masks, so the merge would be θ_0; give k ≤ {num_tasks} (k = 0 is TA)"
        )


def _combine(key: str, taus: list[Tensor], theta0: Tensor, values: Mapping[str, Any]) -> Tensor:
    k = values.get("consensus_k", CONSENSUS_K)
    check_k(k, len(taus))
    return consensus(taus, theta0, values.get("tall_mask_lambda", TALL_MASK_LAMBDA), k)


COMBINERS.add("consensus", CombinerKind("consensus", _combine, CONSENSUS_OPTIONS))
