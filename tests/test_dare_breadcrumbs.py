"""DARE, DARE-TIES and Model Breadcrumbs: against literal transcriptions of mergekit, statistically,
streamed in any order, at the door (config, CLI), and through an ablation to the report.

The references below are mergekit's `mergekit/sparsify.py` (the version that
`GeneralizedTaskArithmeticMerge` calls with `rescale=`) and the reduction of
`mergekit/merge_methods/generalized_task_arithmetic.py` (`GTATask.execute`, `get_mask`), transcribed
line by line. The one adaptation: mergekit's `bernoulli` draws from torch's global generator; each
call here is preceded by `torch.manual_seed(task_seed(seed, task, key))`, the seed tatr gives that
task's generator on that tensor, so the two draw the same masks.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from core_helpers import make_models, merged_keys
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import Tensor

from tatr import merge, plan_merge
from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.core.sparsify import Sparsity, breadcrumbs, breadcrumbs_keep, dare, sparsifier, task_seed

ROOT = Path(__file__).resolve().parents[1]


# --- mergekit/sparsify.py, transcribed (rescale=… version) ----------------------------------------
def magnitude_outliers(tensor: torch.Tensor, density: float, rescale: bool, gamma: float = 0.01):
    """Masks out smallest values in addition to large outliers.

    The `gamma` proportion of the largest weights are first removed, then the
    smallest weights are removed to achieve the desired density.
    """
    if density >= 1:
        return tensor

    num_elems = tensor.numel()
    target_n = int(density * num_elems)
    n_top = int(gamma * num_elems)
    n_bot = num_elems - target_n - n_top

    if n_bot < 0:
        # cut down on the number of large weights to remove in
        # order to hit the target density
        n_top += n_bot
        n_bot = 0

    w = tensor.abs().view(-1)
    if w.device.type == "cpu":
        w = w.float()
    indices = torch.sort(w, descending=False).indices
    mask = torch.zeros_like(tensor)

    mask.view(-1)[indices[n_bot:-n_top]] = 1

    if rescale:  # noqa: SIM108 - as in the reference
        res = rescale_sum(tensor, mask)
    else:
        res = tensor * mask
    return res


def rescale_sum(tensor: torch.Tensor, mask: torch.Tensor):
    """Rescales the values to match the original tensor sum."""
    org_sum = tensor.abs().sum()
    new_sum = (tensor * mask).abs().sum()

    if org_sum >= 1e-8 and new_sum >= 1e-8:
        tensor *= org_sum / new_sum
    return tensor * mask


def bernoulli(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return tensor

    if (tensor.device.type != "cpu") or tensor.dtype == torch.bfloat16:  # noqa: SIM108 - as in the reference
        work_dtype = tensor.dtype
    else:
        # torch.bernoulli not implemented for float16 on CPU, upcast to float32
        work_dtype = torch.float32

    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density, dtype=work_dtype))
    res = tensor.to(work_dtype) * mask
    if rescale:
        res /= density
    return res.to(tensor.dtype)


# --- mergekit/merge_methods/generalized_task_arithmetic.py, transcribed ---------------------------
def get_mask(delta: torch.Tensor, method: str = "sum", mask_dtype: torch.dtype | None = None):
    """Returns a mask determining which delta vectors should be merged
    into the final model."""
    if mask_dtype is None:
        mask_dtype = delta.dtype

    sign = delta.sign().to(mask_dtype)

    if method == "sum":
        sign_weight = delta.sum(dim=0)
        majority_sign = (sign_weight >= 0).to(mask_dtype) * 2 - 1
        del sign_weight
    elif method == "count":
        majority_sign = (sign.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')

    return sign == majority_sign


def gta_execute(
    base: Tensor,
    tvs: list[dict],
    sparsification_method: str | None,
    consensus_method: str | None,
    normalize: bool,
    rescale: bool,
    int8_mask: bool = False,
) -> Tensor:
    """`GTATask.execute` after `get_task_vectors` (each tv: delta, weight, density[, gamma], seed)."""
    # sparsify
    if sparsification_method:
        for tv_info in tvs:
            kwargs = {}
            if "gamma" in tv_info:
                kwargs["gamma"] = tv_info["gamma"]

            torch.manual_seed(tv_info["seed"])  # the adaptation: tatr's per-(seed, task, key) generator
            if sparsification_method == "random":
                tv_info["delta"] = bernoulli(tv_info["delta"], density=tv_info["density"], rescale=rescale)
            else:
                tv_info["delta"] = magnitude_outliers(
                    tv_info["delta"], density=tv_info["density"], rescale=rescale, **kwargs
                )

    deltas = torch.stack([tv["delta"] for tv in tvs], dim=0)
    weights = torch.tensor([tv["weight"] for tv in tvs], dtype=deltas.dtype, device=deltas.device)
    while len(deltas.shape) > len(weights.shape):
        weights.unsqueeze_(-1)

    weighted_deltas = deltas * weights

    # get sign consensus and mix deltas
    if consensus_method:
        mask_dtype = torch.int8 if int8_mask else base.dtype
        mask = get_mask(weighted_deltas, method=consensus_method, mask_dtype=mask_dtype)
        mixed_delta = (weighted_deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed_delta = weighted_deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1

    if normalize:
        mixed_delta /= divisor

    return (base + mixed_delta).to(base.dtype)


# mergekit's registry entries (mergekit/merge_methods/registry.py): sparsification, consensus,
# default_normalize, default_rescale
MERGEKIT = {
    "dare": ("random", None, False, True),  # dare_linear
    "dare-ties": ("random", "sum", False, True),  # dare_ties
    "breadcrumbs": ("magnitude_outliers", None, False, False),  # breadcrumbs
}


def mergekit_merge(
    pre: dict[str, Tensor],
    tasks: list[dict[str, Tensor]],
    method: str,
    lam: float,
    keep: dict[str, Tensor] | None,
    options: Sparsity,
) -> dict[str, Tensor]:
    """mergekit's merge of every floating key, each task at weight λ; the trust-region mask (if any)
    applied to the task vectors first, as the TATR paper does before running a merge's own code."""
    sparsification, consensus, normalize, rescale = MERGEKIT[method]
    out = {}
    for key, base in pre.items():
        if not base.is_floating_point():
            out[key] = base
            continue
        tvs = []
        for t, ft in enumerate(tasks):
            delta = ft[key].to(base.dtype) - base
            if keep is not None and key in keep:
                delta = torch.where(keep[key], delta, torch.zeros((), dtype=delta.dtype))
            tv = {"delta": delta, "weight": lam, "seed": task_seed(options.dare_seed, t, key)}
            if method == "breadcrumbs":
                tv.update(density=options.breadcrumbs_density, gamma=options.breadcrumbs_beta)
            else:
                tv.update(density=1.0 - options.dare_p)
            tvs.append(tv)
        out[key] = gta_execute(base, tvs, sparsification, consensus, normalize, rescale)
    return out


