"""The trust region: conflict scores Ω, the modes, and how many coordinates q drops.

Conflict. Ω = Σ_{i≠j} s_i ⊙ a_j, with a_j = |τ_j|. Expanding (Σ s)(Σ a) − Σ s⊙a is O(T) but
cancels catastrophically where one task dominates a coordinate (float32 loses every digit there;
see the tests). The same running sums, ordered as prefix sums, give an O(T) form with no
subtraction at all: adding task i contributes s_i ⊙ A_{<i} + a_i ⊙ S_{<i}, where S_{<i}, A_{<i}
are the sums over the tasks before it. Every term is ≥ 0, so float32 suffices: each product and
each of the ≤ 2T additions rounds once, and the result is within (2T+2)·2⁻²⁴ relative of the
pairwise sum, coordinate by coordinate (checked against the literal O(T²) loop in the tests). The
modes only change s and a: zero-shot s=|τ|; exemplar s=mean|∇ℓ|; gradient-only a=1, so
Ω=(T−1)Σs_i; magnitude-only s=1, so Ω=(T−1)Σ|τ_j| (the constant T−1 does not move the mask).

The checks the paper leaves open (docs/method.md, "Other conflict scores") are modes too, each reading
one per-task statistic (`TrustRegionMode.statistic`) beside |τ|:
* diag-fisher: s = mean (∇ℓ)² over the exemplars (the diagonal empirical Fisher), a = |τ|.
* gradient-agreement: Ω = Σ_{i≠j} [ḡ_i·ḡ_j < 0]·|ḡ_i|·|τ_j| with ḡ the signed mean gradient: task i's
  sensitivity counts against task j's move only where their mean gradients point in strictly opposite
  directions (a zero gradient agrees with everything). The indicator does not factor into s_i·a_j,
  but it does after splitting by sign: with P = |ḡ|·[ḡ>0], N = |ḡ|·[ḡ<0] and the move split by the
  same sign, A⁺ = |τ|·[ḡ>0], A⁻ = |τ|·[ḡ<0], Ω = Σ_{i≠j} P_i·A⁻_j + N_i·A⁺_j: two channels of the
  same prefix sums, every term ≥ 0 (s and a carry a leading channel axis, summed by `omega`).
* zero-shot-per-tensor: s_i = |τ_i| / mean|τ_i| over the tensor (0 where τ_i is 0 on the whole
  tensor), a = |τ|: the zero-shot proxy without its quadratic dependence on a layer's scale.
* zero-shot-theta0: s_i = |τ_i|·|θ_0|, a = |τ|, so Ω = |θ_0| × the zero-shot Ω: a conflict costs more
  on the weights the pretrained function relies on (magnitude pruning's evidence). Chosen over the
  relative move |τ|/(|θ_0|+ε), whose ε would decide the ranking wherever θ_0 ≈ 0 (biases and
  LayerNorm shifts start at 0) and would rank exactly those coordinates first.

Selection. The mask drops exactly k = ⌈(1−q)·N⌉ coordinates with the largest Ω over all N merged
coordinates (q from its decimal text, so q=0.99 with N=100 drops 1, not 2), found exactly in O(N) by
`tatr.core.exact_selection` (ties by canonical position: keys sorted by name, then row-major index).

Relation to FusionBench's "keep Ω < sorted(Ω)[min(int(N·q), N−1)]": without ties, and where N·q
rounds the way its decimal does, both drop ⌈(1−q)N⌉ coordinates. Otherwise that rule drops more:
every coordinate tied at the threshold value; at q=1 (the index clamped to N−1) every coordinate
tied at the maximum, at least one; and one extra where `int(N*q)` truncates a binary product just
below an integer (N=100, q=0.29: 28.999… → 28, so 72 dropped, not 71). Here the count is always
exactly ⌈(1−q)N⌉ and q=1 drops nothing (tests/test_fusionbench_convention.py transcribes that rule).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from tatr.core.errors import TatrError
from tatr.core.registry import Registry, unknown_name

# (s, a) for one task and tensor from mag = |τ| and stat = the task's tensor of the mode's `statistic`
# (None where it reads none); None stands for 1. s and a may carry a leading channel axis (`ConflictAccumulator`).
ConflictRule = Callable[[Tensor, Tensor | None], tuple[Tensor | None, Tensor | None]]

# What a mode's rule reads beside |τ| (`TrustRegionMode.statistic`): an exemplar gradient moment at θ_0, named
# as `tatr.core.gradients.MOMENTS` and the suites' `ExemplarGradients` fields name it, or θ_0 itself.
GRADIENT_STATISTICS = {"abs_mean": "mean |∇ℓ|", "sq_mean": "mean (∇ℓ)²", "signed_mean": "signed mean ∇ℓ"}
PRETRAINED = "pretrained"  # |θ_0| of the tensor: needs no data


@dataclass(frozen=True)
class TrustRegionMode:
    """Everything tatr knows about one trust-region mode, in one place.

    `label` is what the mode adds to a merge method's display label ("TA" + "+TR (exemplar)"), so
    tables, figures and W&B never spell a mode themselves. `rule` is the mode's (s, a) in
    Ω = Σ_{i≠j} s_i ⊙ a_j (see the module docstring); "off" has none: it computes no Ω. `statistic` is
    what the rule's second argument holds: a key of `GRADIENT_STATISTICS` (a merge's `gradients` files
    for abs_mean and sq_mean, its `signed_gradients` for signed_mean), `PRETRAINED`, or None.
    """

    name: str
    label: str
    statistic: str | None
    rule: ConflictRule | None

    @property
    def needs_gradients(self) -> bool:
        """Reads exemplar gradients, so a run with this mode draws exemplars."""
        return self.statistic in GRADIENT_STATISTICS


def _zero_shot(mag: Tensor, grad: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return mag, mag  # the same tensor twice: ConflictAccumulator then adds 2·a_i ⊙ A_{<i}


def _exemplar(mag: Tensor, grad: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return grad, mag


def _gradient_only(mag: Tensor, grad: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return grad, None


def _magnitude_only(mag: Tensor, grad: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return None, mag


def _agreement(mag: Tensor, signed: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Two channels: (P, A⁻) and (N, A⁺), so Σ_c Σ_{i≠j} s_i[c]·a_j[c] = Σ_{i≠j} [ḡ_i·ḡ_j < 0]·|ḡ_i|·|τ_j|."""
    assert signed is not None
    zero = torch.zeros((), dtype=mag.dtype)
    up, down = signed > 0, signed < 0  # −0.0 and 0 in neither: a zero gradient conflicts with nothing
    size = signed.abs().to(mag.dtype)
    s = torch.stack((torch.where(up, size, zero), torch.where(down, size, zero)))
    a = torch.stack((torch.where(down, mag, zero), torch.where(up, mag, zero)))
    return s, a


