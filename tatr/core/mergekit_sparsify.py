"""mergekit 0.1.5's sparsifiers (`mergekit/sparsify.py`) as tatr sparsifiers: one tensor of one task at a time.

mergekit's `GeneralizedTaskArithmeticMerge` sparsifies each model's delta τ_t per tensor with that model's
`density`, then multiplies it by the model's `weight` (`tatr.core.methods.MergeMethod.weights`). Its three
sparsifiers, each transcribed here with the same arithmetic so that a merge equals mergekit's bit for bit:

* `magnitude` (ties): keep the k = max(1, ⌊density·n⌋) largest |τ| of the tensor, `torch.argsort(|τ|,
  descending=True)[:k]`.
* `random` (dare_linear, dare_ties): keep each entry with probability density, `torch.bernoulli` of a
  float32 tensor filled with density. mergekit draws from torch's global generator, in whatever order its
  scheduler runs the tensors; here each (seed, task, tensor key) has its own generator (`task_seed`, as
  tatr's DARE), so the masks do not depend on the streaming order. Seeding torch's generator with that seed
  before mergekit's `bernoulli` gives the same mask (tests/test_mergekit_config.py).
* `magnitude_outliers` (breadcrumbs, breadcrumbs_ties): with n_top = ⌊γ·n⌋, target = ⌊density·n⌋ and
  n_bot = max(0, n − target − n_top), keep ranks [n_bot, n_bot + target) of |τ| ascending
  (`torch.sort(|τ|)`): drop the γ largest and the smallest, fewer large ones where they would not leave
  `target`.

With `rescale` (mergekit's default for the dare methods), the kept entries are multiplied by
‖τ‖₁ / ‖τ·mask‖₁ (`rescaled_masked_tensor` with `RescaleNorm.l1`), except where either norm is below
1e-7. A density ≥ 1 leaves τ as it is (no rescaling, and no outliers dropped).

Ties: torch's CPU sort is not stable, so which of several equal magnitudes at the cut mergekit keeps is
whatever its `argsort` gives. The keep set is found by exact selection (`kthvalue`, O(n)); only where equal
magnitudes straddle the cut does the same `argsort`/`sort` call as mergekit's decide, so the kept entries
are mergekit's in every case (bf16 task vectors have many equal magnitudes).

Deliberate differences: density 0 (mergekit keeps nothing of that model) is refused at the door, as in
tatr's Breadcrumbs (drop the model instead); a float64 τ keeps float64 in `random` (mergekit's CPU path
rounds it to float32), as tatr's DARE.

The options (`mergekit_density`, read by the three; `mergekit_gamma`; `mergekit_rescale`, default off as
mergekit's ties and breadcrumbs; `mergekit_dare_rescale`, default on as its dare methods; `dare_seed`, shared
with tatr's DARE) are declared once here; a per-model density or γ is one value per task
(`tatr.core.options.task_values`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tatr.core.options import SPARSIFIERS, Option, SparsifierKind
from tatr.core.sparsify import DARE_OPTIONS, Sparsifier, Transform, task_seed

EPS = 1e-7  # mergekit's `rescaled_masked_tensor` eps: below it, a norm is not rescaled to

DENSITY = Option(
    "mergekit_density",
    float,
    1.0,
    "--mergekit-density",
    "mergekit-*: keep this fraction of each tensor of each τ_t (mergekit's density; 1 keeps all)",
    "mergekit density",
    "density",
    low=0.0,
    high=1.0,
    low_open=True,
    metavar="D",
)
GAMMA = Option(
    "mergekit_gamma",
    float,
    0.01,
    "--mergekit-gamma",
    "mergekit-breadcrumbs*: first drop the largest γ fraction of |τ| per tensor (mergekit's gamma)",
    "mergekit gamma",
    "γ",
    low=0.0,
    high=1.0,
    metavar="G",
)
RESCALE = Option(
    "mergekit_rescale",
    int,
    0,
    "--mergekit-rescale",
    "mergekit-ties, -breadcrumbs*: 1 rescales each sparsified tensor to its L1 norm before (mergekit's rescale)",
    "mergekit rescale",
    "rescale",
    low=0,
    high=1,
    metavar="0|1",
)
DARE_RESCALE = Option(
    "mergekit_dare_rescale",
    int,
    1,
    "--mergekit-dare-rescale",
    "mergekit-dare*: 1 rescales each dropped tensor to its L1 norm before (mergekit's rescale), 0 does not",
    "mergekit DARE rescale",
    "rescale",
    low=0,
    high=1,
    metavar="0|1",
)
_SEED = next(o for o in DARE_OPTIONS if o.name == "dare_seed")


def magnitude_keep(tau: Tensor, density: float) -> Tensor:
    """Boolean mask of the entries mergekit's `magnitude` keeps (density < 1)."""
    return _magnitude_keep(tau, density, try_select=True)[0]


