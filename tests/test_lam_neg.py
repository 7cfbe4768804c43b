"""λ_neg: the negative component scaled by its own factor, θ = θ0 + λ·rest + λ_neg·negative.

Checked against a hand-written θ0 + λ·orth + λ_neg·neg from the definitions of
`tatr.core.components` (the other tasks' signed gradients G₋ⱼ, the effect τ_j·G₋ⱼ outside the
trust region), against the plain [orthogonal, negative] merge at λ_neg = λ, at the door, and
through a components ablation that tunes λ_neg on validation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from core_helpers import make_models
from torch import Tensor

from tatr import merge, plan_merge
from tatr.core.components import components_label
from tatr.core.errors import TatrError

Q = 0.8


def inputs(seed: int = 0, tasks: int = 3) -> tuple[dict, list[dict], list[dict], list[dict]]:
    pre, fts = make_models(tasks, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    floating = [k for k, v in pre.items() if v.is_floating_point()]
    grads = [{k: torch.rand(pre[k].shape, generator=g) for k in floating} for _ in fts]
    signed = [{k: torch.randn(pre[k].shape, generator=g) for k in floating} for _ in fts]
    return pre, fts, grads, signed


def hand_written(pre: dict, fts: list, grads: list, signed: list, lam: float, lam_neg: float) -> dict[str, Tensor]:
    """θ0 + λ·Σ_j orth_j + λ_neg·Σ_j neg_j, straight from the components' definitions."""
    plan = plan_merge(pre, fts, trust_region="exemplar", gradients=grads)
    keep = plan.keep_mask(Q)
    out = dict(pre)
    for i, key in enumerate(plan.space.keys):
        m = plan.space.view(keep, i)
        orth = torch.zeros_like(pre[key])
        neg = torch.zeros_like(pre[key])
        for j, ft in enumerate(fts):
            tau = ft[key] - pre[key]
            others = sum(signed[s][key] for s in range(len(fts)) if s != j)
            effect = tau * others
            orth += torch.where(m | (effect == 0), tau, 0.0)
            neg += torch.where(~m & (effect < 0), tau, 0.0)
        out[key] = pre[key] + lam * orth + lam_neg * neg
    return out


@pytest.mark.parametrize(("lam", "lam_neg"), [(0.4, 1.3), (0.7, 0.0), (0.5, -0.6)])
def test_lam_neg_is_theta0_plus_lam_orth_plus_lam_neg_neg(lam: float, lam_neg: float) -> None:
    pre, fts, grads, signed = inputs()
    got = merge(
        pre,
        fts,
        trust_region="exemplar",
        q=Q,
        lam=lam,
        lam_neg=lam_neg,
        components=["orthogonal", "negative"],
        gradients=grads,
        signed_gradients=signed,
    )
    expected = hand_written(pre, fts, grads, signed, lam, lam_neg)
    for k in pre:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6)
    # the negative part does move the merge: λ_neg matters
    other = merge(
        pre,
        fts,
        trust_region="exemplar",
        q=Q,
        lam=lam,
        lam_neg=lam_neg + 1.0,
        components=["orthogonal", "negative"],
        gradients=grads,
        signed_gradients=signed,
    )
    assert any(not torch.allclose(got[k], other[k]) for k in pre if pre[k].is_floating_point())


@pytest.mark.parametrize("method", ["ta", "average", "dare", "breadcrumbs"])
def test_lam_neg_equal_to_lam_is_the_plain_selection(method: str) -> None:
    """One sparsity pattern for both parts (one DARE draw, one Breadcrumbs band of their union), so
    λ_neg = λ is the [orthogonal, negative] merge (up to the order of float additions)."""
    pre, fts, grads, signed = inputs(seed=3)
    plan = plan_merge(
        pre,
        fts,
        method=method,
        trust_region="exemplar",
        components=["orthogonal", "negative"],
        gradients=grads,
        signed_gradients=signed,
        breadcrumbs_beta=0.1,
        breadcrumbs_density=0.5,
    )
    plain = plan.merged(Q, 0.6)
    split = plan.merged(Q, 0.6, 0.6)
    for k in pre:
        torch.testing.assert_close(split[k], plain[k], rtol=1e-6, atol=1e-6)
    rest, neg = plan.split_task_vectors(Q)
    torch.testing.assert_close(rest + neg, plan.merged_task_vector(Q), rtol=1e-6, atol=1e-7)
    assert bool(neg.any()) and bool(rest.any())