def keep_masks(pre: dict, tasks: list[dict], q: float) -> dict[str, Tensor]:
    """The zero-shot trust region's keep-mask per key (the TATR mask itself is tested elsewhere)."""
    plan = plan_merge(pre, tasks, method="ta", trust_region="zero-shot")
    keep = plan.keep_mask(q)
    return {k: plan.space.view(keep, i) for i, k in enumerate(plan.space.keys)}


# --- the sparsifiers against mergekit's ------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(7,), (33, 17), (4, 5, 6)])
def test_dare_draws_mergekits_masks_and_rescales_as_it_does(p: float, shape: tuple[int, ...]) -> None:
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    seed = task_seed(5, 2, "w")
    ours = dare(tau, p, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    assert torch.equal(ours, bernoulli(tau.clone(), 1.0 - p, rescale=True))
    assert ours.dtype == tau.dtype


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(100, 3000),
    beta=st.floats(0.01, 0.3),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_breadcrumbs_equals_mergekits_magnitude_outliers(n: int, beta: float, share: float, seed: int) -> None:
    """Distinct magnitudes (mergekit's sort is unstable, so ties are compared separately below) and
    at least one outlier dropped (mergekit's `indices[n_bot:-0]` is empty: see the test after)."""
    density = share * (1.0 - beta)
    tau = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    assume(torch.unique(tau.abs()).numel() == n and int(beta * n) > 0)
    assert torch.equal(
        breadcrumbs(tau, beta, density), magnitude_outliers(tau.clone(), density, rescale=False, gamma=beta)
    )
    kept = int((breadcrumbs(tau, beta, density) != 0).sum())
    assert kept == int(density * n)


def test_breadcrumbs_with_no_outlier_to_drop_keeps_the_band_not_nothing() -> None:
    """β·n < 1: mergekit's slice `indices[n_bot:-0]` is empty and drops the whole tensor; tatr keeps
    the `density` fraction of largest magnitudes (no outlier dropped), as the count says."""
    tau = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert int(0.01 * 64) == 0
    assert not magnitude_outliers(tau.clone(), 0.5, rescale=False, gamma=0.01).any()  # the reference's quirk
    ours = breadcrumbs(tau, 0.01, 0.5)
    order = torch.sort(tau.abs(), stable=True).indices
    expected = torch.zeros(64, dtype=torch.bool)
    expected[order[32:]] = True
    assert torch.equal(ours != 0, expected)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=20, max_size=400),
    beta=st.floats(0.05, 0.3),
    share=st.floats(0.0, 1.0),
)
def test_breadcrumbs_breaks_ties_by_index(values: list[int], beta: float, share: float) -> None:
    """Many equal magnitudes (zeros above all, as a trust-region mask leaves): exactly the entries at
    stable ranks [n_bot, n − n_top) are kept, the lower index first among equals."""
    density = share * (1.0 - beta)
    tau = torch.tensor(values, dtype=torch.float32)
    n = tau.numel()
    n_top = int(beta * n)
    n_bot = max(n - int(density * n) - n_top, 0)
    n_top = n - int(density * n) - n_bot
    order = torch.sort(tau.abs(), stable=True).indices
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[n_bot : n - n_top]] = True
    assert torch.equal(breadcrumbs_keep(tau, beta, density), expected)


