"""One generalized task-arithmetic merge; TA, TIES, DARE, Breadcrumbs and averaging are configurations of it.

    sparsify each τ_t (TIES: keep each task's top-k% |τ| over the whole model; DARE: drop entries at
    random and rescale; Breadcrumbs: keep a band of |τ| per tensor) → sign consensus (TIES: elect
    the sign of Σ_t sparsified τ_t, keep only agreeing entries) → reduce (sum or mean) → scale by λ.

TIES comes in two configurations, each with its own name and label:

* `ties-sum`, "TIES (dis-sum)": TIES as published for CLIP ViT merging, i.e. as run by
  AdaMerging's `src/main_ties_merging.py` (K=20, `merge_func="dis-sum"`, λ=0.3). The 72.4 of
  ViT-B/32 and the TATR paper's TIES+TATR rows come from this code.
* `ties-mean`, "TIES (dis-mean)": the TIES paper's disjoint mean, with the same trim and sign.

Both follow `ties_merging_utils.py` exactly (see `tatr.core.trust_region.ties_keep_rank` for the trim):
the elected sign of a coordinate is sign(Σ_t trimmed τ_t); where that sum is exactly 0 it is the
model-wide majority sign(Σ_coordinates sign(Σ_t trimmed τ_t)) (`resolve_zero_signs`), and when
that majority is itself 0 the reference keeps the negative entries (`sign > 0` is false). The
majority is a global quantity; `SignedSums.finish` therefore returns the "+" choice plus the few
zero-sum coordinates' "−" alternative, and the merge fixes those once every tensor is seen.

DARE and Breadcrumbs follow mergekit's `GeneralizedTaskArithmeticMerge` configurations as they were
before mergekit 0.1 (the sparsifiers themselves are `tatr.core.sparsify`):

* `dare`, "DARE": mergekit's `dare_linear` (random drop with rescaling, no consensus, sum).
* `dare-ties`, "DARE-TIES": mergekit's `dare_ties` (the same drop, then the sign election of its
  `get_mask(method="sum")`, disjoint sum: `normalize` is false there). Where Σ_t τ_t is exactly 0
  mergekit elects + (`sign_weight >= 0`), not TIES' model-wide majority (`zero_sum_positive`).
* `breadcrumbs`, "Breadcrumbs": mergekit's `breadcrumbs` (per-tensor magnitude band, sum).

mergekit 0.1.5's are `mergekit-ties`, `mergekit-dare-linear`, `mergekit-dare-ties`, `mergekit-breadcrumbs` and
`mergekit-breadcrumbs-ties` (its sparsifiers, L1 rescaling, density per tensor and per model:
`tatr.core.mergekit_sparsify`), and any configuration summing task vectors takes mergekit's per-model
`weight` and `normalize` (`MergeMethod.weighted`; the sums are `tatr.core.signed_sums`), which is how
`tatr merge --config` (`tatr.io.mergekit_config`) reads a mergekit YAML.

The trust-region mask and the component selection act on each τ_t *before* sparsification: they
define which parts of a task vector are admissible at all, as the TATR paper applies its mask to
the task vectors before running the TIES code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from tatr.core import consensus as _consensus  # noqa: F401  # registers the consensus combiner and its options
from tatr.core import sparsify as _sparsify  # noqa: F401  # registers the sparsifiers and their options
from tatr.core import svd_merges as _svd_merges  # noqa: F401  # registers TSV-M, Iso-C, Iso-CTS

# isort: split
# registered after the combiners above, so that their options keep their store columns' order
from tatr.core import fisher as _fisher  # noqa: F401  # registers Fisher merging, its options and statistics
from tatr.core import mergekit_sparsify as _mergekit_sparsify  # noqa: F401  # mergekit 0.1.5's sparsifiers
from tatr.core import regmean as _regmean  # noqa: F401  # registers RegMean, its option and statistics
from tatr.core.errors import TatrError
from tatr.core.options import COMBINERS, SPARSIFIERS, Option, all_options, check_per_task
from tatr.core.registry import Registry
from tatr.core.signed_sums import SignedSums  # noqa: F401  # the reductions' sums, imported from here
from tatr.core.trust_region import TR_MODES


@dataclass(frozen=True)
class MergeMethod:
    name: str
    label: str  # the one display name of this configuration (tables, reports, W&B)
    # a registered sparsifier (`tatr.core.options.SPARSIFIERS`): none; top-k, TIES' model-wide trim; dare,
    # breadcrumbs, per tensor (`tatr.core.sparsify`). The method reads that sparsifier's options.
    sparsify: str
    elect_sign: bool  # TIES sign election and disjoint reduction
    reduce: Literal["sum", "mean"]  # with elect_sign: the disjoint sum or the disjoint mean
    default_lam: float
    summary: str
    zero_sum_positive: bool = False  # elect + where Σ_t τ_t = 0 (mergekit), not the model-wide majority
    # "fixed": λ is given (or tuned on a grid); "task"/"layer": AdaMerging learns one λ per task or per
    # parameter tensor on unlabeled inputs (`tatr.core.adamerging`), so there is no fixed-λ merge
    coefficients: Literal["fixed", "task", "layer"] = "fixed"
    # a registered per-key combiner (`tatr.core.options.COMBINERS`: TSV-M, Iso-C, …) that replaces the
    # sign election and reduction: it sees the T masked task vectors of one tensor together
    combine: str | None = None
    # mergekit's per-model `weight`: each task's sparsified τ_t is multiplied by its weight before the sign
    # election, and the mean divides by the weights' sum (`weighted`); None: every weight is 1
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        SPARSIFIERS.get(self.sparsify)  # an unknown sparsifier is refused when the method is declared
        if self.combine is not None:
            COMBINERS.get(self.combine)

    @property
    def learned(self) -> bool:
        return self.coefficients != "fixed"

    def weighted(self, weights: Sequence[float] | None = None, normalize: bool | None = None) -> MergeMethod:
        """This configuration with mergekit's per-model `weight` and `normalize` (None: as declared).

        `normalize` chooses the reduction: the sum, or the mean, which divides by the weights' sum (mergekit:
        by Σ_t w_t, or where it is below 1e-8 in magnitude by 1; with the sign election by the sum of the
        weights of the tasks the election keeps at each coordinate, or 1 where there are none). With every
        weight 1 that is TA's 1/T and TIES' disjoint mean. Weights scale each task's sparsified τ_t, so the
        trust region's Ω and the sparsifiers see the task vectors as they are, as for λ."""
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if not weights or not all(math.isfinite(w) for w in weights):
                raise TatrError(f"per-task weights must be finite numbers, one per task, got {list(weights)}")
            if self.combine is not None:
                raise TatrError(f"per-task weights apply to the sum of task vectors, not to {self.name}'s combiner")
        reduce = self.reduce if normalize is None else ("mean" if normalize else "sum")
        if weights == self.weights and reduce == self.reduce:
            return self
        return replace(self, weights=weights, reduce=reduce)

    @property
    def trim(self) -> bool:
        """Keep each task's top-k% magnitudes over the whole model (TIES): needs a pass of its own."""
        return self.sparsify == "top-k"

    @property
    def options(self) -> tuple[str, ...]:
        """The merge options this configuration reads (e.g. `ties_k`, `dare_p`)."""
        return tuple(o.name for o in self.declared_options)

    @property
    def declared_options(self) -> tuple[Option, ...]:
        """The declarations of the options this configuration reads (`tatr.core.options.Option`)."""
        combined = COMBINERS.get(self.combine).options if self.combine is not None else ()
        return (*SPARSIFIERS.get(self.sparsify).options, *combined)

    @property
    def statistics(self) -> str | None:
        """The per-task statistics its combiner reads ("fisher", "gram"; `tatr merge --statistics`), or None."""
        if self.combine is None:
            return None
        kind = COMBINERS.get(self.combine).statistics
        return None if kind is None else kind.name

    def check_statistics(self, given: bool) -> None:
        """Statistics (`--statistics`) go with exactly the methods whose combiner reads them (one line each)."""
        if self.statistics is not None and not given:
            what = COMBINERS.get(self.combine).statistics.what  # type: ignore[arg-type, union-attr]
            raise TatrError(f"method '{self.name}' needs per-task {what} statistics (--statistics, one file per task)")
        if self.statistics is None and given:
            users = ", ".join(m.name for m in METHODS.values() if m.statistics is not None)
            raise TatrError(f"statistics (--statistics) apply to {users}, not to method '{self.name}'")

    def check_tasks(self, values: Mapping[str, object], tasks: int) -> None:
        """One weight per task, and per-task option values only where the method reads them per tensor, one
        per task (`tatr.core.options.check_per_task`): one line each, once the number of tasks is known."""
        if self.weights is not None and len(self.weights) != tasks:
            raise TatrError(f"{len(self.weights)} per-task weights for {tasks} tasks; give one weight per task")
        check_per_task(values, self.sparsify, tasks)

    @property
    def linear(self) -> bool:
        """Linear in the task vectors: a shared mask commutes with the merge (the fast path; per-task weights
        take the streamed path, which applies them)."""
        return self.sparsify == "none" and not self.elect_sign and self.combine is None and self.weights is None


