"""The conflict scores of the checks the paper leaves open, each against the literal O(T²) sum of its
definition (docs/method.md), written here element by element; the exact drop count; the third gradient
moment against a per-sample loop; the one-line errors of the inputs each reads."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from core_helpers import flat, make_models, merged_keys, reference_mask
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tatr import plan_merge
from tatr.core.errors import TatrError
from tatr.core.gradients import MOMENTS, gradient_moments, gradient_stats
from tatr.core.trust_region import GRADIENT_STATISTICS, TR_MODES, ConflictAccumulator, conflict_terms

EPS32 = 2.0**-24
NEW_MODES = ("diag-fisher", "gradient-agreement", "zero-shot-per-tensor", "zero-shot-theta0")


# --- the definitions, literally: one coordinate, one ordered pair (i, j) at a time, in float64 -------
def literal_fisher(sq: list[torch.Tensor], taus: list[torch.Tensor]) -> torch.Tensor:
    """Σ_{i≠j} mean(∇ℓ_i)² · |τ_j|."""
    out = torch.zeros(taus[0].shape, dtype=torch.float64)
    for i in range(len(taus)):
        for j in range(len(taus)):
            if i != j:
                out += sq[i].double() * taus[j].double().abs()
    return out


def literal_agreement(signed: list[torch.Tensor], taus: list[torch.Tensor]) -> torch.Tensor:
    """Σ_{i≠j} [ḡ_i·ḡ_j < 0]·|ḡ_i|·|τ_j|, coordinate by coordinate with Python numbers."""
    g = [x.double().reshape(-1).tolist() for x in signed]
    t = [x.double().reshape(-1).tolist() for x in taus]
    out = [0.0] * len(t[0])
    for c in range(len(out)):
        for i in range(len(t)):
            for j in range(len(t)):
                if i != j and g[i][c] * g[j][c] < 0:
                    out[c] += abs(g[i][c]) * abs(t[j][c])
    return torch.tensor(out, dtype=torch.float64).reshape(taus[0].shape)


def literal_per_tensor(taus: list[torch.Tensor]) -> torch.Tensor:
    """Σ_{i≠j} (|τ_i| / mean|τ_i|) · |τ_j|, the mean over the tensor; a task zero on the whole tensor adds 0."""
    out = torch.zeros(taus[0].shape, dtype=torch.float64)
    for i in range(len(taus)):
        mean = sum(abs(v) for v in taus[i].double().reshape(-1).tolist()) / taus[i].numel()
        for j in range(len(taus)):
            if i != j and mean > 0:
                out += taus[i].double().abs() / mean * taus[j].double().abs()
    return out


def literal_theta0(theta0: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """Σ_{i≠j} |τ_i|·|θ_0|·|τ_j|."""
    out = torch.zeros(taus[0].shape, dtype=torch.float64)
    for i in range(len(taus)):
        for j in range(len(taus)):
            if i != j:
                out += taus[i].double().abs() * theta0.double().abs() * taus[j].double().abs()
    return out


def accumulated(mode: str, taus: list[torch.Tensor], stats: list[torch.Tensor | None]) -> torch.Tensor:
    acc = ConflictAccumulator(taus[0].shape)
    for tau, stat in zip(taus, stats, strict=True):
        acc.add(*conflict_terms(mode, tau.abs().float(), stat))
    return acc.omega()


def check_close(fast: torch.Tensor, ref: torch.Tensor, terms: int) -> None:
    """Every term ≥ 0, so float32 loses at most a few roundings per term, relative, per coordinate: no
    cancellation (the bound is loose by a small constant over the exemplar mode's (2T+2)·2⁻²⁴)."""
    assert fast.dtype == torch.float32 and bool((fast >= 0).all())
    err = (fast.double() - ref).abs()
    assert bool((err <= (4 * terms + 4) * EPS32 * ref + 1e-300).all()), float((err / ref.clamp_min(1e-300)).max())


@settings(max_examples=60, deadline=None)
@given(t=st.integers(2, 6), n=st.integers(1, 30), seed=st.integers(0, 2**16), dominant=st.floats(1.0, 1e8))
def test_diag_fisher_and_theta0_scores_are_their_pairwise_sums(t: int, n: int, seed: int, dominant: float) -> None:
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(n, generator=g) for _ in range(t)]
    taus[0] = taus[0] * dominant  # one dominant task: where an expanded (ΣsΣa − Σsa) form would cancel
    sq = [torch.randn(n, generator=g).square() for _ in range(t)]
    check_close(accumulated("diag-fisher", taus, sq), literal_fisher(sq, taus), t)
    theta0 = torch.randn(n, generator=g)
    theta0[: n // 3] = 0.0  # a weight at 0 never conflicts
    check_close(accumulated("zero-shot-theta0", taus, [theta0] * t), literal_theta0(theta0, taus), t)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(2, 6), n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_gradient_agreement_is_its_pairwise_sum(t: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(n, generator=g) for _ in range(t)]
    signed = [torch.randn(n, generator=g) * 10.0 ** float(torch.randint(-3, 4, (), generator=g)) for _ in range(t)]
    signed[0][::3] = 0.0  # a zero gradient disagrees with nobody
    signed[-1][1::4] = -0.0
    fast = accumulated("gradient-agreement", taus, signed)
    ref = literal_agreement(signed, taus)
    check_close(fast, ref, t)
    assert bool((fast[ref == 0] == 0).all())  # no pair disagrees: exactly 0, nothing left over from a cancellation


def test_gradient_agreement_never_subtracts() -> None:
    """Two tasks pulling one coordinate apart with a third huge one that agrees: an expanded form
    Σ_i |ḡ_i|·(Σ_j |τ_j| − same-sign part) would lose the small conflict in float32; the split prefix sums
    keep it exactly."""
    taus = [torch.tensor([1e8]), torch.tensor([1e-3]), torch.tensor([1e-3])]
    signed = [torch.tensor([1e8]), torch.tensor([2e-3]), torch.tensor([-3e-3])]
    fast = accumulated("gradient-agreement", taus, signed)
    ref = literal_agreement(signed, taus)  # 1e8·1e-3 + 2e-3·1e-3 + 3e-3·(1e8 + 1e-3)
    assert math.isclose(float(fast), float(ref), rel_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(2, 6), shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)]), seed=st.integers(0, 2**16))