# --- whole merges against mergekit's -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["dare", "dare-ties", "breadcrumbs"])
@pytest.mark.parametrize("trust_region", ["off", "zero-shot"])
def test_merge_equals_mergekit(method: str, trust_region: str) -> None:
    pre, tasks = make_models(4, seed=11)
    options = Sparsity(dare_p=0.6, dare_seed=9, breadcrumbs_beta=0.1, breadcrumbs_density=0.6)
    q, lam = 0.8, 0.7
    ours = merge(
        pre,
        tasks,
        method=method,
        trust_region=trust_region,
        q=q,
        lam=lam,
        dare_p=options.dare_p,
        dare_seed=options.dare_seed,
        breadcrumbs_beta=options.breadcrumbs_beta,
        breadcrumbs_density=options.breadcrumbs_density,
    )
    keep = None if trust_region == "off" else keep_masks(pre, tasks, q)
    reference = mergekit_merge(pre, tasks, method, lam, keep, options)
    assert set(ours) == set(pre)
    for k in pre:
        # λ·Σ_t τ'_t here, Σ_t λ·τ'_t there: equal up to float32 rounding, with the same masks
        torch.testing.assert_close(ours[k], reference[k], rtol=2e-6, atol=2e-7)
    for k in merged_keys(pre):  # the same coordinates moved: the same masks, not merely close values
        assert torch.equal(ours[k] != pre[k], reference[k] != pre[k]), k
    ta = merge(pre, tasks, method="ta", trust_region=trust_region, q=q, lam=lam)
    assert not torch.allclose(ours["blocks.0.attn.weight"], ta["blocks.0.attn.weight"])  # it did sparsify


def test_dare_ties_elects_plus_where_the_sum_is_zero() -> None:
    """mergekit's `sign_weight >= 0`: a coordinate whose surviving entries sum to exactly 0 keeps its
    positive entries (TIES' reference would take the model-wide majority sign instead)."""
    pre = {"w": torch.zeros(4)}
    tasks = [{"w": torch.tensor([1.0, -2.0, 0.5, -1.0])}, {"w": torch.tensor([-1.0, -1.0, 0.5, 1.0])}]
    out = merge(pre, tasks, method="dare-ties", trust_region="off", lam=1.0, dare_p=0.0)
    assert out["w"].tolist() == [1.0, -3.0, 1.0, 1.0]
    reference = mergekit_merge(pre, tasks, "dare-ties", 1.0, None, Sparsity(dare_p=0.0))
    assert torch.equal(out["w"], reference["w"])


