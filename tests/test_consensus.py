"""Consensus merging (`tatr.core.consensus`) against the reference code, transcribed line by line below.

Sources: FusionBench 0.2.33 (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1):
`fusion_bench/method/tall_mask/utils.py` (`generate_task_masks`, `construct_consensus_mask`),
`fusion_bench/utils/parameters.py` (`state_dict_to_vector`, `vector_to_state_dict`),
`fusion_bench/utils/state_dict_arithmetic.py` (`state_dict_sum`); FusionBench has no consensus merge, so
the merge itself is the original's, nik-dim/tall_masks commit d10af8b21383322367fb35474bd9cd0f9ebe9ecf:
`src/eval/aggregation.py::create_task_vector` (method "consensus") and `src/models/task_vectors.py::
_TaskVector.apply_to`.

Exactness: every step is element-wise, and the combiner repeats the reference's own expressions, so the
results are equal bit for bit (masks included, ties decided alike) wherever the reference's inputs are
reproduced: θ_t = θ_0 + τ_t exactly (fine-tuned-like models, |θ_t − θ_0| ≤ |θ_0|, and models on a
dyadic grid, where every sum is exact and ties are frequent), and Σ τ summed in the same order. The two
tolerances, each explained where used: torch's `sum(dim=0)` (the original's) against the left fold
(FusionBench's `state_dict_sum`, tatr's), and models whose θ_t cannot be rebuilt from θ_0 and τ_t.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from tatr import merge
from tatr.core import consensus as cons
from tatr.core.errors import TatrError
from tatr.core.methods import METHODS, MergeMethod
from tatr.core.options import COMBINERS, check_options, get_option


# --- the reference, transcribed ------------------------------------------------------------------------
# fusion_bench/utils/parameters.py::state_dict_to_vector (v0.2.33); its nn.Module branch is dropped.
def state_dict_to_vector(state_dict, remove_keys=None):
    remove_keys = remove_keys if remove_keys is not None else []

    shared_state_dict = copy.copy(state_dict)

    # remove the keys to be removed
    for key in remove_keys:
        if key in shared_state_dict:
            del shared_state_dict[key]

    # sort the reference dict
    sorted_shared_state_dict = OrderedDict(sorted(shared_state_dict.items()))

    vector = nn.utils.parameters_to_vector([value.reshape(-1) for key, value in sorted_shared_state_dict.items()])
    return vector


# fusion_bench/utils/parameters.py::vector_to_state_dict (v0.2.33); its nn.Module branch is dropped. Its
# shallow copy lets `vector_to_parameters` replace the `.data` of the caller's tensors: callers below pass
# a fresh clone of θ_0 as the reference dict.
def vector_to_state_dict(vector, state_dict, remove_keys=None):
    remove_keys = remove_keys if remove_keys is not None else []

    # shallow copy the state_dict
    reference_dict = copy.copy(state_dict)

    # remove the keys to be removed
    for key in remove_keys:
        if key in reference_dict:
            del reference_dict[key]

    # sort the reference dict
    sorted_reference_dict = OrderedDict(sorted(reference_dict.items()))

    # create a shared state dict using the reference dict
    nn.utils.vector_to_parameters(vector, sorted_reference_dict.values())

    # add back the encoder and decoder embedding weights.
    if "transformer.shared.weight" in sorted_reference_dict:
        for key in remove_keys:
            sorted_reference_dict[key] = sorted_reference_dict["transformer.shared.weight"]
    return sorted_reference_dict


# fusion_bench/utils/state_dict_arithmetic.py::state_dict_sum (v0.2.33); its validation calls are dropped.
def state_dict_sum(state_dicts):
    sum_state_dict = OrderedDict()

    # Initialize with zeros
    for key in state_dicts[0]:
        sum_state_dict[key] = torch.zeros_like(state_dicts[0][key])

    # Accumulate all state dicts
    for state_dict in state_dicts:
        for key in sum_state_dict:
            sum_state_dict[key] += state_dict[key]

    return sum_state_dict


# fusion_bench/method/tall_mask/utils.py::generate_task_masks (v0.2.33); its two `print` calls are dropped.
def generate_task_masks(tv_flat_checks, flat_ft, flat_ptm, tv=None, tall_mask_lambda=1.0):
    if tv is None:
        tv = tv_flat_checks.sum(0)

    flat_multi = flat_ptm + tv

    original_shape = flat_ft.shape

    # generate masks by comparing the l1 distance between |theta_0 - theta_t| and |theta_mt - theta_t|
    diff_pt_ft = (flat_ptm - flat_ft).abs()
    diff_multi_ft = (flat_multi - flat_ft).abs()
    # compare the l1 distance, scaled with hyper-parameter lambda
    mask = diff_pt_ft > diff_multi_ft * tall_mask_lambda

    final_mask = mask.squeeze() if original_shape == tv_flat_checks.squeeze().shape else mask

    return final_mask


# fusion_bench/method/tall_mask/utils.py::construct_consensus_mask (v0.2.33). Adapted: it takes the TALL
# masks (the values of what `load_tall_mask` returns: one {key: mask} per task) instead of loading them
# from disk through `config`; its `print` is dropped.
def construct_consensus_mask(tall_masks, prun_thre_k, remove_keys=[]):  # noqa: B006 - as in the reference
    # load TALL masks (in shape (n_task, n_parameter))
    tall_masks = list(tall_masks)

    # generate consensus masks
    consensus_mask = copy.deepcopy(tall_masks[0])
    for key, value in consensus_mask.items():
        consensus_mask[key] = torch.zeros_like(value)
        # count for each parameter, the tasks it has been activated for
        for mask in tall_masks:
            consensus_mask[key] = consensus_mask[key] + mask[key].float()
        # filter out the least-activated parameters based on given threshold
        consensus_mask[key] = consensus_mask[key].float() >= prun_thre_k
    consensus_mask_vector = state_dict_to_vector(consensus_mask, remove_keys=remove_keys)

    return consensus_mask_vector


def reference_merge(pre, tasks, tall_mask_lambda, prun_thre_k, alpha, fold=True):
    """tall_masks' `create_task_vector` for method "consensus", with the masks it loads built as its
    `construct_tall_mask` builds them (at one λ), then `apply_to` at scaling coefficient `alpha`.

    Adapted: the checkpoints are given (not loaded); `remove_keys` names the integer keys (the original's
    CLIP state dicts have none; flattened with the floats they would not move either); `fold=True` takes
    the multi-task vector as FusionBench's `state_dict_sum` of the τ dicts (the left fold tatr uses) rather
    than `tv_flat_checks.sum(dim=0)`; `topk_values_mask(K=100)` (the default k) is the identity and omitted.
    Returns (merged model, merged task vector as a dict, consensus mask as a dict)."""
    ft_checks, ptm_check = tasks, pre
    remove_keys = [k for k, v in pre.items() if not v.is_floating_point()]

    flat_ft = torch.vstack([state_dict_to_vector(check, remove_keys) for check in ft_checks])
    flat_ptm = state_dict_to_vector(ptm_check, remove_keys)

    # compute the task vector as {\theta_t - \theta_0}.
    tv_flat_checks = flat_ft - flat_ptm

    if fold:
        floats = [k for k in pre if k not in remove_keys]
        merged_tv = state_dict_to_vector(state_dict_sum([{k: ft[k] - pre[k] for k in floats} for ft in tasks]))
    else:
        merged_tv = tv_flat_checks.sum(dim=0)
    # construct_tall_mask, at one tall_mask_lambda
    masks_at_scale = generate_task_masks(
        tv_flat_checks, flat_ft, flat_ptm, tall_mask_lambda=tall_mask_lambda, tv=merged_tv
    )
    masks_at_scale = [vector_to_state_dict(mask, _clone(ptm_check), remove_keys=remove_keys) for mask in masks_at_scale]
    # create_task_vector, method "consensus"
    consensus_mask = construct_consensus_mask(masks_at_scale, prun_thre_k, remove_keys)
    # apply the consensus mask to filter multi-task vector
    merged_tv = merged_tv * consensus_mask
    merged_tv_state_dict = vector_to_state_dict(merged_tv, _clone(ptm_check), remove_keys=remove_keys)
    # _TaskVector.apply_to (keys missing from the vector are skipped there and keep θ_0 on loading)
    new_state_dict = {}
    for key in ptm_check:
        if key not in merged_tv_state_dict:
            new_state_dict[key] = ptm_check[key]
            continue
        new_state_dict[key] = ptm_check[key] + alpha * merged_tv_state_dict[key]
    mask_dict = vector_to_state_dict(consensus_mask, _clone(ptm_check), remove_keys=remove_keys)
    return new_state_dict, merged_tv_state_dict, mask_dict


def _clone(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in sd.items()}


# --- models --------------------------------------------------------------------------------------------
SHAPES = {"enc.attn.weight": (16, 12), "enc.attn.bias": (16,), "enc.conv": (5, 4, 3), "head.one": (1,), "scale": ()}


def models(kind: str, num_tasks: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """θ_0 (the SHAPES, an int buffer, a key no task changes) and T fine-tuned copies.

    "finetuned": |θ_t − θ_0| ≤ |θ_0| elementwise, so τ_t = θ_t − θ_0 is exact (Dekker) and θ_0 + τ_t
    rebuilds θ_t bit for bit. "grid": multiples of 1/16 below 2^8, where every sum is exact and masks tie
    often (λ·|θ_MTL − θ_t| = |τ_t| exactly). "wild": each θ_t drawn apart from θ_0, so that θ_t − θ_0
    rounds and θ_0 + τ_t ≠ θ_t at about a third of the coordinates: the reference's inputs are not
    reproduced there."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape):
        if kind == "grid":
            return torch.randint(-64, 65, shape, generator=g).to(dtype) / 16
        return torch.randn(shape, generator=g, dtype=dtype)

    pre = {k: draw(s) for k, s in SHAPES.items()}
    pre["ids"] = torch.arange(6)
    pre["frozen"] = draw((4,))
    tasks = []
    for _ in range(num_tasks):
        ft = {}
        for k, v in pre.items():
            if k in SHAPES:
                if kind == "grid":
                    step = torch.randint(-12, 13, v.shape, generator=g).to(dtype) / 16
                else:
                    step = torch.randn(v.shape, generator=g, dtype=dtype) * 0.3
                if kind == "finetuned":
                    step = step.sign() * torch.minimum(step.abs(), v.abs())
                ft[k] = draw(v.shape) if kind == "wild" else v + step
            else:
                ft[k] = v.clone()
        tasks.append(ft)
    return pre, tasks


