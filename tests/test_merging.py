"""The generalized merge against literal references, and the two known public-implementation bugs."""

from __future__ import annotations

import pytest
import torch
from core_helpers import flat, make_models, merged_keys, reference_mask, reference_ties
from hypothesis import given, settings
from hypothesis import strategies as st

from tatr import merge, pairwise_conflict, plan_merge
from tatr.errors import TatrError


def _delta(out: dict, pre: dict, keys: list[str]) -> torch.Tensor:
    return flat(out, keys) - flat(pre, keys)


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(2, 6), seed=st.integers(0, 999), q=st.sampled_from([1.0, 0.99, 0.9, 0.7]), lam=st.floats(0.05, 1.5)
)
def test_ta_with_trust_region_matches_reference(t: int, seed: int, q: float, lam: float) -> None:
    pre, tasks = make_models(t, seed=seed)
    keys = merged_keys(pre)
    out = merge(pre, tasks, method="ta", trust_region="zero-shot", q=q, lam=lam)
    taus = [flat(x, keys) - flat(pre, keys) for x in tasks]
    omega = pairwise_conflict([x.abs() for x in taus], [x.abs() for x in taus]).float()
    keep = reference_mask(omega, q)
    expected = lam * keep * sum(taus)
    torch.testing.assert_close(_delta(out, pre, keys), expected, rtol=1e-5, atol=1e-6)
    assert set(out) == set(pre)
    for k in ("text.frozen", "blocks.0.ln.frozen", "position_ids"):
        assert torch.equal(out[k], pre[k])


@settings(max_examples=20, deadline=None)
@given(t=st.integers(2, 5), seed=st.integers(0, 999), k=st.sampled_from([5.0, 20.0, 50.0, 100.0]))
def test_ties_matches_reference(t: int, seed: int, k: float) -> None:
    pre, tasks = make_models(t, seed=seed)
    keys = merged_keys(pre)
    out = merge(pre, tasks, method="ties", trust_region="off", ties_k=k, lam=0.7)
    taus = torch.stack([flat(x, keys) - flat(pre, keys) for x in tasks])
    torch.testing.assert_close(_delta(out, pre, keys), 0.7 * reference_ties(taus, k), rtol=1e-5, atol=1e-6)


def test_ties_with_trust_region_masks_before_trimming() -> None:
    pre, tasks = make_models(4, seed=5)
    keys = merged_keys(pre)
    out = merge(pre, tasks, method="ties", trust_region="zero-shot", q=0.8, ties_k=30, lam=1.0)
    taus = torch.stack([flat(x, keys) - flat(pre, keys) for x in tasks])
    omega = pairwise_conflict(list(taus.abs()), list(taus.abs())).float()
    keep = reference_mask(omega, 0.8)
    torch.testing.assert_close(_delta(out, pre, keys), reference_ties(taus * keep, 30), rtol=1e-5, atol=1e-6)


def test_average_is_the_weight_average() -> None:
    pre, tasks = make_models(3, seed=2)
    out = merge(pre, tasks, method="average", trust_region="off")
    for k in merged_keys(pre):
        torch.testing.assert_close(out[k], sum(t[k] for t in tasks) / 3)


def test_lambda_list_is_not_cumulative() -> None:
    """Each λ gives θ0 + λ·M, whatever was computed before (a public implementation accumulated)."""
    pre, tasks = make_models(4, seed=7)
    keys = merged_keys(pre)
    for method in ("ta", "ties"):
        plan = plan_merge(pre, tasks, method=method, trust_region="zero-shot")
        m = _delta(plan.merged(0.9, 1.0), pre, keys)
        assert m.abs().sum() > 0
        for lam in (0.1, 0.3, 0.5, 0.3, 1.2):
            torch.testing.assert_close(_delta(plan.merged(0.9, lam), pre, keys), lam * m, rtol=1e-5, atol=1e-7)
        # the inputs were not modified in place
        assert torch.equal(pre[keys[0]], make_models(4, seed=7)[0][keys[0]])