# --- statistics ----------------------------------------------------------------------------------------
def test_dare_mean_over_seeds_is_task_arithmetic() -> None:
    """E[DARE(τ)] = τ: the mean of the merged task vectors over S seeds is Σ_t τ_t, within the
    sampling error Var = Σ_t τ_t²·p/(1−p) / S per coordinate (z-scores: mean ≈ 0, mean square ≈ 1)."""
    pre, tasks = make_models(3, seed=2)
    p, seeds = 0.7, 300
    ta = plan_merge(pre, tasks, method="ta", trust_region="off").merged_task_vector(1.0)
    plans = [plan_merge(pre, tasks, method="dare", trust_region="off", dare_p=p, dare_seed=s) for s in range(seeds)]
    draws = torch.stack([plan.merged_task_vector(1.0).double() for plan in plans])
    keys = plans[0].space.keys
    tau_sq = sum(torch.cat([(t[k] - pre[k]).reshape(-1).double() ** 2 for k in keys]) for t in tasks)
    sigma = (tau_sq * p / (1 - p) / seeds).sqrt()
    z = (draws.mean(0) - ta.double()) / sigma
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float((z**2).mean()) - 1.0) < 4 * math.sqrt(2 / n)
    assert not torch.equal(draws[0], draws[1])  # different seeds, different masks


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drops_a_fraction_p(p: float) -> None:
    """Over every (task, tensor) mask of a merge, the dropped share of nonzero entries is p (5σ)."""
    tau = torch.randn(50_000, generator=torch.Generator().manual_seed(1)) + 10.0  # no zeros
    sparsify = sparsifier("dare", Sparsity(dare_p=p, dare_seed=4), "blocks.0.attn.weight")
    assert sparsify is not None
    dropped = sum(int((sparsify(t, tau)(tau) == 0).sum()) for t in range(4))
    m = 4 * tau.numel()
    assert abs(dropped / m - p) < 5 * math.sqrt(p * (1 - p) / m)
    kept = sparsify(0, tau)(tau)
    torch.testing.assert_close(kept[kept != 0], tau[kept != 0] / (1 - p))


# --- reproducible, and independent of the streaming order ----------------------------------------------
@pytest.mark.parametrize("method", ["dare", "dare-ties", "breadcrumbs"])
def test_result_does_not_depend_on_the_order_of_tensors(method: str) -> None:
    pre, tasks = make_models(3, seed=5)
    forward = merge(pre, tasks, method=method, trust_region="zero-shot", q=0.9, lam=0.5, dare_seed=3)
    rev = list(reversed(list(pre)))
    backward = merge(
        {k: pre[k] for k in rev},
        [{k: t[k] for k in rev} for t in tasks],
        method=method,
        trust_region="zero-shot",
        q=0.9,
        lam=0.5,
        dare_seed=3,
    )
    for k in pre:
        assert torch.equal(forward[k], backward[k]), k


def test_dare_masks_depend_on_seed_task_and_key_only() -> None:
    """Same seed, same merge; another seed, another; a key's masks do not change when other keys go."""
    pre, tasks = make_models(3, seed=6)
    a = merge(pre, tasks, method="dare", trust_region="off", dare_seed=1)
    assert all(
        torch.equal(a[k], v) for k, v in merge(pre, tasks, method="dare", trust_region="off", dare_seed=1).items()
    )
    b = merge(pre, tasks, method="dare", trust_region="off", dare_seed=2)
    assert not torch.equal(a["blocks.0.attn.weight"], b["blocks.0.attn.weight"])
    drop = "blocks.0.attn.weight"
    fewer = merge(
        {k: v for k, v in pre.items() if k != drop},
        [{k: v for k, v in t.items() if k != drop} for t in tasks],
        method="dare",
        trust_region="off",
        dare_seed=1,
    )
    for k in fewer:
        assert torch.equal(fewer[k], a[k]), k