def _per_tensor(mag: Tensor, _: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """s = |τ| / mean|τ| of the tensor (the mean in float64, then one float32 division), a = |τ|."""
    mean = float(mag.sum(dtype=torch.float64)) / mag.numel() if mag.numel() else 0.0
    return (mag / mean if mean > 0 else torch.zeros_like(mag)), mag


def _theta0_weighted(mag: Tensor, theta0: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    assert theta0 is not None
    return mag * theta0.abs().to(mag.dtype), mag


TR_MODES: Registry[TrustRegionMode] = Registry("trust-region mode")
for _mode in (
    TrustRegionMode("off", "", None, None),
    TrustRegionMode("zero-shot", "+TR", None, _zero_shot),  # s = |τ|: TATR without data
    TrustRegionMode("exemplar", "+TR (exemplar)", "abs_mean", _exemplar),  # s = mean |∇ℓ| on exemplars
    TrustRegionMode("gradient-only", "+TR (gradient-only)", "abs_mean", _gradient_only),  # a = 1
    TrustRegionMode("magnitude-only", "+TR (magnitude-only)", None, _magnitude_only),  # s = 1
    # the checks the paper leaves open (module docstring): other conflict scores, refined zero-shot proxies
    TrustRegionMode("diag-fisher", "+TR (diagonal Fisher)", "sq_mean", _exemplar),  # s = mean (∇ℓ)²
    TrustRegionMode("gradient-agreement", "+TR (gradient sign)", "signed_mean", _agreement),
    TrustRegionMode("zero-shot-per-tensor", "+TR (zero-shot, per tensor)", None, _per_tensor),
    TrustRegionMode("zero-shot-theta0", "+TR (zero-shot, pretrained-weighted)", PRETRAINED, _theta0_weighted),
):
    TR_MODES.add(_mode.name, _mode)

# Derived views, in registration order, for callers that want plain names (click choices, checks).
MODES: tuple[str, ...] = tuple(m.name for m in TR_MODES.values())
NEEDS_GRADIENTS: tuple[str, ...] = tuple(m.name for m in TR_MODES.values() if m.needs_gradients)


def check_mode(mode: str) -> str:
    """`mode` if it is a registered trust-region mode, else a one-line did-you-mean error."""
    if mode not in TR_MODES:
        raise TatrError(unknown_name("trust-region mode", mode, MODES))
    return mode


def needs_gradients(mode: object) -> bool:
    """True for a mode that reads exemplar gradients; False for the others, None or an unknown name."""
    return isinstance(mode, str) and mode in TR_MODES and TR_MODES.get(mode).needs_gradients


def mode_statistic(mode: object) -> str | None:
    """What a registered mode's rule reads beside |τ| (`TrustRegionMode.statistic`); None for the others."""
    return TR_MODES.get(mode).statistic if isinstance(mode, str) and mode in TR_MODES else None


def reads_signed_gradients(mode: object) -> bool:
    """Whether a mode reads the signed mean gradients (a merge's `signed_gradients`) rather than `gradients`."""
    return mode_statistic(mode) == "signed_mean"


def missing_statistic(mode: str, gradients: bool, signed_gradients: bool) -> str | None:
    """The one line for a merge in `mode` given without the gradient files its rule reads, else None."""
    stat = mode_statistic(mode)
    if stat not in GRADIENT_STATISTICS:
        return None
    signed = stat == "signed_mean"
    if signed_gradients if signed else gradients:
        return None
    flag = "--signed-gradients" if signed else "--gradients"
    what = GRADIENT_STATISTICS[stat]
    return f"trust-region mode '{mode}' needs exemplar gradients ({flag}: the {what} per task, one file per task)"


def uses_exemplars(mode: object, components: object) -> bool:
    """Whether a merge needs exemplar gradients: a gradient-based mode, or a component selection."""
    return needs_gradients(mode) or components is not None


def check_q(q: object) -> float:
    """The one check of the keep quantile q, behind every door (API, `tatr merge`, configs, search
    spaces, ablation grids): a real number in (0, 1], else one line naming the value."""
    real = isinstance(q, numbers.Real) and not isinstance(q, bool)
    if not (real and 0.0 < float(q) <= 1.0):  # type: ignore[arg-type]  # NaN fails the comparison
        raise TatrError(f"q must be in (0, 1], got {q!r}")
    return float(q)  # type: ignore[arg-type]


def drop_count(q: float, n: int) -> int:
    """⌈(1−q)·n⌉, computed on q's decimal value so binary rounding cannot add a coordinate."""
    return math.ceil((1 - Fraction(repr(check_q(q)))) * n)


def ties_keep_rank(percent: float, n: int) -> int | None:
    """TIES' trim as AdaMerging's `topk_values_mask` computes it, or None to keep everything.

    The reference keeps |v| ≥ the k-th smallest |v| with k = n − int(n·K), K = percent/100 in
    binary floating point (so 29% of 100 is int(28.999…) = 28). That threshold is the
    (int(n·K) + 1)-th largest |v|: int(n·K) + 1 entries are kept when no magnitudes tie there, and
    every entry tied with the threshold is kept too. k = 0 (K = 100%) is an error in the reference;
    here it keeps every entry.
    """
    m = int(n * (float(percent) / 100))
    return None if n - m <= 0 else m + 1


class ConflictAccumulator:
    """Ω for one tensor from running (prefix) sums over the tasks, in float32, nothing cancelling.

    Adding task i contributes every pair it forms with the tasks before it:
        Ω += s_i ⊙ A_{<i} + a_i ⊙ S_{<i},   then S_{<i} += s_i, A_{<i} += a_i.
    `s=None` stands for s=1 and `a=None` for a=1 (the ablation modes; Ω is then (T−1)·Σa or
    (T−1)·Σs); passing the same tensor as s and a (zero-shot) adds 2·a_i ⊙ A_{<i}. s and a of shape
    [C, *shape] are C channels, each summed as above, and Ω = Σ_c (gradient-agreement: C = 2).
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
                channels = tuple(a.shape) != self.shape  # [C, *shape]: summed over C by `omega`
                self.pairs = torch.zeros(a.shape) if self.out is None or channels else self.out.zero_()
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
        if self.pairs is not None and tuple(self.pairs.shape) != self.shape:  # channels: Ω = Σ_c
            return torch.sum(self.pairs, 0, out=self.out) if self.out is not None else self.pairs.sum(0)
        return self.pairs


def conflict_terms(mode: str, mag: Tensor, grad: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(s, a) for one task and tensor under `mode`, given mag = |τ| and `grad` = the task's tensor of the
    mode's statistic (`mode_statistic`: a gradient moment, or θ_0); None means the factor is 1."""
    rule = TR_MODES.get(mode).rule if mode in TR_MODES else None
    if rule is None:
        raise ValueError(f"no conflict terms for mode '{mode}'")
    return rule(mag, grad)


def pairwise_conflict(s: list[Tensor], a: list[Tensor]) -> Tensor:
    """Literal Σ_{i≠j} s_i ⊙ a_j in float64: the O(T²) reference the tests check against."""
    out = torch.zeros_like(s[0], dtype=torch.float64)
    for i, si in enumerate(s):
        for j, aj in enumerate(a):
            if i != j:
                out += si.double() * aj.double()
    return out
