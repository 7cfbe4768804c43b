"""Fisher merging (`tatr.core.fisher`) against FusionBench's code, transcribed line by line below.

Source: FusionBench 0.2.33 (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1):
`fusion_bench/method/fisher_merging/fisher_merging.py` (`get_param_names_to_merge`,
`get_param_squared_gradients`, `get_models_fisher_norm`, `merging_with_fisher_weights`, and the merging part of
`FisherMergingAlgorithm.run`) and `fusion_bench/method/fisher_merging/clip_fisher_merging.py`
(`FisherMergingForCLIPVisionModel.get_fisher_weights`). Adapted only to run on plain modules and state dicts:
no model pool, fabric, CLIP processor, tqdm or print; `compute_logits(module, batch, task)` is the model's own
output (a classifier); `run` works on state dicts and returns the merged state dict it loads `strict=False`.

Exactness: the estimator repeats the reference's operations (autograd.grad instead of `.backward()` on the
same graph), so it agrees bit for bit. The merge differs from the reference by rounding only: tatr computes
θ_0 + Σ w_t τ_t / Σ w_t where the reference computes Σ w_t θ_t / Σ w_t (float64 to 1e-12, float32 to 1e-5).
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List  # noqa: UP035  # the reference's annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tatr import merge
from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.core.fisher import (
    FISHER_OPTIONS,
    fisher_fusionbench,
    fisher_per_sample,
    save_fisher,
)
from tatr.core.merging import plan_merge
from tatr.core.options import COMBINERS, check_options, get_option


# --- the reference, transcribed ------------------------------------------------------------------------
# fusion_bench/method/fisher_merging/fisher_merging.py::get_param_names_to_merge (v0.2.33), verbatim
def get_param_names_to_merge(input_param_names: List[str], exclude_param_names_regex: list) -> List[str]:  # noqa: UP006
    param_names_to_merge = []
    for param_name in input_param_names:
        exclude = any([re.match(exclude_pattern, param_name) for exclude_pattern in exclude_param_names_regex])
        if not exclude:
            param_names_to_merge.append(param_name)
    return param_names_to_merge


# fisher_merging.py::get_param_squared_gradients (v0.2.33), verbatim
def get_param_squared_gradients(model: nn.Module, param_names_to_merge: List[str]) -> Dict[str, Tensor]:  # noqa: UP006
    param_squared_gradients = {
        param_name: param_value.grad.detach() ** 2
        for param_name, param_value in model.state_dict(keep_vars=True).items()
        if param_name in param_names_to_merge
    }
    return param_squared_gradients


# fisher_merging.py::get_models_fisher_norm (v0.2.33), verbatim
def get_models_fisher_norm(models_to_merge_param_dict: dict, models_to_merge_fisher_weights_list: list) -> Tensor:
    models_fisher_norm_dict = {}
    for param_name, _ in models_to_merge_param_dict.items():
        models_fisher = torch.stack(
            [
                model_to_merge_fisher_weights[param_name]
                for model_to_merge_fisher_weights in models_to_merge_fisher_weights_list
            ],
            dim=0,
        )
        dims = [dim_idx for dim_idx in range(1, models_fisher.dim())]
        models_fisher_norm = torch.linalg.vector_norm(models_fisher, dim=dims)
        models_fisher_norm_dict[param_name] = models_fisher_norm

    models_fisher_norm = torch.stack(
        [models_fisher_norm for models_fisher_norm in models_fisher_norm_dict.values()],
        dim=1,
    )
    models_fisher_norm = torch.norm(models_fisher_norm, dim=1)
    return models_fisher_norm


# fisher_merging.py::merging_with_fisher_weights (v0.2.33), verbatim
def merging_with_fisher_weights(
    models_to_merge_param_dict: Dict[str, List[Tensor]],  # noqa: UP006
    models_to_merge_fisher_weights_list: list,
    fisher_scaling_coefficients: torch.Tensor,
    normalize_fisher_weight: bool = True,
    minimal_fisher_weight: float = 1e-6,
) -> Dict[str, Tensor]:  # noqa: UP006
    merged_params = {}

    if normalize_fisher_weight:
        models_fisher_norm = get_models_fisher_norm(
            models_to_merge_param_dict=models_to_merge_param_dict,
            models_to_merge_fisher_weights_list=models_to_merge_fisher_weights_list,
        )

    for param_name, param_value_list in models_to_merge_param_dict.items():
        param_values = torch.stack(param_value_list, dim=0)
        models_to_merge_fisher_weights = (
            torch.stack(
                [
                    model_to_merge_fisher_weights[param_name]
                    for model_to_merge_fisher_weights in models_to_merge_fisher_weights_list
                ],
                dim=0,
            )
            + minimal_fisher_weight
        )

        reshaped_scaling_coefficients = fisher_scaling_coefficients.reshape(
            -1, *[1 for _ in range(param_values.dim() - 1)]
        ).to(param_values.device)

        if normalize_fisher_weight:
            _models_fisher_norm = 1.0 / (models_fisher_norm + minimal_fisher_weight)
            normalized_models_fisher_norm = _models_fisher_norm / _models_fisher_norm.sum()
            normalized_models_fisher_norm = normalized_models_fisher_norm.reshape(
                -1, *[1 for _ in range(param_values.dim() - 1)]
            )
            reshaped_scaling_coefficients = reshaped_scaling_coefficients * normalized_models_fisher_norm

        numerator = (reshaped_scaling_coefficients * models_to_merge_fisher_weights * param_values).sum(dim=0)

        denominator = (reshaped_scaling_coefficients * models_to_merge_fisher_weights).sum(dim=0)

        merged_param = numerator / denominator
        merged_params[param_name] = merged_param
    return merged_params


# clip_fisher_merging.py::FisherMergingForCLIPVisionModel.get_fisher_weights (v0.2.33); adapted: the
# dataloader and `compute_logits` are arguments, `self.config.num_fisher_examples` is `num_fisher_examples`,
# no fabric, CLIPDataset, tqdm or batch-size warning.
def get_fisher_weights(model, train_dataloader, param_names_to_merge, num_fisher_examples, compute_logits):
    num_computed_examples = 0
    batches_fisher_weights_list = []
    for step, batch in enumerate(train_dataloader):  # noqa: B007
        if num_computed_examples >= num_fisher_examples:
            break
        logits = compute_logits(model, batch)
        labels_probabilities = torch.softmax(logits, dim=-1).detach()
        labels_log_probabilities = torch.log_softmax(logits, dim=-1)
        labels_expectations = torch.sqrt(labels_probabilities) * labels_log_probabilities
        sum_labels_expectations = labels_expectations.sum(dim=-1).sum(dim=0)
        model.zero_grad()
        sum_labels_expectations.backward()
        batch_fisher_weights = get_param_squared_gradients(model=model, param_names_to_merge=param_names_to_merge)

        for key, weights in batch_fisher_weights.items():
            batch_fisher_weights[key] = weights.detach().cpu()

        batches_fisher_weights_list.append(batch_fisher_weights)
        num_computed_examples += batch[0].size(0)

    model_to_merge_fisher_weights = {}
    for batch_fisher_weights in batches_fisher_weights_list:
        for key in batch_fisher_weights:
            if key not in model_to_merge_fisher_weights:
                model_to_merge_fisher_weights[key] = batch_fisher_weights[key]
            else:
                model_to_merge_fisher_weights[key] += batch_fisher_weights[key]

    for key in model_to_merge_fisher_weights:
        model_to_merge_fisher_weights[key] /= num_computed_examples
        model_to_merge_fisher_weights[key] = model_to_merge_fisher_weights[key].detach().cpu()
    return model_to_merge_fisher_weights


# FisherMergingAlgorithm.run (v0.2.33), its merging part; adapted: state dicts instead of a model pool, the
# Fishers given, and the merged parameters loaded into a copy of θ_0 as `load_state_dict(strict=False)` does.
def reference_run(pretrained, finetuned, fishers, normalize_fisher_weight=True, minimal_fisher_weight=1e-6):
    models_to_merge_param_dict = defaultdict(list)
    param_names_to_merge = None
    for param_dict in finetuned:
        if param_names_to_merge is None:
            param_names_to_merge = get_param_names_to_merge(list(param_dict.keys()), [])
        for param_name in param_names_to_merge:
            models_to_merge_param_dict[param_name].append(param_dict[param_name])
    merged_params = merging_with_fisher_weights(
        models_to_merge_param_dict=models_to_merge_param_dict,
        models_to_merge_fisher_weights_list=fishers,
        fisher_scaling_coefficients=torch.ones(len(finetuned)) / len(finetuned),
        normalize_fisher_weight=normalize_fisher_weight,
        minimal_fisher_weight=minimal_fisher_weight,
    )
    merged = {k: v.clone() for k, v in pretrained.items()}
    merged.update(merged_params)
    return merged


# --- small models --------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """An embedding, two linear layers (one with a bias), a LayerNorm: token ids [n, seq] -> logits [n, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(torch.tanh(self.lin1(self.emb(x)))).mean(1))