def test_tensors_and_tasks_of_one_shape_get_different_masks() -> None:
    """The seed names the tensor and the task: equal task vectors on two keys (or of two tasks) of
    one shape are not dropped alike."""
    pre = {"a": torch.zeros(40, 30), "b": torch.zeros(40, 30)}
    tau = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    tasks = [{"a": tau.clone(), "b": tau.clone()}, {"a": tau.clone(), "b": tau.clone()}]
    out = plan_merge(pre, tasks, method="dare", trust_region="off", dare_p=0.5).merged_task_vector(1.0)
    a, b = out[:1200], out[1200:]
    assert not torch.equal(a, b)
    kept_twice = int(((a - 2 * tau.reshape(-1) * 2).abs() < 1e-5).sum())  # both tasks kept the entry
    assert 0.1 < kept_twice / 1200 < 0.4  # independent masks keep an entry twice with chance 1/4


def test_task_seeds_are_the_same_in_another_process() -> None:
    """A stable hash, not Python's salted `hash`: another interpreter derives the same seeds."""
    code = "from tatr.core.sparsify import task_seed; print([task_seed(7, t, 'a.b') for t in range(3)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(other.stdout) == [task_seed(7, t, "a.b") for t in range(3)]
    assert len({task_seed(0, 0, "a"), task_seed(0, 1, "a"), task_seed(1, 0, "a"), task_seed(0, 0, "b")}) == 4


# --- at the door -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dare_p": 1.0}, "DARE drop rate p must be in [0, 1)"),
        ({"dare_p": -0.1}, "DARE drop rate p must be in [0, 1)"),
        ({"dare_p": float("nan")}, "DARE drop rate p must be in [0, 1)"),
        ({"dare_seed": -1}, "DARE seed must be a non-negative integer"),
        ({"breadcrumbs_beta": 1.5}, "β (beta) must be in [0, 1]"),
        ({"breadcrumbs_density": -0.1}, "density must be in [0, 1]"),
        ({"breadcrumbs_beta": 0.2, "breadcrumbs_density": 0.9}, "β + density must be at most 1"),
    ],
)
def test_bad_options_are_refused_by_the_api_and_the_config(options: dict, message: str) -> None:
    from tatr.runs.config import load_config

    pre, tasks = make_models(2)
    with pytest.raises(TatrError, match=re.escape(message)):
        merge(pre, tasks, method="dare", **options)
    overrides = [
        f"merge.{k}={v if not isinstance(v, float) or math.isfinite(v) else '.nan'}" for k, v in options.items()
    ]
    with pytest.raises(TatrError) as caught:
        load_config(None, overrides)
    assert "\n" not in str(caught.value) and "merge" in str(caught.value)