def test_lam_neg_zero_is_the_orthogonal_part_alone() -> None:
    pre, fts, grads, signed = inputs(seed=5)
    common = {"trust_region": "exemplar", "q": Q, "lam": 0.5, "gradients": grads, "signed_gradients": signed}
    without = merge(pre, fts, components=["orthogonal", "negative"], lam_neg=0.0, **common)
    orthogonal = merge(pre, fts, components=["orthogonal"], **common)
    for k in pre:
        torch.testing.assert_close(without[k], orthogonal[k], rtol=1e-6, atol=1e-6)


def test_trials_reuse_one_stream_per_q() -> None:
    """Each (λ, λ_neg) after the first at a q is a multiply-add on the cached parts."""
    pre, fts, grads, signed = inputs(seed=6)
    plan = plan_merge(
        pre,
        fts,
        trust_region="exemplar",
        components=["orthogonal", "negative"],
        gradients=grads,
        signed_gradients=signed,
    )
    first = plan.split_task_vectors(Q)
    plan.merged(Q, 0.2, 0.9)
    assert plan.split_task_vectors(Q) is first
    assert plan.split_task_vectors(0.9) is not first


# --- at the door -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "components", "lam_neg", "message"),
    [
        ("ta", None, 0.5, "lam_neg scales the negative component apart"),
        ("ta", ["orthogonal"], 0.5, "needs components with negative and another part"),
        ("ta", ["negative"], 0.5, "needs components with negative and another part"),
        ("ties-sum", ["orthogonal", "negative"], 0.5, "ties-sum elects signs"),
        ("dare-ties", ["orthogonal", "negative"], 0.5, "dare-ties elects signs"),
        ("ta", ["orthogonal", "negative"], float("nan"), "λ_neg (lam_neg) must be a finite number"),
        ("ta", ["orthogonal", "negative"], float("inf"), "λ_neg (lam_neg) must be a finite number"),
    ],
)
def test_bad_lam_neg_is_refused_before_any_work(method: str, components, lam_neg: float, message: str) -> None:
    pre, fts, grads, signed = inputs()
    with pytest.raises(TatrError, match=re.escape(message)) as caught:
        merge(
            pre,
            fts,
            method=method,
            trust_region="exemplar",
            components=components,
            lam_neg=lam_neg,
            gradients=grads,
            signed_gradients=signed,
        )
    assert "\n" not in str(caught.value)


def test_config_and_ablation_files_refuse_it_in_one_line(tmp_path: Path) -> None:
    from tatr.runs import ablation_spec
    from tatr.runs.config import load_config

    with pytest.raises(TatrError, match="merge: lam_neg scales the negative component apart"):
        load_config(None, ["merge.lam_neg=0.5"])
    with pytest.raises(TatrError, match=re.escape("merge.lam_neg: Input should be a finite number")):
        load_config(None, ["merge.components=[orthogonal, negative]", "merge.lam_neg=.inf"])
    assert load_config(None, ["merge.components=[orthogonal, negative]", "merge.lam_neg=0.5"]).merge.lam_neg == 0.5
    body = {
        "name": "comp",
        "merge": {"method": "ties-sum", "trust_region": "exemplar"},
        "ablation": {
            "kind": "components",
            "variants": [{"components": ["orthogonal", "negative"], "lam_neg": "tuned"}],
        },
    }
    path = tmp_path / "comp.yaml"
    path.write_text(json.dumps(body))
    config, spec = ablation_spec.load_ablation(path)
    with pytest.raises(TatrError, match="ties-sum elects signs"):
        ablation_spec.points(config, spec)
    body["ablation"]["variants"] = [{"components": ["orthogonal", "negative"], "lam_neg": "maybe"}]
    path.write_text(json.dumps(body))
    with pytest.raises(TatrError, match=re.escape("ablation.variants.0.lam_neg")):
        ablation_spec.load_ablation(path)
    body["ablation"]["variants"] = [{"components": ["orthogonal", "negative"], "lam_neg": "tuned"}]
    body["ablation"]["lam_neg"] = []
    path.write_text(json.dumps(body))
    with pytest.raises(TatrError, match="lam_neg"):
        ablation_spec.load_ablation(path)