def test_exemplar_merge_is_not_the_pretrained_model() -> None:
    """Exemplar gradients must reach Ω: the merge moves away from θ0 and drops exactly ⌈(1−q)N⌉."""
    pre, tasks = make_models(4, seed=11)
    keys = merged_keys(pre)
    g = torch.Generator().manual_seed(0)
    grads = [{k: torch.rand(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    plan = plan_merge(pre, tasks, trust_region="exemplar", gradients=grads)
    out = plan.merged(0.9, 0.3)
    delta = _delta(out, pre, keys)
    n = plan.num_coordinates
    assert delta.abs().sum() > 0
    assert n == 96 + 12 + 72 and plan.drop_count(0.9) == 18  # ⌈0.1·180⌉
    assert int((delta == 0).sum()) == 18  # density of the merged change is exactly q
    # the mask depends on the gradients: other gradients, other mask
    plan2 = plan_merge(
        pre, tasks, trust_region="exemplar", gradients=[{k: torch.ones_like(v) for k, v in gr.items()} for gr in grads]
    )
    assert not torch.equal(plan.keep_mask(0.9), plan2.keep_mask(0.9))


def test_wrongly_keyed_gradients_are_refused() -> None:
    pre, tasks = make_models(3)
    keys = merged_keys(pre)
    prefixed = [{f"model.{k}": torch.rand(pre[k].shape) for k in keys} for _ in tasks]
    with pytest.raises(TatrError, match=r"model\.blocks"):
        merge(pre, tasks, trust_region="exemplar", gradients=prefixed)
    partial = [{k: torch.rand(pre[k].shape) for k in keys[:1]} for _ in tasks]
    with pytest.raises(TatrError, match="missing from the gradient file"):
        merge(pre, tasks, trust_region="exemplar", gradients=partial)


def test_components_partition_the_task_vectors() -> None:
    pre, tasks = make_models(4, seed=13)
    keys = merged_keys(pre)
    g = torch.Generator().manual_seed(1)
    grads = [{k: torch.rand(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    signed = [{k: torch.randn(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    kw = dict(trust_region="exemplar", gradients=grads, signed_gradients=signed, q=0.8, lam=0.5)
    parts = {
        c: _delta(merge(pre, tasks, components=[c], **kw), pre, keys) for c in ("orthogonal", "positive", "negative")
    }
    everything = _delta(merge(pre, tasks, components=["orthogonal", "positive", "negative"], **kw), pre, keys)
    plain = _delta(merge(pre, tasks, trust_region="off", lam=0.5), pre, keys)
    torch.testing.assert_close(everything, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(parts.values()), plain, rtol=1e-5, atol=1e-6)
    tatr = _delta(merge(pre, tasks, **kw), pre, keys)
    torch.testing.assert_close(parts["orthogonal"], tatr, rtol=1e-5, atol=1e-6)  # no zero products here
    # literal definition of the positive part for the first coordinate block
    taus = [flat(t, keys) - flat(pre, keys) for t in tasks]
    gs = [flat(s, keys) for s in signed]
    omega = pairwise_conflict([flat(x, keys) for x in grads], [x.abs() for x in taus]).float()
    outside = ~reference_mask(omega, 0.8)
    pos = sum(torch.where(outside & (tau * (sum(gs) - gj) > 0), tau, 0) for tau, gj in zip(taus, gs, strict=True))
    torch.testing.assert_close(parts["positive"], 0.5 * pos, rtol=1e-5, atol=1e-6)
    assert parts["positive"].abs().sum() > 0 and parts["negative"].abs().sum() > 0


def test_moving_the_mask_between_trials_matches_fresh_merges() -> None:
    """The masked sum is updated incrementally between q values; every result equals a fresh merge."""
    pre, tasks = make_models(4, seed=17)
    for method in ("ta", "average"):
        plan = plan_merge(pre, tasks, method=method, trust_region="zero-shot")
        for q, lam in [(0.99, 0.3), (0.8, 0.5), (0.95, 0.3), (1.0, 0.2), (0.7, 1.0), (0.99, 0.3)]:
            got = plan.merged(q, lam)
            want = merge(pre, tasks, method=method, trust_region="zero-shot", q=q, lam=lam)
            for k in pre:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