@pytest.fixture()
def files(tmp_path: Path) -> dict:
    pre, tasks = make_models(3, seed=4)
    save_file(pre, tmp_path / "pre.safetensors")
    paths = []
    for i, t in enumerate(tasks):
        paths.append(tmp_path / f"ft{i}.safetensors")
        save_file(t, paths[-1])
    return {"dir": tmp_path, "pre": tmp_path / "pre.safetensors", "ft": paths, "state": (pre, tasks)}


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["merge", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("method", "flags", "api"),
    [
        ("dare", ["--drop-rate", "0.3", "--seed", "7"], {"dare_p": 0.3, "dare_seed": 7}),
        ("dare-ties", ["--drop-rate", "0.8"], {"dare_p": 0.8}),
        ("breadcrumbs", ["--beta", "0.1", "--density", "0.5"], {"breadcrumbs_beta": 0.1, "breadcrumbs_density": 0.5}),
    ],
)
def test_cli_passes_the_options_through(method: str, flags: list, api: dict, files: dict, capsys) -> None:
    out = files["dir"] / "m.safetensors"
    code, _, err = run(
        ["-p", files["pre"], "-f", *files["ft"], "--method", method, *flags, "--q", "0.9", "-o", out], capsys
    )
    assert code == 0, err
    pre, tasks = files["state"]
    expected = merge(pre, tasks, method=method, q=0.9, **api)
    got = load_file(out)
    for k in pre:
        assert torch.equal(got[k], expected[k]), k
    assert not torch.equal(got["blocks.0.attn.weight"], merge(pre, tasks, method=method, q=0.9)["blocks.0.attn.weight"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "dare", "--drop-rate", "1"], "DARE drop rate p must be in [0, 1), got 1.0"),
        (["--method", "dare", "--drop-rate", "nan"], "DARE drop rate p must be in [0, 1), got nan"),
        (["--method", "dare", "--drop-rate", "lots"], "--drop-rate must be a number, got 'lots'"),
        (["--method", "dare-ties", "--seed", "-1"], "DARE seed must be a non-negative integer, got -1"),
        (["--method", "dare", "--seed", "1.5"], "--seed must be an integer, got '1.5'"),
        (["--method", "breadcrumbs", "--beta", "0.2", "--density", "0.9"], "β + density must be at most 1"),
        (["--method", "breadcrumbs", "--density", "1.2"], "Breadcrumbs density must be in [0, 1], got 1.2"),
        (["--method", "breadcrumbs", "--beta", "inf"], "Breadcrumbs β (beta) must be in [0, 1], got inf"),
        (["--method", "ta", "--drop-rate", "0.3"], "--drop-rate applies to dare, dare-ties, not to --method ta"),
        (["--method", "dare", "--beta", "0.1"], "--beta applies to breadcrumbs, not to --method dare"),
        (
            ["--method", "breadcrumbs", "--seed", "3"],
            "--seed applies to dare, dare-ties, mergekit-dare-linear, mergekit-dare-ties, not to --method breadcrumbs",
        ),
        (["--method", "dare", "--lam-neg", "0.5"], "lam_neg scales the negative component apart"),
        (["--method", "dare", "--lam-neg", "nan"], "λ_neg (lam_neg) must be a finite number"),
    ],
)
def test_cli_bad_options_are_one_line_and_write_nothing(argv: list, needle: str, files: dict, capsys) -> None:
    out = files["dir"] / "m.safetensors"
    code, _, err = run(["-p", files["pre"], "-f", *files["ft"], *argv, "-o", out], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tatr: error: "), err
    assert needle in lines[0]
    assert not out.exists()


# --- through an ablation, into the store and the report ----------------------------------------------
def test_plugin_ablation_rows_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
    from tatr.report import tables
    from tatr.runs import ablation_spec, ablations
    from tatr.store.rows import read_store
    from tatr.suites import get_suite
    from tatr.suites.evaluation import evaluate_merged

    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    toy = {"tasks": 3, "n": 48}
    body = {
        "name": "plug",
        "benchmark": "sweep-toy",
        "suite": toy,
        "merge": {"dare_p": 0.4, "dare_seed": 2, "breadcrumbs_beta": 0.05, "breadcrumbs_density": 0.5},
        "ablation": {
            "kind": "plugin",
            "lam": [0.3, 0.9],
            "q": [0.9],
            "variants": [
                {"method": "dare", "trust_region": "zero-shot"},
                {"method": "dare-ties", "trust_region": "off"},
                {"method": "breadcrumbs", "trust_region": "zero-shot"},
            ],
        },
    }
    path = tmp_path / "plug.yaml"
    path.write_text(json.dumps(body))
    config, spec = ablation_spec.load_ablation(path)
    results = ablations.run(config, spec, tmp_path / "results", log=lambda _: None, wandb=False)
    rows = tables.prepare(read_store(tmp_path / "results"))
    test = rows[rows["split"] == "test"]
    assert sorted(test["label"].unique()) == ["Breadcrumbs+TR", "DARE+TR", "DARE-TIES"]
    dare_rows = test[test["method"] == "dare"]
    assert set(dare_rows["dare_p"]) == {0.4} and set(dare_rows["dare_seed"]) == {2}
    assert dare_rows["breadcrumbs_beta"].isna().all() and dare_rows["ties_k"].isna().all()
    crumbs = test[test["method"] == "breadcrumbs"]
    assert set(crumbs["breadcrumbs_density"]) == {0.5} and crumbs["dare_p"].isna().all()
    # the tested number is an independent merge + evaluation of the chosen λ
    suite = get_suite("sweep-toy", toy)
    ckpt = suite.checkpoints()
    first = results[0]
    plan = plan_merge(
        ckpt.pretrained,
        [ckpt.finetuned[t] for t in suite.tasks],
        method="dare",
        trust_region="zero-shot",
        dare_p=0.4,
        dare_seed=2,
    )
    assert first.test == pytest.approx(evaluate_merged(suite, plan.merged(0.9, first.lam), "test").accuracy)