def test_label_marks_the_negative_part() -> None:
    assert components_label(["orthogonal", "negative"]) == "negative+orthogonal"
    assert components_label(["orthogonal", "negative"], 0.4) == "negative (λ_neg)+orthogonal"
    assert components_label(["orthogonal", "negative"], float("nan")) == "negative+orthogonal"
    assert components_label(["orthogonal", "positive", "negative"], 1.0) == "positive+negative (λ_neg)+orthogonal"
    assert components_label(["orthogonal", "positive", "negative"]) == "all"


# --- tuned in an ablation -----------------------------------------------------------------------------
def test_components_ablation_tunes_lam_neg_on_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
    from tatr.runs import ablation_spec, ablations
    from tatr.store.rows import read_store
    from tatr.suites import get_suite
    from tatr.suites.evaluation import evaluate_merged

    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    toy = {"tasks": 3, "n": 48}
    body = {
        "name": "comp",
        "benchmark": "sweep-toy",
        "suite": toy,
        "exemplars": {"n": 8},
        "merge": {"method": "ta", "trust_region": "exemplar"},
        "ablation": {
            "kind": "components",
            "lam": [0.3, 0.9],
            "lam_neg": [0.0, 0.5, 1.5],
            "q": [0.9],
            "variants": [{"components": ["orthogonal", "negative"], "lam_neg": "tuned"}],
        },
    }
    path = tmp_path / "comp.yaml"
    path.write_text(json.dumps(body))
    config, spec = ablation_spec.load_ablation(path)
    [result] = ablations.run(config, spec, tmp_path / "results", log=lambda _: None, wandb=False)
    store = read_store(tmp_path / "results")
    val = store[store["split"] == "validation"]
    assert val["run_id"].nunique() == 6  # 2 λ × 3 λ_neg
    means = val.groupby(["lam", "lam_neg"], sort=False)["accuracy"].mean()
    best_lam, best_neg = means.idxmax()
    test = store[store["split"] == "test"]
    assert (test["lam"].unique().tolist(), test["lam_neg"].unique().tolist()) == ([best_lam], [best_neg])
    assert (result.lam, result.lam_neg) == (best_lam, best_neg)
    # the tested number is an independent merge at the chosen (λ, λ_neg) with the same exemplars
    suite = get_suite("sweep-toy", toy, None)
    grads = suite.exemplar_gradients(8, 0)
    ckpt = suite.checkpoints()
    plan = plan_merge(
        ckpt.pretrained,
        [ckpt.finetuned[t] for t in suite.tasks],
        trust_region="exemplar",
        components=["orthogonal", "negative"],
        gradients=[grads.abs_mean[t] for t in suite.tasks],
        signed_gradients=[grads.signed_mean[t] for t in suite.tasks],
    )
    expected = evaluate_merged(suite, plan.merged(0.9, best_lam, best_neg), "test")
    assert test.set_index("task")["accuracy"].to_dict() == pytest.approx(expected.accuracy)
    label = components_label(test["components"].iloc[0], test["lam_neg"].iloc[0])
    assert label == "negative (λ_neg)+orthogonal"
