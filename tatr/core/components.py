"""Component ablation: split each task vector by what it does to the *other* tasks' losses.

For task j let G₋ⱼ = Σ_{i≠j} ḡ_i be the other tasks' signed mean gradients at θ_0. To first order,
    Σ_{i≠j} L_i(θ_0 + τ_j) ≈ Σ_{i≠j} L_i(θ_0) + ⟨G₋ⱼ, τ_j⟩ = const + Σ_c G₋ⱼ[c]·τ_j[c],
so each coordinate c of τ_j contributes G₋ⱼ[c]·τ_j[c] to the change of the others' loss.
With m the trust-region keep-mask (low conflict Ω):
  * orthogonal: m[c] = 1 (inside the trust region), or G₋ⱼ[c]·τ_j[c] = 0 (no first-order effect);
  * positive:   m[c] = 0 and G₋ⱼ[c]·τ_j[c] > 0 — it raises the other tasks' loss;
  * negative:   m[c] = 0 and G₋ⱼ[c]·τ_j[c] < 0 — it lowers the other tasks' loss.
The three parts partition τ_j: merging all three is plain (mask-free) merging, and merging only
the orthogonal part is TATR up to the measure-zero G₋ⱼ[c]·τ_j[c] = 0 coordinates outside m.

λ_neg (the paper's open question 1: do the negative components help when scaled?): the chosen
parts other than the negative one are scaled by λ and the negative part by its own λ_neg,
θ = θ_0 + λ·M(rest) + λ_neg·M(negative); `split_negative` gives the two parts of one τ_j.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

COMPONENTS = ("orthogonal", "positive", "negative")
COMPONENT_ORDER = ("positive", "negative", "orthogonal", "all")  # how tables and labels list them


def check_components(components: Iterable[str] | None) -> frozenset[str] | None:
    from tatr.core.errors import TatrError
    from tatr.core.registry import unknown_name

    if components is None:
        return None
    chosen = frozenset(components)
    if not chosen:
        raise TatrError("components: choose at least one of orthogonal, positive, negative")
    for c in chosen:
        if c not in COMPONENTS:
            raise TatrError(unknown_name("component", c, COMPONENTS))
    return chosen


LAM_NEG_MARK = " (λ_neg)"  # after the negative part, where it has its own scaling factor


def components_label(value: object, lam_neg: object = None) -> str:
    """A components choice as tables and variant names show it: 'all', 'positive', 'negative+orthogonal', …

    Accepts what a config or a store row holds: a list, '+'- or ','-joined text, or None/NaN (no
    selection, i.e. every component). All three parts together are plain merging, hence 'all'.
    With a λ_neg (a number, not None/NaN) the negative part is marked: 'negative (λ_neg)+orthogonal'.
    """
    own_scale = not (lam_neg is None or (isinstance(lam_neg, float) and math.isnan(lam_neg)))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "all"
    parts = value if isinstance(value, list | tuple) else str(value).replace(",", "+").split("+")
    chosen = {str(p).strip() for p in parts if str(p).strip()}
    if chosen >= set(COMPONENTS) and not own_scale:
        return "all"
    return "+".join(c + (LAM_NEG_MARK if own_scale and c == "negative" else "") for c in COMPONENT_ORDER if c in chosen)


def _masks(tau: Tensor, keep: Tensor, others_grad: Tensor, chosen: frozenset[str]) -> tuple[Tensor, Tensor]:
    """(the chosen components' mask, the negative component's mask) of one τ."""
    effect = tau * others_grad
    outside = ~keep
    positive = outside & (effect > 0)
    negative = outside & (effect < 0)
    selected = torch.zeros_like(keep)
    if "positive" in chosen:
        selected |= positive
    if "negative" in chosen:
        selected |= negative
    if "orthogonal" in chosen:
        selected |= ~(positive | negative)
    return selected, negative


def select_components(tau: Tensor, keep: Tensor, others_grad: Tensor, chosen: frozenset[str]) -> Tensor:
    """τ restricted to the chosen components (see module docstring for the definitions)."""
    selected, _ = _masks(tau, keep, others_grad, chosen)
    return torch.where(selected, tau, torch.zeros((), dtype=tau.dtype))


def split_negative(
    tau: Tensor, keep: Tensor, others_grad: Tensor, chosen: frozenset[str]
) -> tuple[Tensor, Tensor, Tensor]:
    """(the chosen components, those other than negative, the negative one) of τ: the λ_neg merge.

    The first is `select_components`; the other two partition it."""
    selected, negative = _masks(tau, keep, others_grad, chosen)
    zero = torch.zeros((), dtype=tau.dtype)
    negative &= selected
    rest = torch.where(selected & ~negative, tau, zero)
    return torch.where(selected, tau, zero), rest, torch.where(negative, tau, zero)


def check_lam_neg(components: Iterable[str] | None) -> None:
    """Refuse λ_neg where it scales nothing apart: it needs the negative part and another one."""
    from tatr.core.errors import TatrError

    chosen = set(components or ())
    if "negative" not in chosen or len(chosen) < 2:
        raise TatrError(
            "lam_neg scales the negative component apart from the others: it needs components with negative and "
            f"another part, e.g. [orthogonal, negative] (got {sorted(chosen) if components is not None else None})"
        )