def models(num_tasks: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Tiny, list[Tiny]]:
    torch.manual_seed(seed)
    base = Tiny().to(dtype)
    with torch.no_grad():  # a LayerNorm that is not exactly (1, 0), so every parameter has a gradient
        base.ln.weight.add_(0.1 * torch.randn_like(base.ln.weight))
        base.ln.bias.add_(0.1 * torch.randn_like(base.ln.bias))
    tasks = []
    for _ in range(num_tasks):
        task = copy.deepcopy(base)
        with torch.no_grad():
            for p in task.parameters():
                p.add_(0.3 * torch.randn_like(p))
        tasks.append(task)
    return base, tasks


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batches(n: int = 10, size: int = 3, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def close(a: Tensor, b: Tensor, dtype: torch.dtype) -> None:
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- the estimators --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_examples", [256, 7, 6, 1])
def test_fusionbench_estimator_equals_the_reference_bit_for_bit(dtype: torch.dtype, num_examples: int) -> None:
    _, tasks = models(1, dtype)
    data = batches()  # 10 examples in batches of 3: 7 takes three (9 examples), 6 two, 1 one
    ours = fisher_fusionbench(tasks[0], data, num_examples=num_examples)
    assert all(p.grad is None for p in tasks[0].parameters())  # the model is left as it was
    names = list(tasks[0].state_dict())
    ref = get_fisher_weights(tasks[0], data, names, num_examples, lambda m, b: m(b[0]))
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k


def brute_force_fisher(model: nn.Module, data: list[tuple[Tensor, Tensor]], empirical: bool) -> dict[str, Tensor]:
    """Mean over examples of Σ_y p(y|x)·(∇ log p(y|x))² (or of (∇ log p(y_n|x_n))²), one backward per
    example and class, each example alone."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = 0
    for x, y in data:
        for i in range(len(x)):
            logp = torch.log_softmax(model(x[i : i + 1]), -1)[0]
            classes = [int(y[i])] if empirical else range(logp.numel())
            for c in classes:
                grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
                weight = 1.0 if empirical else float(logp[c].detach().exp())
                for k, g in zip(params, grads, strict=True):
                    total[k] += weight * g**2
            n += 1
    return {k: v / n for k, v in total.items()}


@pytest.mark.parametrize("empirical", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_per_sample_fisher_equals_a_loop_over_single_examples(empirical: bool, chunk: int | None) -> None:
    _, tasks = models(1, torch.float64)
    data = batches()
    ours = fisher_per_sample(tasks[0], data, empirical=empirical, chunk=chunk)
    ref = brute_force_fisher(tasks[0], data, empirical)
    assert list(ours) == list(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-14)
    # the other estimator is another quantity: FusionBench's squares a batch sum
    other = brute_force_fisher(tasks[0], data, not empirical)
    assert not all(torch.allclose(ours[k], other[k], rtol=1e-3) for k in ref)
    fusionbench = fisher_fusionbench(tasks[0], data)
    assert not all(torch.allclose(ours[k], fusionbench[k], rtol=1e-3) for k in ref)


def test_per_sample_fisher_takes_exactly_the_first_examples_and_a_classify_rule() -> None:
    _, tasks = models(1, torch.float64)
    data = batches()
    first7 = [(data[0][0], data[0][1]), (data[1][0], data[1][1]), (data[2][0][:1], data[2][1][:1])]
    ours = fisher_per_sample(tasks[0], data, num_examples=7)
    ref = brute_force_fisher(tasks[0], first7, empirical=False)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-14)
    # `classify` maps the model's output to logits: a temperature changes the Fisher, as it should
    hot = fisher_per_sample(tasks[0], data, classify=lambda out: 2.0 * out, names=["lin1.weight"])
    scaled = copy.deepcopy(tasks[0])
    with torch.no_grad():
        scaled.head.weight.mul_(2.0)
    ref = brute_force_fisher(scaled, data, empirical=False)
    assert list(hot) == ["lin1.weight"]
    torch.testing.assert_close(hot["lin1.weight"], ref["lin1.weight"], rtol=1e-10, atol=1e-14)


# --- the merge -------------------------------------------------------------------------------------------
def fishers_of(tasks: list[Tiny], data: list[tuple[Tensor, Tensor]]) -> list[dict[str, Tensor]]:
    names = list(tasks[0].state_dict())
    return [get_fisher_weights(t, data, names, 256, lambda m, b: m(b[0])) for t in tasks]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_tasks", [2, 3])
@pytest.mark.parametrize("normalize", [1, 0])
def test_merge_equals_the_reference_model(dtype: torch.dtype, num_tasks: int, normalize: int) -> None:
    base, tasks = models(num_tasks, dtype)
    fishers = fishers_of(tasks, batches())
    with torch.no_grad():  # tasks whose Fishers differ in scale by 10⁴, and zeros: the norms and ε matter
        for i, f in enumerate(fishers):
            for v in f.values():
                v.mul_(10.0 ** (4 * i))
        fishers[0]["lin1.bias"][:3] = 0
        for f in fishers:
            f["ln.bias"][0] = 0
    pre, fts = state(base), [state(t) for t in tasks]
    ref = reference_run(pre, fts, fishers, bool(normalize))
    ours = merge(pre, fts, method="fisher", trust_region="off", statistics=fishers, fisher_normalize=normalize)
    assert list(ours) == list(pre)
    for k in pre:
        assert ours[k].dtype == dtype
        close(ours[k], ref[k], dtype)
    other = reference_run(pre, fts, fishers, not normalize)  # the test tells normalisation apart
    assert not torch.allclose(ours["lin1.weight"], other["lin1.weight"], rtol=1e-3)


@pytest.mark.parametrize("minimal", [1e-6, 1e-2])
def test_minimal_fisher_weight_and_lambda(minimal: float) -> None:
    base, tasks = models(3, torch.float64, seed=2)
    fishers = fishers_of(tasks, batches())
    pre, fts = state(base), [state(t) for t in tasks]
    ref = reference_run(pre, fts, fishers, True, minimal)
    ours = merge(
        pre, fts, method="fisher", trust_region="off", lam=0.4, statistics=fishers, minimal_fisher_weight=minimal
    )
    for k in pre:
        close(ours[k], pre[k] + 0.4 * (ref[k] - pre[k]), torch.float64)
    default = merge(pre, fts, method="fisher", trust_region="off", statistics=fishers)  # λ = 1: the merge itself
    ref = reference_run(pre, fts, fishers)
    for k in pre:
        close(default[k], ref[k], torch.float64)


def test_keys_without_statistics_are_the_mean_of_the_task_vectors() -> None:
    base, tasks = models(3, torch.float64)
    fishers = fishers_of(tasks, batches())
    for f in fishers:
        del f["ln.bias"], f["emb.weight"]
    pre, fts = state(base), [state(t) for t in tasks]
    ours = merge(pre, fts, method="fisher", trust_region="off", statistics=fishers)
    for k in ("ln.bias", "emb.weight"):
        close(ours[k], pre[k] + sum(ft[k] - pre[k] for ft in fts) / 3, torch.float64)
    # the norms are over the keys the files have (FusionBench: the parameters it merges)
    ref = reference_run({k: pre[k] for k in fishers[0]}, [{k: ft[k] for k in fishers[0]} for ft in fts], fishers)
    for k in fishers[0]:
        close(ours[k], ref[k], torch.float64)


@pytest.mark.parametrize("mode", ["zero-shot", "magnitude-only"])
def test_the_trust_region_resets_masked_coordinates_to_theta0_before_merging(mode: str) -> None:
    """With a trust region the combiner sees each θ_t as θ_0 + (masked τ_t): the merge is the reference's
    on those masked models, with the same Fishers."""
    base, tasks = models(3, torch.float64, seed=3)
    fishers = fishers_of(tasks, batches())
    pre, fts = state(base), [state(t) for t in tasks]
    plan = plan_merge(pre, fts, method="fisher", trust_region=mode, statistics=fishers)
    keep = plan.keep_mask(0.7)
    masked = []
    for ft in fts:
        m = dict(ft)
        for i, key in enumerate(plan.space.keys):
            m[key] = torch.where(plan.space.view(keep, i), ft[key], pre[key])
        masked.append(m)
    ref = reference_run(pre, masked, fishers)
    ours = plan.merged(0.7, 1.0)
    for k in pre:
        close(ours[k], ref[k], torch.float64)
    unmasked = reference_run(pre, fts, fishers)  # the mask changes the merge
    assert not torch.allclose(ours["lin1.weight"], unmasked["lin1.weight"], rtol=1e-3)
    assert not keep.all()


# --- the statistics at the door ------------------------------------------------------------------------
def test_statistics_files_are_checked_against_the_model_in_one_line(tmp_path: Path) -> None:
    base, tasks = models(2, torch.float64)
    pre, fts = state(base), [state(t) for t in tasks]
    fishers = fishers_of(tasks, batches())
    paths = []
    for i, f in enumerate(fishers):
        paths.append(save_fisher(f, tmp_path / f"f{i}.safetensors", "fusionbench", 10))
    assert load_file(paths[0]).keys() == fishers[0].keys()
    torch.testing.assert_close(
        merge(pre, fts, method="fisher", trust_region="off", statistics=paths),
        merge(pre, fts, method="fisher", trust_region="off", statistics=fishers),
    )

    def bad(name: str, change) -> Path:
        f = {k: v.clone() for k, v in fishers[1].items()}
        change(f)
        save_file(f, tmp_path / name)
        return tmp_path / name

    gram = tmp_path / "gram.safetensors"
    save_file({"lin1.weight": torch.eye(6, dtype=torch.float64)}, gram, metadata={"tatr_statistics": "gram"})
    save_file({}, tmp_path / "empty.safetensors")
    cases = {
        "count": ([paths[0]], "1 statistics files for 2 fine-tuned models"),
        "twice": ([paths[0], tmp_path / ".." / tmp_path.name / "f0.safetensors"], "given twice as --statistics"),
        "shape": (
            [paths[0], bad("s.safetensors", lambda f: f.update({"ln.bias": torch.ones(3, dtype=torch.float64)}))],
            "key 'ln.bias': a diagonal Fisher is the parameter's shape: the parameter is [8], not [3]",
        ),
        "unknown key": (
            [paths[0], bad("u.safetensors", lambda f: f.update({"visual_projection": torch.ones(3)}))],
            "key 'visual_projection': not in task 1's statistics",
        ),
        "missing key": (
            [paths[0], bad("m.safetensors", lambda f: f.pop("ln.bias"))],
            "key 'ln.bias': missing in task 1's statistics",
        ),
        "negative": (
            [paths[0], bad("n.safetensors", lambda f: f["ln.bias"].__setitem__(2, -1.0))],
            "key 'ln.bias': has negative values: a diagonal Fisher is a mean of squares",
        ),
        "nan": (
            [paths[0], bad("nan.safetensors", lambda f: f["ln.bias"].__setitem__(2, float("nan")))],
            "key 'ln.bias': contains NaN or infinite values",
        ),
        "gram file": ([gram, paths[1]], "holds 'gram' statistics, but this method reads diagonal Fisher"),
        "empty": ([tmp_path / "empty.safetensors", paths[1]], "the statistics file is empty"),
    }
    for name, (given, needle) in cases.items():
        with pytest.raises(TatrError) as caught:
            merge(pre, fts, method="fisher", trust_region="off", statistics=given)
        assert needle in str(caught.value) and "\n" not in str(caught.value), (name, str(caught.value))
    fts_only = {k: v for k, v in fishers[0].items()}
    fts_only["not.a.key"] = torch.ones(2)
    with pytest.raises(TatrError, match=r"key 'not\.a\.key': not a floating-point key of the fine-tuned files"):
        merge(pre, fts, method="fisher", trust_region="off", statistics=[fts_only, dict(fts_only)])
    with pytest.raises(TatrError, match=r"method 'fisher' needs per-task diagonal Fisher statistics"):
        merge(pre, fts, method="fisher", trust_region="off")
    with pytest.raises(TatrError, match=r"statistics \(--statistics\) apply to fisher, regmean, not to method 'ta'"):
        merge(pre, fts, method="ta", trust_region="off", statistics=paths)


def test_the_options_are_declared_with_their_defaults_and_ranges() -> None:
    values = check_options({})
    assert values["fisher_normalize"] == 1 and values["minimal_fisher_weight"] == 1e-6
    norm, eps = get_option("fisher_normalize"), get_option("minimal_fisher_weight")
    assert (norm.flag, eps.flag) == ("--normalize-fisher-weight", "--minimal-fisher-weight")
    assert "normalize_fisher_weight" in norm.help and "minimal_fisher_weight" in eps.help
    assert not norm.searchable and eps.searchable
    assert COMBINERS.get("fisher").options == FISHER_OPTIONS
    for name, value, message in (
        ("fisher_normalize", 2, "must be an integer in [0, 1], got 2"),
        ("fisher_normalize", True, "must be an integer in [0, 1], got True"),
        ("minimal_fisher_weight", 0, "must be in (0, ∞), got 0"),
        ("minimal_fisher_weight", float("nan"), "must be in (0, ∞), got nan"),
    ):
        with pytest.raises(TatrError) as caught:
            check_options({name: value})
        assert str(caught.value).endswith(message)


# --- tatr merge ------------------------------------------------------------------------------------------
def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["merge", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_takes_one_statistics_file_per_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, tasks = models(3, torch.float32)
    pre, fts = state(base), [state(t) for t in tasks]
    fishers = fishers_of(tasks, batches())
    save_file(pre, tmp_path / "pre.safetensors")
    ft, st = [], []
    for i in range(3):
        ft.append(tmp_path / f"ft{i}.safetensors")
        save_file(fts[i], ft[-1])
        st.append(save_fisher(fishers[i], tmp_path / f"fisher{i}.safetensors", "fusionbench", 10))
    out = tmp_path / "merged.safetensors"
    argv = ["-p", tmp_path / "pre.safetensors", "-f", *ft, "--method", "fisher", "--trust-region", "zero-shot"]
    code, _, err = run([*argv, "--statistics", *st, "--normalize-fisher-weight", "0", "-o", out], capsys)
    assert code == 0, err
    expected = merge(pre, fts, method="fisher", statistics=fishers, fisher_normalize=0)
    merged = load_file(out)
    for k in pre:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=0)
    one_by_one = [x for s in st for x in ("--statistics", s)]
    code, _, _ = run([*argv, *one_by_one, "--minimal-fisher-weight", "1e-3", "-o", out], capsys)
    assert code == 0
    expected = merge(pre, fts, method="fisher", statistics=fishers, minimal_fisher_weight=1e-3)
    assert all(torch.equal(load_file(out)[k], expected[k]) for k in pre)
    errors = {
        "missing": ([*argv, "-o", out], "method 'fisher' needs per-task diagonal Fisher statistics (--statistics"),
        "count": ([*argv, "--statistics", st[0], "-o", out], "1 statistics files for 3 fine-tuned models"),
        "other method": (
            ["-p", tmp_path / "pre.safetensors", "-f", *ft, "--statistics", *st, "-o", out],
            "statistics (--statistics) apply to fisher, regmean, not to method 'ta'",
        ),
        "bad flag": (
            [*argv, "--statistics", *st, "--normalize-fisher-weight", "2", "-o", out],
            "must be an integer in [0, 1], got 2",
        ),
        "flag to another method": (
            ["-p", tmp_path / "pre.safetensors", "-f", *ft, "--minimal-fisher-weight", "1e-3", "-o", out],
            "--minimal-fisher-weight applies to fisher, not to --method ta",
        ),
        "out is a statistics file": ([*argv, "--statistics", *st, "-o", st[1]], "is also an input"),
    }
    for name, (args, needle) in errors.items():
        code, _, err = run(args, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (name, err)


def test_lam_neg_is_refused_for_a_combiner() -> None:
    """λ_neg scales the negative component apart, which a per-key combiner (it merges the parts together)
    cannot: one line, not a silent task-arithmetic sum of the parts."""
    base, tasks = models(2, torch.float64)
    pre, fts = state(base), [state(t) for t in tasks]
    fishers = fishers_of(tasks, batches())
    signed = [{k: torch.randn_like(v) for k, v in pre.items()} for _ in fts]
    with pytest.raises(TatrError, match="lam_neg needs a method that sums the parts; fisher combines them together"):
        merge(
            pre,
            fts,
            method="fisher",
            components=["orthogonal", "negative"],
            signed_gradients=signed,
            statistics=fishers,
            lam_neg=0.5,
        )
