"""Per-tensor sparsifiers of one task vector: DARE's random drop and Model Breadcrumbs' magnitude band.

Both act on one tensor of one task at a time, after the trust-region mask and the component
selection (as TIES' trim does), so a merge that uses them streams like TA: its memory does not grow
with the number of tasks. Each follows mergekit's `mergekit/sparsify.py` as it was before 0.1 (the
version its `GeneralizedTaskArithmeticMerge` called with `rescale=`); mergekit 0.1.5's sparsifiers, which
rescale to the L1 norm and keep one density per model, are `tatr.core.mergekit_sparsify`:

* **DARE** (Yu et al., "Language Models are Super Mario", 2024), mergekit's `bernoulli(tensor,
  density=1−p, rescale=True)`: keep = Bernoulli(1−p) drawn as float32 (`torch.bernoulli` of a
  tensor filled with 1−p), τ' = (τ·keep) / (1−p). mergekit draws from torch's global generator;
  here each (seed, task, tensor key) has its own generator, seeded by a stable hash of the three
  (`task_seed`), so the same seed gives the same masks whatever order the tensors are streamed in,
  whichever other keys the model has, and in any process. A float64 model's τ is masked and
  rescaled in float64 (mergekit would round it to float32 on the CPU); float32 as mergekit.
* **Model Breadcrumbs** (Davari & Belilovsky, 2024), mergekit's `magnitude_outliers(tensor, density,
  rescale=False, gamma=β)`: per tensor of n entries, drop the ⌊β·n⌋ largest |τ| and the smallest, so
  that ⌊density·n⌋ are kept (if rounding leaves a negative bottom count, fewer large ones are dropped,
  as mergekit does). Two deliberate differences, both where mergekit's result is arbitrary or
  empty: ties in |τ| are broken by index (a stable order; mergekit's `torch.sort` is unstable, so
  which of two equal magnitudes it keeps is unspecified), and when ⌊β·n⌋ = 0 nothing large is
  dropped (mergekit's `indices[n_bot:-0]` is empty there, so it drops the *whole* tensor: every
  tensor of fewer than 1/β entries, e.g. a bias of 64 at β = 0.01).

Defaults: DARE p = 0.5 and λ = 0.3 are FusionBench's CLIP-ViT DARE configuration
(`config/method/dare/task_arithmetic.yaml`: sparsity_ratio 0.5, scaling_factor 0.3); mergekit's own
default density is 1.0, i.e. no drop. Breadcrumbs β = 0.01 is mergekit's default `gamma`, density
0.9 the example of mergekit's merge-method guide (drop the top 1% and the bottom 9%).

Ranges: DARE p in [0, 1); Breadcrumbs β in [0, 1] and density in (0, 1] with β + density ≤ 1. Density 0
(mergekit accepts it) keeps no coordinate, so the merge would silently be θ_0: it is refused, as is a
density that keeps no entry even of the model's largest tensor (`check_breadcrumbs_keeps`, where the
sizes are known). β = 0 is meaningful and accepted: it drops no outliers (plain magnitude pruning).

Each option (and TIES' k, whose trim is a model-wide pass in `tatr.core.passes`) is declared once below
(`tatr.core.options.Option`: name, type, default, range, flag, help, identity) and registered with its
sparsifier in `SPARSIFIERS`; the config, flags, store columns, search space and labels derive from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from tatr.core.errors import TatrError
from tatr.core.options import SPARSIFIERS, Option, SparsifierKind, check_options, defaults, task_values

DARE_P = 0.5
DARE_SEED = 0
BREADCRUMBS_BETA = 0.01
BREADCRUMBS_DENSITY = 0.9
_SLACK = 1e-12  # β + density ≤ 1 up to float rounding (0.1 + 0.9 is fine, whatever its last bit)

Transform = Callable[[Tensor], Tensor]  # applies one task's sparsity pattern to (a part of) its τ
Sparsifier = Callable[[int, Tensor], Transform]  # (task, its admissible τ of one tensor) -> transform


def _density_above_zero(density: float) -> None:
    if float(density) <= 0.0:
        raise TatrError(
            f"Breadcrumbs density must be above 0: density {density!r} keeps no coordinate of any task vector, "
            "so the merge would be θ_0 (β = 0 alone is fine: it drops no outliers)"
        )


def _band_fits(values: Mapping[str, Any]) -> None:
    beta, density = values["breadcrumbs_beta"], values["breadcrumbs_density"]
    if float(beta) + float(density) > 1.0 + _SLACK:
        raise TatrError(
            f"Breadcrumbs β + density must be at most 1 (β drops the largest, density keeps the next), "
            f"got β={beta!r} + density={density!r}"
        )


TIES_K = 20.0
# TIES' trim (top-k% of |τ| per task over the whole model: a pass of its own, `tatr.core.passes`).
# Its k is in every point's identity, as in the first stores.
TIES_K_OPTION = Option(
    "ties_k",
    float,
    TIES_K,
    "--ties-k",
    "TIES: keep top-k% magnitudes per task",
    "ties_k",
    "k",
    low=0.0,
    high=100.0,
    low_open=True,
    unit="%",
    metavar="K",
    identity="always",
)
DARE_OPTIONS = (
    Option(
        "dare_p",
        float,
        DARE_P,
        "--drop-rate",
        "DARE: drop each entry of τ_t with probability p in [0, 1)",
        "DARE drop rate p",
        "p",
        low=0.0,
        high=1.0,
        high_open=True,
        metavar="P",
    ),
    Option(
        "dare_seed",
        int,
        DARE_SEED,
        "--seed",
        "DARE: seed of the per-task masks (same seed, same masks)",
        "DARE seed",
        "seed",
        low=0,
        metavar="N",
    ),
)
BREADCRUMBS_OPTIONS = (
    Option(
        "breadcrumbs_beta",
        float,
        BREADCRUMBS_BETA,
        "--beta",
        "Breadcrumbs: drop the largest β fraction of |τ| per tensor",
        "Breadcrumbs β (beta)",
        "β",
        low=0.0,
        high=1.0,
        metavar="B",
    ),
    Option(
        "breadcrumbs_density",
        float,
        BREADCRUMBS_DENSITY,
        "--density",
        "Breadcrumbs: keep this fraction per tensor, in (0, 1], β + density ≤ 1",
        "Breadcrumbs density",
        "density",
        low=0.0,
        high=1.0,
        metavar="D",
        more=_density_above_zero,
    ),
)


@dataclass(frozen=True)
class Sparsity:
    """DARE's and Breadcrumbs' options as one value (the API's older spelling of them; a merge takes any
    mapping of option values, `tatr.core.options.check_options`); checked through their declarations."""

    dare_p: float = DARE_P
    dare_seed: int = DARE_SEED
    breadcrumbs_beta: float = BREADCRUMBS_BETA
    breadcrumbs_density: float = BREADCRUMBS_DENSITY

    def __post_init__(self) -> None:
        check_options(asdict(self))

    def values(self) -> dict[str, Any]:
        return {**defaults(), **asdict(self)}


def _keeps(values: Mapping[str, Any], sizes: Iterable[int]) -> None:
    check_breadcrumbs_keeps(values["breadcrumbs_density"], sizes)


def check_breadcrumbs_keeps(density: float, sizes: Iterable[int]) -> None:
    """Refuse a density that keeps no entry of any tensor of the model (the merge would be θ_0).

    Breadcrumbs keeps ⌊density·n⌋ entries of a tensor of n, whatever β (`breadcrumbs_counts`), so it
    keeps nothing anywhere when even the largest of the model's floating tensors (`sizes`) rounds to
    0. A door check from the file headers: a density that keeps something of a tensor no task changed
    passes here and keeps nothing in the merge."""
    largest = max(sizes, default=0)
    if float(density) < 1.0 and largest > 0 and int(float(density) * largest) == 0:
        raise TatrError(
            f"Breadcrumbs density {density!r} keeps no coordinate: ⌊density·n⌋ = 0 even for the model's largest "
            f"tensor (n = {largest:,}), so the merge would be θ_0; give a density above 1/{largest}"
        )


def task_seed(seed: int, task: int, key: str) -> int:
    """The generator seed of one task's DARE mask on one tensor: a stable hash of (seed, task, key).

    Not Python's `hash` (salted per process) and not a counter over the tensors streamed so far
    (which would tie a mask to the streaming order and to the model's other keys)."""
    digest = hashlib.sha256(f"tatr-dare\0{seed}\0{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_keep(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator) -> Tensor:
    """DARE's keep mask as mergekit draws it: `torch.bernoulli` of a float32 tensor filled with 1−p."""
    return torch.bernoulli(torch.full(shape, 1.0 - p, dtype=torch.float32), generator=generator)


def dare(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """τ with each entry dropped with probability p and the survivors divided by 1−p (p = 0: τ)."""
    return _dare_transform(tau.shape, p, generator)(tau)


def _dare_transform(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator) -> Transform:
    if p == 0:
        return lambda x: x
    keep = dare_keep(shape, p, generator)
    density = 1.0 - p

    def apply(x: Tensor) -> Tensor:
        res = x.to(torch.float32) * keep if x.dtype != torch.float64 else x * keep.to(torch.float64)
        res /= density
        return res.to(x.dtype)

    return apply


def breadcrumbs_counts(n: int, beta: float, density: float) -> tuple[int, int]:
    """(entries dropped at the bottom, entries dropped at the top) of a tensor of n, as mergekit counts."""
    target = int(density * n)
    n_top = int(beta * n)
    n_bot = n - target - n_top
    if n_bot < 0:  # rounding: drop fewer large entries so that `target` are kept (mergekit's rule)
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def breadcrumbs_keep(tau: Tensor, beta: float, density: float) -> Tensor:
    """Boolean mask of the entries Breadcrumbs keeps: ranks [n_bot, n − n_top) of |τ| ascending.

    Ranks follow a stable order (ties by index). Two exact selections (`kthvalue`, O(n)) instead of
    a full sort: at ViT shapes a sort per task and tensor would dominate the merge."""
    if density >= 1:
        return torch.ones(tau.shape, dtype=torch.bool)
    w = tau.abs().reshape(-1)
    n = w.numel()
    n_bot, n_top = breadcrumbs_counts(n, beta, density)
    keep = _smallest(w, n - n_top) & ~_smallest(w, n_bot)
    return keep.view(tau.shape)


def _smallest(w: Tensor, r: int) -> Tensor:
    """Mask of the r smallest entries of w in stable ascending order (equal values: lower index first)."""
    n = w.numel()
    if r <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if r >= n:
        return torch.ones(n, dtype=torch.bool)
    value = torch.kthvalue(w, r).values
    below = w < value
    equal = w == value
    need = r - int(below.sum())
    if int(equal.sum()) == need:
        return below | equal
    return below | (equal & (torch.cumsum(equal, 0) <= need))


def breadcrumbs(tau: Tensor, beta: float, density: float) -> Tensor:
    """τ outside the kept magnitude band set to 0."""
    keep = breadcrumbs_keep(tau, beta, density)
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype))


def sparsifier(kind: str, options: Sparsity | Mapping[str, Any], key: str) -> Sparsifier | None:
    """The per-task sparsifier of one tensor for a method's `sparsify` kind; None when it has none here.

    It returns a *transform* rather than the sparsified τ so that one pattern (one DARE draw, one
    magnitude band of the whole admissible τ) can be applied to parts of τ as well: the λ_neg merge
    scales the negative component apart from the rest (`tatr.core.merging`). An option with one value per
    task (`tatr.core.options.task_values`) gives each task the sparsifier of its own values."""
    values = options.values() if isinstance(options, Sparsity) else {**defaults(), **options}
    make = SPARSIFIERS.get(kind).make
    if make is None:
        return None
    tasks = task_values(values)  # options with one value per task (mergekit's per-model density)
    if tasks is None:
        return make(values, key)
    made = [make(task, key) for task in tasks]
    return lambda t, tau: made[t](t, tau)


def _dare_sparsifier(values: Mapping[str, Any], key: str) -> Sparsifier:
    p, seed = values["dare_p"], values["dare_seed"]

    def dare_for(task: int, tau: Tensor) -> Transform:
        generator = torch.Generator().manual_seed(task_seed(seed, task, key))
        return _dare_transform(tau.shape, p, generator)

    return dare_for


def _breadcrumbs_sparsifier(values: Mapping[str, Any], key: str) -> Sparsifier:
    beta, density = values["breadcrumbs_beta"], values["breadcrumbs_density"]

    def breadcrumbs_for(task: int, tau: Tensor) -> Transform:
        keep = breadcrumbs_keep(tau, beta, density)
        return lambda x: torch.where(keep, x, torch.zeros((), dtype=x.dtype))

    return breadcrumbs_for


# Registration order is the order of the options' store columns, config fields and flags.
SPARSIFIERS.add("none", SparsifierKind("none"))
SPARSIFIERS.add("top-k", SparsifierKind("top-k", (TIES_K_OPTION,)))
SPARSIFIERS.add("dare", SparsifierKind("dare", DARE_OPTIONS, make=_dare_sparsifier))
SPARSIFIERS.add(
    "breadcrumbs",
    SparsifierKind("breadcrumbs", BREADCRUMBS_OPTIONS, make=_breadcrumbs_sparsifier, together=_band_fits, sizes=_keeps),
)
