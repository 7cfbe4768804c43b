"""The generalized merge against literal references, and the two known public-implementation bugs."""

from __future__ import annotations

import pytest
import torch
from core_helpers import (
    disjoint_merge,
    flat,
    floating_keys,
    make_models,
    merged_keys,
    reference_mask,
    resolve_sign,
    ties_merging,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tatr import merge, pairwise_conflict, plan_merge
from tatr.core.errors import TatrError
from tatr.core.methods import METHODS
from tatr.core.trust_region import ties_keep_rank


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


def _reference(pre: dict, tasks: list[dict], k: float, merge_func: str, keep: torch.Tensor | None = None):
    """The published code path: flatten every floating key (sorted), τ = θ_t − θ_0, `ties_merging`."""
    keys = floating_keys(pre)
    taus = torch.stack([flat(t, keys) - flat(pre, keys) for t in tasks])
    if keep is not None:
        taus = taus * keep
    return keys, ties_merging(taus, reset_thresh=k, merge_func=merge_func)


@settings(max_examples=20, deadline=None)
@given(
    t=st.integers(2, 5),
    seed=st.integers(0, 999),
    k=st.sampled_from([5.0, 20.0, 29.0, 33.3, 50.0]),
    method=st.sampled_from(["ties-sum", "ties-mean"]),
)
def test_ties_matches_the_published_code(t: int, seed: int, k: float, method: str) -> None:
    """Random float64 models against AdaMerging's ties_merging; N counts unchanged keys as zeros."""
    pre, tasks = make_models(t, seed=seed, dtype=torch.float64)
    out = merge(pre, tasks, method=method, trust_region="off", ties_k=k, lam=0.7)
    keys, ref = _reference(pre, tasks, k, "dis-" + method.split("-")[1])
    torch.testing.assert_close(_delta(out, pre, keys), 0.7 * ref, rtol=1e-12, atol=1e-15)


def _crafted(values: list[list[float]]) -> tuple[dict, list[dict]]:
    """θ_0 = 1 (float64) and τ_t = the given rows (split over two keys), plus one unchanged key."""
    taus = torch.tensor(values, dtype=torch.float64)
    n = taus.shape[1]
    pre = {"a": torch.ones(n // 2, dtype=torch.float64), "b": torch.ones(n - n // 2, dtype=torch.float64)}
    pre["z.unchanged"] = torch.ones(3, dtype=torch.float64)
    tasks = []
    for row in taus:
        tasks.append({"a": pre["a"] + row[: n // 2], "b": pre["b"] + row[n // 2 :], "z.unchanged": pre["z.unchanged"]})
    return pre, tasks


CRAFTED = {
    # N = 13 (10 changed + 3 unchanged): 20% → int(2.6) = 2, keep the 3 largest |τ| (ceil would keep 3 too,
    # floor 2); the second task ties in magnitude at the threshold, so it keeps 4.
    "non-integer N·K, ties in magnitude": (
        [[0.5, -0.25, 0.125, 4.0, -2.0, 0.0, 0.0, 1.0, 0.0, 0.0], [-4.0, 2.0, -2.0, 0.5, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0]],
        20.0,
    ),
    # N = 20: 20% → int(4.0) = 4, keep 5 (ceil and floor keep 4); coordinate 0 sums to zero and the
    # majority sign is − (two negative sums, one positive), so its negative entry is kept.
    "integer N·K, zero sum, negative majority": (
        [
            [1.0, -3.0, -3.0, 2.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [-1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0, -8.0],
        ],
        20.0,
    ),
    # a zero sum with a zero majority: the reference's `sign > 0` is false, so negatives are kept
    "zero sum, zero majority": ([[2.0, 1.0, -1.0, 0.0], [-2.0, 0.0, 0.0, 0.0]], 60.0),
    # a zero sum with a positive majority
    "zero sum, positive majority": ([[2.0, 1.0, 1.0, -1.0], [-2.0, 0.0, 0.0, 0.0]], 100.0 * 4.5 / 7),
    # 29% of 100 is int(28.999…) = 28 in binary: keep 29 (the decimal floor+1 would keep 30)
    "binary N·K": ([[float(i + 1) for i in range(97)], [-float(i + 1) / 3 for i in range(97)]], 29.0),
}


@pytest.mark.parametrize("case", list(CRAFTED))
@pytest.mark.parametrize("method", ["ties-sum", "ties-mean"])
def test_ties_crafted_cases_match_the_published_code_exactly(case: str, method: str) -> None:
    values, k = CRAFTED[case]
    pre, tasks = _crafted(values)
    out = merge(pre, tasks, method=method, trust_region="off", ties_k=k, lam=1.0)
    keys, ref = _reference(pre, tasks, k, "dis-" + method.split("-")[1])
    assert torch.equal(_delta(out, pre, keys), ref), (_delta(out, pre, keys), ref)


def test_ties_keep_count_and_zero_sign_are_the_references() -> None:
    """What the crafted cases pin down, stated directly (guards the transcription too)."""
    pre, tasks = _crafted(CRAFTED["integer N·K, zero sum, negative majority"][0])
    out = merge(pre, tasks, method="ties-sum", trust_region="off", ties_k=20.0, lam=1.0)
    delta = _delta(out, pre, floating_keys(pre))
    # task 0 keeps its 5 largest: -3, -3, 2, 1, 0.5; task 1 keeps -8, 4, -1, -0.5 (and a 0)
    # coordinate 0: 1 + (−1) = 0, majority − → −1 is kept
    assert delta[0] == -1.0 and delta[1] == -3.5 and delta[4] == 0.5 and delta[5] == 0.0
    assert ties_keep_rank(20.0, 20) == 5 and ties_keep_rank(20.0, 13) == 3 and ties_keep_rank(29.0, 100) == 29
    assert ties_keep_rank(100.0, 7) is None  # keep everything (the reference's kthvalue(0) fails)


@pytest.mark.parametrize("method", ["ties-sum", "ties-mean"])
def test_ties_at_100_percent_keeps_everything(method: str) -> None:
    pre, tasks = make_models(3, seed=1, dtype=torch.float64)
    keys = floating_keys(pre)
    taus = torch.stack([flat(t, keys) - flat(pre, keys) for t in tasks])
    ref = disjoint_merge(taus, "dis-" + method.split("-")[1], resolve_sign(taus.clone()))
    out = merge(pre, tasks, method=method, trust_region="off", ties_k=100.0, lam=1.0)
    torch.testing.assert_close(_delta(out, pre, keys), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["ties-sum", "ties-mean"])
def test_ties_with_trust_region_masks_before_trimming(method: str) -> None:
    pre, tasks = make_models(4, seed=5, dtype=torch.float64)
    keys = merged_keys(pre)
    out = merge(pre, tasks, method=method, trust_region="zero-shot", q=0.8, ties_k=30, lam=1.0)
    taus = torch.stack([flat(x, keys) - flat(pre, keys) for x in tasks])
    omega = pairwise_conflict(list(taus.abs()), list(taus.abs())).float()
    keep = reference_mask(omega, 0.8)
    all_keys = floating_keys(pre)  # the mask over all floating keys: unchanged ones are zeros anyway
    keep_all = torch.cat([keep[_span(keys, pre, k)] if k in keys else torch.ones(pre[k].numel(), dtype=torch.bool)
                          for k in all_keys])  # fmt: skip
    _, ref = _reference(pre, tasks, 30, "dis-" + method.split("-")[1], keep_all)
    torch.testing.assert_close(_delta(out, pre, all_keys), ref, rtol=1e-12, atol=1e-15)


def _span(keys: list[str], pre: dict, key: str) -> slice:
    start = sum(pre[k].numel() for k in keys[: keys.index(key)])
    return slice(start, start + pre[key].numel())


def test_ties_is_labelled_and_the_old_name_is_gone() -> None:
    assert METHODS.get("ties-sum").label == "TIES (dis-sum)" and METHODS.get("ties-sum").reduce == "sum"
    assert METHODS.get("ties-mean").label == "TIES (dis-mean)" and METHODS.get("ties-mean").reduce == "mean"
    assert METHODS.get("ties-sum").default_lam == 0.3
    pre, tasks = make_models(2)
    with pytest.raises(TatrError, match="unknown merge method 'ties'; did you mean 'ties-sum' or 'ties-mean'"):
        merge(pre, tasks, method="ties")


def test_average_is_the_weight_average() -> None:
    pre, tasks = make_models(3, seed=2)
    out = merge(pre, tasks, method="average", trust_region="off")
    for k in merged_keys(pre):
        torch.testing.assert_close(out[k], sum(t[k] for t in tasks) / 3)


def test_lambda_list_is_not_cumulative() -> None:
    """Each λ gives θ0 + λ·M, whatever was computed before (a public implementation accumulated)."""
    pre, tasks = make_models(4, seed=7)
    keys = merged_keys(pre)
    for method in ("ta", "ties-sum", "ties-mean"):
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


# --- numbers at the door ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lam": float("nan")}, "λ"),
        ({"lam": float("inf")}, "λ"),
        ({"lam": -float("inf")}, "λ"),
        ({"q": float("nan")}, "q must be in"),
        ({"q": 0.0}, "q must be in"),
        ({"q": float("inf")}, "q must be in"),
        ({"ties_k": float("nan")}, "ties_k"),
        ({"ties_k": 0.0}, "ties_k"),
        ({"ties_k": 100.5}, "ties_k"),
        ({"ties_k": float("inf")}, "ties_k"),
    ],
)
def test_bad_numbers_are_refused_at_the_door(kwargs: dict, needle: str) -> None:
    pre, tasks = make_models(2)
    with pytest.raises(TatrError, match=needle):
        merge(pre, tasks, method="ties-sum", **kwargs)
    plan = plan_merge(pre, tasks, method="ta")
    if "ties_k" in kwargs:
        with pytest.raises(TatrError, match=needle):
            plan_merge(pre, tasks, method="ties-sum", ties_k=kwargs["ties_k"])
    else:
        with pytest.raises(TatrError, match=needle):
            plan.merged(**kwargs)


def test_negative_lambda_is_task_negation() -> None:
    pre, tasks = make_models(2, dtype=torch.float64)
    keys = merged_keys(pre)
    out = merge(pre, tasks, trust_region="off", lam=-0.5)
    taus = sum(flat(t, keys) - flat(pre, keys) for t in tasks)
    torch.testing.assert_close(_delta(out, pre, keys), -0.5 * taus, rtol=1e-12, atol=1e-15)


def test_lambda_that_overflows_the_dtype_is_refused() -> None:
    pre, tasks = make_models(2)
    with pytest.raises(TatrError, match=r"overflows torch\.float32"):
        merge(pre, tasks, trust_region="off", lam=1e300)


# --- dtypes -------------------------------------------------------------------------------------------
def test_float64_merges_in_float64() -> None:
    """A 1e-9 task vector on θ_0 = 1 vanishes in float32 (ulp 1.2e-7); in float64 it is exact enough."""
    pre = {"w": torch.ones(6, dtype=torch.float64), "v": torch.full((4,), 3.0, dtype=torch.float64)}
    g = torch.Generator().manual_seed(0)
    tasks = [{k: v + 1e-9 * torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in pre.items()}]
    tasks.append({k: v + 1e-9 * torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in pre.items()})
    for method in ("ta", "ties-sum"):
        out = merge(pre, tasks, method=method, trust_region="off", lam=1.0, ties_k=100.0)
        for k in pre:
            assert out[k].dtype == torch.float64
            expected = pre[k] + ((tasks[0][k] - pre[k]) + (tasks[1][k] - pre[k]))
            assert torch.equal(out[k], expected), (method, k)
    plan = plan_merge(pre, tasks, method="ta", trust_region="zero-shot")
    assert plan.tau_sum.dtype == torch.float64 and plan.omega.dtype == torch.float32


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize("with_float64", [False, True])
@pytest.mark.parametrize("method", ["ta", "ties-sum", "ties-mean", "average"])
def test_output_keeps_dtypes_and_unmoved_coordinates_keep_their_bits(with_float64: bool, method: str) -> None:
    """Every output key has its input dtype; coordinates the merge does not move keep θ_0's bits
    (−0.0 included): never changed, Σ τ = 0, dropped by the trust region, trimmed by TIES."""
    dtypes = [torch.bfloat16, torch.float16, torch.float32] + ([torch.float64] if with_float64 else [])
    g = torch.Generator().manual_seed(3)
    pre, t1, t2 = {}, {}, {}
    for d in dtypes:
        base = torch.randn(40, generator=g).to(d)
        base[:4] = -0.0
        a = base + (0.05 * torch.randn(40, generator=g)).to(d)
        b = base + (0.05 * torch.randn(40, generator=g)).to(d)
        a[0], b[0] = base[0], base[0]  # never changed
        a[1], b[1] = 0.25, -0.25  # Σ τ = 0 on −0.0
        a[2], b[2] = 8.0, 8.0  # the largest conflict: dropped by the trust region
        a[3], b[3] = 1e-3, 0.0  # a small magnitude: trimmed by TIES at 20%
        name = str(d).split(".")[1]
        pre[name], t1[name], t2[name] = base, a, b
    pre["ids"] = torch.arange(5)
    t1["ids"], t2["ids"] = pre["ids"].clone(), pre["ids"].clone()
    out = merge(pre, [t1, t2], method=method, trust_region="zero-shot", q=0.975, lam=0.7)  # drops 1 per key
    arena = torch.float64 if with_float64 else torch.float32
    for k, v in pre.items():
        assert out[k].dtype == v.dtype, k
        if not v.is_floating_point():
            assert torch.equal(out[k], v)
            continue
        unmoved = [0, 2, 3] if method.startswith("ties") else [0, 1, 2]  # TIES trims before Σ: 1 may move
        assert torch.equal(_bits(out[k][unmoved]), _bits(v[unmoved])), (k, out[k][:4])
        if method == "ta":  # a moved coordinate: θ_0 + λ·Σ τ in the arena's precision, rounded once
            tau = (t1[k].to(arena) - v.to(arena)) + (t2[k].to(arena) - v.to(arena))
            want = (v.to(arena) + tau * 0.7).to(v.dtype)
            assert torch.equal(out[k][5:], want[5:]), k


def test_orthogonal_includes_zero_effect_coordinates_outside_the_mask() -> None:
    """Orthogonal = inside the trust region OR G₋ⱼ·τ_j = 0 — also outside it (module definition)."""
    pre, tasks = make_models(3, seed=21)
    keys = merged_keys(pre)
    g = torch.Generator().manual_seed(2)
    grads = [{k: torch.rand(pre[k].shape, generator=g) for k in keys} for _ in tasks]
    signed = [{k: torch.zeros(pre[k].shape) for k in keys} for _ in tasks]  # G₋ⱼ = 0 on the first half
    for s in signed:
        for k in keys:
            flat_view = s[k].view(-1)
            flat_view[flat_view.numel() // 2 :] = torch.randn(flat_view.numel() - flat_view.numel() // 2, generator=g)
    kw = dict(trust_region="exemplar", gradients=grads, signed_gradients=signed, q=0.7, lam=1.0)
    got = _delta(merge(pre, tasks, components=["orthogonal"], **kw), pre, keys)
    taus = [flat(t, keys) - flat(pre, keys) for t in tasks]
    gs = [flat(s, keys) for s in signed]
    omega = pairwise_conflict([flat(x, keys) for x in grads], [x.abs() for x in taus]).float()
    keep = reference_mask(omega, 0.7)
    want = sum(torch.where(keep | (tau * (sum(gs) - gj) == 0), tau, 0) for tau, gj in zip(taus, gs, strict=True))
    outside_zero = (~keep) & (sum(gs) - gs[0] == 0)
    assert bool(outside_zero.any())  # the case the definition is about is present
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unsupported_in_memory_dtypes_are_refused() -> None:
    pre, tasks = make_models(2)
    for d in (torch.float8_e4m3fn, torch.complex64, torch.uint16):
        bad = [dict(t, extra=torch.zeros(2).to(d)) for t in tasks]
        with pytest.raises(TatrError, match=f"key 'extra': unsupported dtype {d}"):
            merge(dict(pre, extra=torch.zeros(2).to(d)), bad)


def test_gradients_must_be_non_negative() -> None:
    pre, tasks = make_models(2)
    keys = merged_keys(pre)
    for value in (-1.0, -0.0):
        grads = [{k: torch.rand(pre[k].shape) for k in keys} for _ in tasks]
        grads[1][keys[1]].view(-1)[3] = value
        with pytest.raises(TatrError, match=f"key '{keys[1]}': has negative values.*--signed-gradients"):
            merge(pre, tasks, trust_region="exemplar", gradients=grads)


def test_one_did_you_mean_for_every_lookup() -> None:
    """`did_you_mean` is the one suggestion helper; `unknown_name` (every registry) builds on it."""
    from tatr.core.registry import did_you_mean, unknown_name

    assert did_you_mean("widht", ["width", "layers"], prefix="suite.") == "; did you mean 'suite.width'?"
    assert did_you_mean("Eurosat", ["EuroSAT", "DTD"]) == ""  # case counts unless told otherwise
    assert did_you_mean("Eurosat", ["EuroSAT", "DTD"], fold_case=True) == "; did you mean 'EuroSAT'?"
    assert did_you_mean("zzz", ["width"]) == ""
    assert did_you_mean("tie", ["ta", "ties-sum", "ties-mean"], n=3, cutoff=0.5) == (
        "; did you mean 'ties-sum' or 'ties-mean'?"
    )
    message = unknown_name("merge method", "tie", METHODS)  # the registry grows: its names, not a copy
    assert message.startswith("unknown merge method 'tie'; did you mean 'ties-sum' or 'ties-mean'")
    assert message.endswith(f"(known: {', '.join(sorted(METHODS.names()))})")
    assert {"average", "ta", "ties-mean", "ties-sum"} <= set(METHODS.names())


def test_only_a_linear_method_keeps_the_sum_arena() -> None:
    """Σ τ is an N-coordinate arena that only TA/averaging's masked sum reads: a method that re-streams the
    tasks (TIES, DARE, a combiner, a component selection) must not hold it, and says so if asked for it."""
    pre, tasks = make_models(3, seed=5)
    n = sum(pre[k].numel() for k in merged_keys(pre))
    for method in ("ta", "average"):
        assert plan_merge(pre, tasks, method=method, trust_region="zero-shot").tau_sum.numel() == n
    for method in ("ties-sum", "dare", "tsv-m", "consensus-ta"):
        plan = plan_merge(pre, tasks, method=method, trust_region="zero-shot")
        assert plan.tau_sum.numel() == 0
        assert plan.merged(0.9, 0.5)[merged_keys(pre)[0]].dtype == torch.float32
        with pytest.raises(RuntimeError, match="did not keep"):
            plan.masked_sum(0.9)