def combined(pre, tasks, lam_tall: float, k: int) -> dict[str, Tensor]:
    """The combiner applied key by key, as `reduce_tasks` calls it (τ_t in θ_0's dtype)."""
    values = check_options({"tall_mask_lambda": lam_tall, "consensus_k": k})
    combine = COMBINERS.get("consensus").combine
    return {key: combine(key, [ft[key] - pre[key] for ft in tasks], pre[key], values) for key in SHAPES}


@pytest.fixture()
def consensus_method() -> Iterator[str]:
    """A consensus TA method registered here only (tatr's own is registered by `tatr.core.methods`)."""
    name = "consensus-under-test"
    METHODS.add(name, MergeMethod(name, "Consensus (test)", "none", False, "sum", 0.3, "test", combine="consensus"))
    try:
        yield name
    finally:
        METHODS._items.pop(name, None)


TASKS = (2, 3, 8)
KS = (0, 1, 2, "T")
LAMBDAS = (0.0, 0.2, 0.5, 0.6, 1.0, 1.7)


# --- the combiner against the transcription ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["finetuned", "grid"])
@pytest.mark.parametrize("lam_tall", LAMBDAS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("num_tasks", TASKS)
def test_the_combiner_equals_the_reference_bit_for_bit(
    num_tasks: int, k: int | str, lam_tall: float, kind: str
) -> None:
    k = num_tasks if k == "T" else k
    pre, tasks = models(kind, num_tasks, seed=num_tasks)
    _, ref_tv, ref_mask = reference_merge(pre, tasks, lam_tall, k, 1.0)
    ours = combined(pre, tasks, lam_tall, k)
    for key in SHAPES:
        assert torch.equal(ours[key], ref_tv[key]), key
        taus = [ft[key] - pre[key] for ft in tasks]
        assert torch.equal(cons.consensus_count(taus, pre[key], lam_tall) >= k, ref_mask[key]), key
    if kind == "grid" and lam_tall == 0.5:  # ties occur, and both sides decide them alike (strict >)
        key, taus = "enc.attn.weight", [ft["enc.attn.weight"] - pre["enc.attn.weight"] for ft in tasks]
        multi = pre[key] + cons.task_sum(taus)
        assert any(bool((t.abs() == 0.5 * (multi - pre[key] - t).abs()).any()) for t in taus)


@pytest.mark.parametrize("num_tasks", TASKS)
def test_torch_sum_over_tasks_changes_only_last_bits(num_tasks: int) -> None:
    """The original sums the flattened τ with `sum(dim=0)`, whose order over T rows is torch's (not a left
    fold for every (T, N): e.g. T = 8 at these sizes); the combiner folds in task order. Where the two sums
    agree bit for bit, so do the masks and M; elsewhere they differ by float32 rounding of the sum."""
    pre, tasks = models("finetuned", num_tasks, seed=10 + num_tasks)
    _, fold_tv, _ = reference_merge(pre, tasks, 0.6, 0, 1.0, fold=True)
    _, torch_tv, _ = reference_merge(pre, tasks, 0.6, 0, 1.0, fold=False)
    ours = combined(pre, tasks, 0.6, 0)
    for key in SHAPES:
        assert torch.equal(ours[key], fold_tv[key])
        scale = sum((ft[key] - pre[key]).abs() for ft in tasks)
        assert torch.all((torch_tv[key] - fold_tv[key]).abs() <= 8 * torch.finfo(torch.float32).eps * scale), key
    if num_tasks <= 3:  # a left fold there: the original's sum itself is matched
        assert all(torch.equal(ours[key], torch_tv[key]) for key in SHAPES)


def test_unrebuildable_models_differ_only_at_borderline_coordinates() -> None:
    """Where θ_0 + τ_t ≠ θ_t (θ_t far from θ_0: the subtraction rounded), |θ_MTL − θ_t| is rounded
    differently from the reference's, so a mask may differ, but only where its comparison is within a few
    float32 roundings of a tie (relative to the magnitudes involved)."""
    eps = torch.finfo(torch.float32).eps
    flipped = 0
    for seed in range(6):
        pre, tasks = models("wild", 3, seed=seed)
        for lam_tall in (0.3, 0.6, 1.0):
            _, ref_tv, ref_mask = reference_merge(pre, tasks, lam_tall, 1, 1.0)
            ours = combined(pre, tasks, lam_tall, 1)
            for key in SHAPES:
                taus = [ft[key] - pre[key] for ft in tasks]
                mine = cons.consensus_count(taus, pre[key], lam_tall) >= 1
                differ = mine != ref_mask[key]
                flipped += int(differ.sum())
                assert torch.equal(ours[key][~differ], ref_tv[key][~differ])
                multi = pre[key] + cons.task_sum(taus)
                size = pre[key].abs() + sum(t.abs() for t in taus) + multi.abs()
                # each task's distance from a tie in the reference's own comparison; the closest one
                gaps = [(t.abs() - (multi - ft[key]).abs() * lam_tall).abs() for t, ft in zip(taus, tasks, strict=True)]
                margin = torch.stack(gaps).amin(0)
                assert torch.all(margin[differ] <= 8 * eps * max(lam_tall, 1.0) * size[differ]), key
    assert flipped <= 3  # rare: a handful at most over all these draws


# --- the whole merge through tatr ----------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("lam_tall", [0.2, 0.6, 1.0])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("num_tasks", TASKS)
def test_merge_equals_the_reference_model(
    consensus_method: str, num_tasks: int, k: int | str, lam_tall: float, alpha: float
) -> None:
    k = num_tasks if k == "T" else k
    pre, tasks = models("finetuned", num_tasks, seed=100 + num_tasks)
    ref, _, _ = reference_merge(pre, tasks, lam_tall, k, alpha)
    merged = merge(
        pre, tasks, method=consensus_method, trust_region="off", lam=alpha, tall_mask_lambda=lam_tall, consensus_k=k
    )
    assert merged.keys() == pre.keys()
    for key in pre:
        assert merged[key].dtype == pre[key].dtype and torch.equal(merged[key], ref[key].to(pre[key].dtype)), key


def test_float64_models_and_the_defaults(consensus_method: str) -> None:
    pre, tasks = models("finetuned", 3, seed=7, dtype=torch.float64)
    ref, _, _ = reference_merge(pre, tasks, cons.TALL_MASK_LAMBDA, cons.CONSENSUS_K, 0.3)
    merged = merge(pre, tasks, method=consensus_method, trust_region="off")  # λ = 0.3, λ_tall = 0.6, k = 2
    assert all(torch.equal(merged[key], ref[key]) for key in pre)
    assert merged["ids"].dtype == torch.int64 and torch.equal(merged["ids"], pre["ids"])


def test_k_zero_is_task_arithmetic_and_k_is_bounded_by_the_tasks(consensus_method: str) -> None:
    pre, tasks = models("finetuned", 3, seed=3)
    ta = merge(pre, tasks, method="ta", trust_region="off", lam=0.4)
    zero = merge(pre, tasks, method=consensus_method, trust_region="off", lam=0.4, consensus_k=0)
    assert all(torch.equal(ta[key], zero[key]) for key in pre)
    fewer = merge(pre, tasks, method=consensus_method, trust_region="off", lam=0.4, consensus_k=2)
    assert any(not torch.equal(ta[key], fewer[key]) for key in SHAPES)
    message = (
        "consensus k=4 exceeds the number of tasks (3): no weight can be held by 4 tasks' TALL masks, "
        "so the merge would be θ_0; give k ≤ 3 (k = 0 is TA)"
    )
    with pytest.raises(TatrError) as caught:
        merge(pre, tasks, method=consensus_method, trust_region="off", consensus_k=4)
    assert str(caught.value) == message


def test_the_trust_region_masks_each_task_vector_before_the_masks(consensus_method: str) -> None:
    """With a trust region the combiner sees each θ_t as θ_0 + (masked τ_t): a coordinate the region drops
    for every task is not moved, and the result is the reference's on those masked models."""
    from tatr.core.merging import plan_merge

    pre, tasks = models("finetuned", 3, seed=5)
    plan = plan_merge(pre, tasks, method=consensus_method, trust_region="zero-shot", tall_mask_lambda=0.6)
    keep = plan.keep_mask(0.8)
    masked_tasks = []
    for ft in tasks:
        masked = dict(ft)
        for i, key in enumerate(plan.space.keys):
            kept = plan.space.view(keep, i)
            masked[key] = torch.where(kept, ft[key], pre[key])
        masked_tasks.append(masked)
    ref, _, _ = reference_merge(pre, masked_tasks, 0.6, 2, 0.5)
    merged = plan.merged(0.8, 0.5)
    assert all(torch.equal(merged[key], ref[key]) for key in pre)


# --- the options --------------------------------------------------------------------------------------
def test_the_options_are_declared_with_their_defaults_and_ranges() -> None:
    values = check_options({})
    assert values["tall_mask_lambda"] == 0.6 and values["consensus_k"] == 2
    lam, k = get_option("tall_mask_lambda"), get_option("consensus_k")
    assert (lam.flag, k.flag) == ("--tall-mask-lambda", "--consensus-k")
    assert lam.searchable and not k.searchable  # an int option is set, not searched by sweeps
    assert lam.text(0.6) == "λ_tall=0.6" and k.text(2) == "k=2"
    assert COMBINERS.get("consensus").options == cons.CONSENSUS_OPTIONS
    assert check_options({"tall_mask_lambda": 0, "consensus_k": 0})["consensus_k"] == 0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("tall_mask_lambda", -0.1, "TALL mask λ (tall_mask_lambda) must be in [0, ∞), got -0.1"),
        ("tall_mask_lambda", float("inf"), "TALL mask λ (tall_mask_lambda) must be in [0, ∞), got inf"),
        ("tall_mask_lambda", float("nan"), "TALL mask λ (tall_mask_lambda) must be in [0, ∞), got nan"),
        ("tall_mask_lambda", "0.6", "TALL mask λ (tall_mask_lambda) must be in [0, ∞), got '0.6'"),
        ("consensus_k", -1, "Consensus k (prun_thre_k) must be a non-negative integer, got -1"),
        ("consensus_k", 1.5, "Consensus k (prun_thre_k) must be a non-negative integer, got 1.5"),
        ("consensus_k", 2.0, "Consensus k (prun_thre_k) must be a non-negative integer, got 2.0"),
        ("consensus_k", True, "Consensus k (prun_thre_k) must be a non-negative integer, got True"),
    ],
)
def test_a_bad_option_gets_its_range_in_one_line(name: str, value: object, message: str) -> None:
    with pytest.raises(TatrError) as caught:
        check_options({name: value})
    assert str(caught.value) == message
