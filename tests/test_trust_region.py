"""Ω against the literal O(T²) sum, and the exact selection against a full sort."""

from __future__ import annotations

import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from core_helpers import flat, make_models, merged_keys, reference_mask
from hypothesis import given, settings
from hypothesis import strategies as st

from tatr import pairwise_conflict, plan_merge
from tatr.core.errors import TatrError
from tatr.core.exact_selection import arena_chunks, drop_order, kth_largest
from tatr.core.methods import METHODS, merge_label
from tatr.core.trust_region import (
    MODES,
    NEEDS_GRADIENTS,
    TR_MODES,
    ConflictAccumulator,
    check_mode,
    conflict_terms,
    drop_count,
    needs_gradients,
)

EPS32 = 2.0**-24


def _check_against_pairwise(s: list[torch.Tensor], a: list[torch.Tensor], fast: torch.Tensor) -> None:
    """Tolerance from the module docstring: (2T+2)·2⁻²⁴ relative, per coordinate (no cancellation)."""
    ref = pairwise_conflict(s, a)
    bound = (2 * len(s) + 2) * EPS32 * ref
    err = (fast.double() - ref).abs()
    assert bool((err <= bound + 1e-300).all()), float((err - bound).max())


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(2, 7),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    dominant=st.floats(1.0, 1e12),
)
def test_running_sums_match_pairwise(t: int, n: int, seed: int, dominant: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s = [torch.rand(n, generator=g) for _ in range(t)]
    a = [torch.rand(n, generator=g) for _ in range(t)]
    s[0] = s[0] * dominant  # one dominant task: the case where the subtraction cancels digits
    a[0] = a[0] * dominant
    acc = ConflictAccumulator((n,))
    for si, ai in zip(s, a, strict=True):
        acc.add(si, ai)
    omega = acc.omega()
    assert omega.dtype == torch.float32 and bool((omega >= 0).all())
    _check_against_pairwise(s, a, omega)


def test_expanded_formula_cancels_but_prefix_sums_do_not() -> None:
    """Why Ω is accumulated as prefix sums: (Σs)(Σa) − Σ s⊙a in float32 cancels to garbage."""
    s = [torch.tensor([1e4]), torch.tensor([1e-3])]
    a = [torch.tensor([1e4]), torch.tensor([1e-3])]
    naive = (sum(s) * sum(a) - sum(x * y for x, y in zip(s, a, strict=True))).double()
    ref = pairwise_conflict(s, a)
    assert abs(float(naive - ref)) > 0.1 * float(ref)  # 20% off here
    acc = ConflictAccumulator((1,))
    for si, ai in zip(s, a, strict=True):
        acc.add(si, ai)
    assert math.isclose(float(acc.omega()), float(ref), rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["zero-shot", "exemplar", "gradient-only", "magnitude-only"])
def test_plan_omega_matches_pairwise_for_every_mode(mode: str) -> None:
    pre, tasks = make_models(4, seed=3)
    keys = merged_keys(pre)
    g = torch.Generator().manual_seed(9)
    grads = [{k: torch.rand(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    plan = plan_merge(
        pre, tasks, trust_region=mode, gradients=grads if "gradient" in mode or mode == "exemplar" else None
    )
    assert plan.space.keys == tuple(keys)  # text.frozen (unchanged) never enters Ω
    taus = [flat(t, keys) - flat(pre, keys) for t in tasks]
    gs = [flat(gr, keys) for gr in grads]
    ones = [torch.ones_like(taus[0]) for _ in taus]
    s, a = {
        "zero-shot": ([x.abs() for x in taus], [x.abs() for x in taus]),
        "exemplar": (gs, [x.abs() for x in taus]),
        "gradient-only": (gs, ones),
        "magnitude-only": (ones, [x.abs() for x in taus]),
    }[mode]
    _check_against_pairwise(s, a, plan.omega)


@settings(max_examples=80, deadline=None)
@given(
    values=hnp.arrays(
        np.float32, st.integers(1, 300), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25, 1e-30, 7e5])
    ),
    q=st.sampled_from([1.0, 0.999, 0.99, 0.9, 0.75, 0.5, 0.123, 0.01, 1e-9]),
)
def test_drop_order_is_the_stable_sort_prefix(values: np.ndarray, q: float) -> None:
    omega = torch.from_numpy(values.copy())
    n = omega.numel()
    k = drop_count(q, n)
    order = drop_order(omega, k)
    ref = torch.sort(omega, descending=True, stable=True).indices[:k]
    assert torch.equal(order, ref)
    keep = torch.ones(n, dtype=torch.bool)
    keep[order] = False
    assert torch.equal(keep, reference_mask(omega, q))
    assert int((~keep).sum()) == k


@settings(max_examples=50, deadline=None)
@given(
    values=hnp.arrays(
        np.float32,
        st.integers(1, 500),
        elements=st.floats(0, allow_infinity=False, allow_nan=False, width=32, allow_subnormal=True),
    ),
    data=st.data(),
)
def test_kth_largest_is_exact(values: np.ndarray, data: st.DataObject) -> None:
    x = torch.from_numpy(values.copy())
    k = data.draw(st.integers(1, x.numel()))
    assert kth_largest(arena_chunks(x, size=7), k) == float(torch.sort(x, descending=True).values[k - 1])


def test_drop_count_uses_decimal_q() -> None:
    assert (1 - 0.99) * 100 > 1  # binary rounding would give ⌈1.0000000000000009⌉ = 2
    assert drop_count(0.99, 100) == 1
    assert drop_count(1.0, 10**9) == 0
    assert drop_count(0.9, 7) == 1
    assert drop_count(1e-12, 10) == 10


def test_selection_above_2_pow_24() -> None:
    """The selection has no 2²⁴ limit (older torch.quantile refused such inputs)."""
    n = (1 << 24) + 3
    omega = torch.zeros(n)
    omega[-3:] = torch.tensor([5.0, 7.0, 6.0])
    omega[123] = 6.0
    assert drop_order(omega, 3).tolist() == [n - 2, 123, n - 1]


@pytest.mark.parametrize("q", [0.99, 0.9, 0.5, 0.3])
def test_plan_mask_matches_reference_over_all_keys(q: float) -> None:
    pre, tasks = make_models(5, seed=1)
    plan = plan_merge(pre, tasks, trust_region="zero-shot")
    keep = plan.keep_mask(q)
    assert torch.equal(keep, reference_mask(plan.omega, q))
    assert int((~keep).sum()) == math.ceil((1 - Fraction(repr(q))) * plan.num_coordinates)
    stats = plan.mask_stats(q)
    assert sum(d for d, _ in stats.values()) == int((~keep).sum())
    assert sum(n for _, n in stats.values()) == plan.num_coordinates


# --- the mode registry: one entry per mode -------------------------------------------------------------
def test_each_mode_rule_is_its_math() -> None:
    """(s, a) of each mode, read from the registry, against the formulas of the module docstring."""
    g = torch.Generator().manual_seed(4)
    tau = torch.randn(50, generator=g)
    grad = torch.rand(50, generator=g)  # the task's mean |∇ℓ| over its exemplars
    mag = tau.abs()
    rules = {m.name: m.rule for m in TR_MODES.values()}
    assert rules["off"] is None
    s, a = rules["zero-shot"](mag, grad)
    assert torch.equal(s, tau.abs()) and torch.equal(a, tau.abs())  # s = |τ|, a = |τ|
    s, a = rules["exemplar"](mag, grad)
    assert torch.equal(s, grad) and torch.equal(a, tau.abs())  # s = mean |∇ℓ|, a = |τ|
    s, a = rules["gradient-only"](mag, grad)
    assert torch.equal(s, grad) and a is None  # a = 1
    s, a = rules["magnitude-only"](mag, grad)
    assert s is None and torch.equal(a, tau.abs())  # s = 1
    for mode in MODES[1:]:  # the registry's rule is what `conflict_terms` applies (the new modes: test_conflict_scores)
        got, want = conflict_terms(mode, mag, grad), rules[mode](mag, grad)
        assert all(g is w is None or torch.equal(g, w) for g, w in zip(got, want, strict=True)), mode
    with pytest.raises(ValueError, match="no conflict terms for mode 'off'"):
        conflict_terms("off", mag, grad)


def test_gradient_needs_labels_and_names_come_from_the_registry() -> None:
    paper = ("off", "zero-shot", "exemplar", "gradient-only", "magnitude-only")
    open_checks = ("diag-fisher", "gradient-agreement", "zero-shot-per-tensor", "zero-shot-theta0")
    assert MODES[:5] == paper and MODES[5:] == open_checks  # the paper's first, in order: figures keep their styles
    assert NEEDS_GRADIENTS == ("exemplar", "gradient-only", "diag-fisher", "gradient-agreement")
    assert [needs_gradients(m) for m in MODES] == [False, False, True, True, False, True, True, False, False]
    assert not needs_gradients(None) and not needs_gradients("exemplr") and not needs_gradients(float("nan"))
    assert merge_label("ta", "zero-shot") == "TA+TR"
    assert merge_label("ties-sum", "exemplar") == "TIES (dis-sum)+TR (exemplar)"
    assert merge_label("average", "off") == merge_label("average") == METHODS.get("average").label
    for mode in TR_MODES.values():
        assert merge_label("ta", mode.name) == "TA" + mode.label
    with pytest.raises(TatrError, match="unknown trust-region mode 'exemplr'; did you mean 'exemplar'"):
        check_mode("exemplr")