def _magnitude_keep(tau: Tensor, density: float, try_select: bool) -> tuple[Tensor, bool]:
    """(`magnitude_keep`'s mask, whether it took mergekit's sort).

    mergekit sorts every |τ| (`argsort`, not stable): where ties straddle the cut only that sort says which
    tied entries stay, so it is run then; otherwise a selection (`kthvalue`, a third of the sort's time)
    determines the set. `try_select=False` goes straight to the sort (the same mask): for the other tasks of a
    tensor that needed it, as bfloat16 models nearly always do."""
    w = tau.abs().reshape(-1).float()
    n = w.numel()
    k = max(1, int(density * n))
    if k >= n:
        return torch.ones(tau.shape, dtype=torch.bool), False
    if try_select:
        value = torch.kthvalue(w, n - k + 1).values  # the k-th largest
        above, equal = w > value, w == value
        if int(above.sum()) + int(equal.sum()) == k:  # no tie straddles the cut: the set is determined
            return (above | equal).view(tau.shape), False
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.argsort(w, descending=True)[:k]] = True  # mergekit's call decides among the ties
    return keep.view(tau.shape), True


def outliers_keep(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Boolean mask of the entries mergekit's `magnitude_outliers` keeps (density < 1)."""
    w = tau.abs().reshape(-1).float()
    n = w.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    low, high = _smallest(w, n_bot), _smallest(w, n_bot + target)
    if low is not None and high is not None:
        return (high & ~low).view(tau.shape)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(w, descending=False).indices[n_bot : n_bot + target]] = True  # mergekit's call
    return keep.view(tau.shape)


def _smallest(w: Tensor, r: int) -> Tensor | None:
    """Mask of the r smallest entries of w when that set is determined (no tie straddles rank r), else None."""
    n = w.numel()
    if r <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if r >= n:
        return torch.ones(n, dtype=torch.bool)
    value = torch.kthvalue(w, r).values
    below, equal = w < value, w == value
    return below | equal if int(below.sum()) + int(equal.sum()) == r else None


def masking(tau: Tensor, keep: Tensor, rescale: bool) -> Transform:
    """x ↦ x·mask, times ‖τ‖₁ / ‖τ·mask‖₁ with `rescale` (mergekit's `rescaled_masked_tensor`, L1); the
    factor is the whole τ's, so the parts of τ (λ_neg) get the pattern of their union."""
    mask = keep.to(tau.dtype)
    factor = None
    if rescale:
        before, after = tau.abs().sum(), (tau * mask).abs().sum()
        if not (before < EPS or after < EPS):
            factor = before / after

    def apply(x: Tensor) -> Tensor:
        masked = x * mask.to(x.dtype)
        return masked if factor is None else masked * factor.to(x.dtype)

    return apply


def _identity(x: Tensor) -> Tensor:
    return x


def _magnitude(values: Mapping[str, Any], key: str) -> Sparsifier:
    density, rescale = float(values["mergekit_density"]), bool(values["mergekit_rescale"])
    sorted_before = False  # a task of this tensor needed mergekit's sort: the next ones most likely will too

    def for_task(task: int, tau: Tensor) -> Transform:
        nonlocal sorted_before
        if density >= 1:
            return _identity
        keep, sorted_now = _magnitude_keep(tau, density, try_select=not sorted_before)
        sorted_before = sorted_before or sorted_now
        return masking(tau, keep, rescale)

    return for_task


def _random(values: Mapping[str, Any], key: str) -> Sparsifier:
    density, rescale = float(values["mergekit_density"]), bool(values["mergekit_dare_rescale"])
    seed = values["dare_seed"]

    def for_task(task: int, tau: Tensor) -> Transform:
        if density >= 1:
            return _identity
        generator = torch.Generator().manual_seed(task_seed(seed, task, key))
        keep = torch.bernoulli(torch.full(tau.shape, density, dtype=torch.float32), generator=generator)
        return masking(tau, keep.bool(), rescale)

    return for_task


def _outliers(values: Mapping[str, Any], key: str) -> Sparsifier:
    density, gamma = float(values["mergekit_density"]), float(values["mergekit_gamma"])
    rescale = bool(values["mergekit_rescale"])

    def for_task(task: int, tau: Tensor) -> Transform:
        return _identity if density >= 1 else masking(tau, outliers_keep(tau, density, gamma), rescale)

    return for_task


SPARSIFIERS.add("magnitude", SparsifierKind("magnitude", (DENSITY, RESCALE), make=_magnitude))
SPARSIFIERS.add("random", SparsifierKind("random", (DENSITY, DARE_RESCALE, _SEED), make=_random))
SPARSIFIERS.add("magnitude-outliers", SparsifierKind("magnitude-outliers", (DENSITY, GAMMA, RESCALE), make=_outliers))