def test_per_tensor_proxy_is_its_pairwise_sum(t: int, shape: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scales = [10.0 ** float(torch.randint(-4, 5, (), generator=g)) for _ in range(t)]
    taus = [torch.randn(shape, generator=g) * s for s in scales]
    taus[-1] = torch.zeros(shape)  # a task that left this tensor alone: s = 0, not 0/0
    check_close(accumulated("zero-shot-per-tensor", taus, [None] * t), literal_per_tensor(taus), t)


def test_per_tensor_proxy_does_not_move_with_the_tensor_scale_of_s() -> None:
    """Why it exists: scaling a task's whole tensor scales the zero-shot Ω of that tensor through s and a
    (quadratically over tasks); the per-tensor s cancels the scale on its side."""
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(10, generator=g) for _ in range(3)]
    big = [tau * 1000 for tau in taus]
    ratio = accumulated("zero-shot-per-tensor", big, [None] * 3) / accumulated("zero-shot-per-tensor", taus, [None] * 3)
    torch.testing.assert_close(ratio, torch.full((10,), 1000.0), rtol=1e-5, atol=0)
    ratio = accumulated("zero-shot", big, [None] * 3) / accumulated("zero-shot", taus, [None] * 3)
    torch.testing.assert_close(ratio, torch.full((10,), 1e6), rtol=1e-5, atol=0)