# Registration order is the order tables list the methods in (simplest first).
METHODS: Registry[MergeMethod] = Registry("merge method")
for _m in (
    MergeMethod(
        "average", "Averaging", "none", False, "mean", 1.0, "simple averaging: θ0 + λ·mean τ_t (λ=1: weight average)"
    ),
    MergeMethod("ta", "TA", "none", False, "sum", 0.3, "task arithmetic: θ0 + λ Σ τ_t"),
    MergeMethod(
        "ties-sum",
        "TIES (dis-sum)",
        "top-k",
        True,
        "sum",
        0.3,
        "TIES as published (AdaMerging main_ties_merging.py): top-k% per task, elected sign, disjoint sum",
    ),
    MergeMethod(
        "ties-mean",
        "TIES (dis-mean)",
        "top-k",
        True,
        "mean",
        0.3,
        "TIES paper's reduction: top-k% per task, elected sign, disjoint mean",
    ),
    MergeMethod(
        "dare",
        "DARE",
        "dare",
        False,
        "sum",
        0.3,
        "DARE on TA (mergekit dare_linear): drop each entry with probability p, rescale by 1/(1-p), sum",
    ),
    MergeMethod(
        "dare-ties",
        "DARE-TIES",
        "dare",
        True,
        "sum",
        0.3,
        "DARE with TIES' sign election (mergekit dare_ties): random drop and rescale, elected sign, disjoint sum",
        zero_sum_positive=True,
    ),
    MergeMethod(
        "breadcrumbs",
        "Breadcrumbs",
        "breadcrumbs",
        False,
        "sum",
        0.3,
        "Model Breadcrumbs (mergekit breadcrumbs): per tensor drop the top β and the smallest |τ|, keep density, sum",
    ),
    MergeMethod(
        "adamerging-task",
        "AdaMerging (task-wise)",
        "none",
        False,
        "sum",
        0.3,
        "AdaMerging: one λ per task, learned by entropy minimisation on unlabeled inputs (ablation files only)",
        coefficients="task",
    ),
    MergeMethod(
        "adamerging-layer",
        "AdaMerging (layer-wise)",
        "none",
        False,
        "sum",
        0.3,
        "AdaMerging: one λ per parameter tensor and task, learned on unlabeled inputs (ablation files only)",
        coefficients="layer",
    ),
    MergeMethod(
        "tsv-m",
        "TSV-M",
        "none",
        False,
        "sum",
        1.0,
        "task singular vectors (FusionBench TSVM_utils): per 2-D tensor each task's top int(k/T) singular triplets,"
        " stacked U and Vᵀ replaced by their polar factors; other tensors the mean τ_t",
        combine="tsv-m",
    ),
    MergeMethod(
        "iso-c",
        "Iso-C",
        "none",
        False,
        "sum",
        1.0,
        "isotropic merging (FusionBench iso_c): Σ τ_t with a flat spectrum; other tensors the mean",
        combine="iso-c",
    ),
    MergeMethod(
        "iso-cts",
        "Iso-CTS",
        "none",
        False,
        "sum",
        1.0,
        "isotropic merging in common and task-specific subspaces (FusionBench iso_cts); other tensors the mean",
        combine="iso-cts",
    ),
    MergeMethod(
        "consensus-ta",
        "Consensus TA",
        "none",
        False,
        "sum",
        0.3,
        "consensus merging (TALL masks): TA on the coordinates at least k tasks' masks hold",
        combine="consensus",
    ),
    MergeMethod(
        "fisher",
        "Fisher",
        "none",
        False,
        "sum",
        1.0,
        "Fisher merging (FusionBench fisher_merging): Σ F_t θ_t / Σ F_t per coordinate, each task's diagonal Fisher"
        " F_t from --statistics; other tensors the mean",
        combine="fisher",
    ),
    MergeMethod(
        "regmean",
        "RegMean",
        "none",
        False,
        "sum",
        1.0,
        "RegMean (FusionBench regmean): per linear weight (Σ G_t)⁻¹ Σ G_t W_t, G_t the Gram matrices of its inputs"
        " from --statistics; other tensors the mean",
        combine="regmean",
    ),
):
    METHODS.add(_m.name, _m)

# mergekit 0.1.5's generalized task arithmetic (`merge_methods/registry.py`): its sparsifier per tensor and
# model (`tatr.core.mergekit_sparsify`), its weights (`MergeMethod.weighted`), the election of its
# `get_mask(method="sum")` (+ where Σ_t w_t·τ_t = 0), λ = 1; each reduces as its `normalize` defaults.
# mergekit's task_arithmetic and linear are TA with weights (`tatr.io.mergekit_config`).
for _name, _label, _kind, _elect, _what in (
    ("mergekit-ties", "TIES (mergekit)", "magnitude", True, "keep each τ_t's top density of |τ| per tensor"),
    ("mergekit-dare-linear", "DARE (mergekit)", "random", False, "drop with probability 1 − density, L1 rescale"),
    ("mergekit-dare-ties", "DARE-TIES (mergekit)", "random", True, "drop with probability 1 − density, L1 rescale"),
    ("mergekit-breadcrumbs", "Breadcrumbs (mergekit)", "magnitude-outliers", False, "drop top γ, keep density"),
    (
        "mergekit-breadcrumbs-ties",
        "Breadcrumbs-TIES (mergekit)",
        "magnitude-outliers",
        True,
        "drop top γ, keep density",
    ),
):
    _reduce = "mean" if _name == "mergekit-ties" else "sum"
    _how = "elected sign (+ where Σ_t w_t·τ_t = 0), disjoint " if _elect else ""
    _summary = (
        f"{_name.removeprefix('mergekit-').replace('-', '_')} of mergekit 0.1.5: {_what}, weighted, {_how}{_reduce}"
    )
    METHODS.add(_name, MergeMethod(_name, _label, _kind, _elect, _reduce, 1.0, _summary, zero_sum_positive=_elect))