# --- through the merge: Ω over every merged key, and the exact drop -----------------------------------
@pytest.mark.parametrize("mode", NEW_MODES)
@pytest.mark.parametrize("q", [0.99, 0.9, 0.5])
def test_plan_omega_and_mask_for_each_new_mode(mode: str, q: float) -> None:
    pre, tasks = make_models(4, seed=5)
    keys = merged_keys(pre)
    g = torch.Generator().manual_seed(11)
    signed = [{k: torch.randn(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    squared = [{k: v.square() for k, v in s.items()} for s in signed]
    inputs = {
        "diag-fisher": {"gradients": squared},
        "gradient-agreement": {"signed_gradients": signed},
    }.get(mode, {})
    plan = plan_merge(pre, tasks, trust_region=mode, **inputs)
    taus = [flat(t, keys) - flat(pre, keys) for t in tasks]
    ref = {
        "diag-fisher": lambda: literal_fisher([flat(s, keys) for s in squared], taus),
        "gradient-agreement": lambda: literal_agreement([flat(s, keys) for s in signed], taus),
        # per tensor: the mean is the tensor's, so the reference is built key by key
        "zero-shot-per-tensor": lambda: torch.cat(
            [literal_per_tensor([t[k].double() - pre[k].double() for t in tasks]).reshape(-1) for k in keys]
        ),
        "zero-shot-theta0": lambda: literal_theta0(flat(pre, keys), taus),
    }[mode]()
    check_close(plan.omega, ref, len(tasks))
    keep = plan.keep_mask(q)
    assert int((~keep).sum()) == math.ceil((1 - Fraction(repr(q))) * plan.num_coordinates)
    assert torch.equal(keep, reference_mask(plan.omega, q))  # exact top-k of Ω, ties by index
    merged = plan.merged(q, 0.5)
    for key in keys:
        assert merged[key].dtype == pre[key].dtype


def test_the_new_modes_read_their_inputs_and_say_so() -> None:
    pre, tasks = make_models(3, seed=2)
    keys = merged_keys(pre)
    with pytest.raises(TatrError, match=r"'diag-fisher' needs exemplar gradients \(--gradients: the mean \(∇ℓ\)²"):
        plan_merge(pre, tasks, trust_region="diag-fisher")
    with pytest.raises(TatrError, match=r"'gradient-agreement' needs exemplar gradients \(--signed-gradients"):
        plan_merge(pre, tasks, trust_region="gradient-agreement", gradients=[{k: pre[k].abs() for k in keys}] * 3)
    bad = [{k: torch.ones(pre[k].shape) for k in keys} for _ in tasks]
    bad[1][keys[0]][0] = float("nan")  # a sign test alone would hide it
    with pytest.raises(TatrError, match="contains NaN or infinite values"):
        plan_merge(pre, tasks, trust_region="gradient-agreement", signed_gradients=bad)
    plan_merge(pre, tasks, trust_region="zero-shot-per-tensor")  # data-free: nothing to give
    plan_merge(pre, tasks, trust_region="zero-shot-theta0")


def test_registry_rows_of_the_new_modes() -> None:
    stats = {m: TR_MODES.get(m).statistic for m in NEW_MODES}
    assert stats == {
        "diag-fisher": "sq_mean",
        "gradient-agreement": "signed_mean",
        "zero-shot-per-tensor": None,
        "zero-shot-theta0": "pretrained",
    }
    assert set(GRADIENT_STATISTICS) == set(MOMENTS)  # what a mode reads is what the gradient code computes
    labels = [TR_MODES.get(m).label for m in TR_MODES]
    assert len(set(labels)) == len(labels)  # every mode its own row label


# --- the third moment ---------------------------------------------------------------------------------
def test_squared_moment_is_the_mean_of_per_sample_squares() -> None:
    """mean_n (∇ℓ_n)² against a literal per-sample loop (one backward each, squared, averaged); the first two
    moments are `gradient_stats`' bit for bit (they are summed exactly as before the third existed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    head = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    moments = gradient_moments(model, head, 10.0, [(x, y)], chunk=4)
    params = dict(model.named_parameters())
    ref = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        out = torch.nn.functional.normalize(model(x[i : i + 1]), dim=-1) @ head.T * 10.0
        loss = torch.nn.functional.cross_entropy(out, y[i : i + 1])
        for (k, _), gr in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            ref[k] += gr.square() / len(x)
    for k in params:
        torch.testing.assert_close(moments["sq_mean"][k], ref[k], rtol=1e-5, atol=1e-9)
    abs_mean, signed_mean = gradient_stats(model, head, 10.0, [(x, y)], chunk=4)
    for k in params:
        assert torch.equal(moments["abs_mean"][k], abs_mean[k]) and torch.equal(
            moments["signed_mean"][k], signed_mean[k]
        )