def get_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def fixed_method(name: str) -> MergeMethod:
    """A method that merges with a given λ: AdaMerging's learned coefficients are refused in one line (its
    fixed-λ merge would silently be TA at λ = 0.3)."""
    method = get_method(name)
    if method.learned:
        raise TatrError(
            f"{name} ({method.label}) learns its coefficients on a suite's unlabeled inputs and cannot merge with a "
            f"fixed λ: run it in an ablation file (`tatr ablate`, variant {{method: {name}}})"
        )
    return method


def fixed_methods() -> list[str]:
    """The names `tatr merge` and sweeps accept."""
    return [m.name for m in METHODS.values() if not m.learned]


def merge_label(method: str, trust_region: str | None = None) -> str:
    """The display label of a merge configuration: the method's label, then its trust-region mode's,
    e.g. "TA", "TA+TR", "TIES (dis-sum)+TR (exemplar)". Both names must be registered."""
    label = get_method(method).label
    return label if trust_region is None else label + TR_MODES.get(trust_region).label


def uses_option(name: object, option: str) -> bool:
    """True for a configuration that reads the merge option `option` (so stores and reports record it)."""
    return isinstance(name, str) and name in METHODS and option in METHODS.get(name).options


def option_users(option: str) -> list[str]:
    """The registered methods that read `option` (for "--drop-rate applies to dare, dare-ties")."""
    return [m.name for m in METHODS.values() if option in m.options]


def unread_identity_options(name: object) -> set[str]:
    """The options that leave a point's identity for method `name`: the options that enter it only
    where read ("read") and that this method does not read."""
    return {o.name for o in all_options() if o.identity == "read" and not uses_option(name, o.name)}


def uses_ties_k(name: object) -> bool:
    """True for a configuration that reads `ties_k` (so stores and reports record it)."""
    return uses_option(name, "ties_k")
