"""RegMean (`tatr.core.regmean`) against FusionBench's code, transcribed line by line below.

Source: FusionBench 0.2.33 (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1):
`fusion_bench/method/regmean/regmean.py` (`reduce_non_diagonal_elements`, `merging_with_regmean_weights`, and the
merging part of `RegMeanAlgorithm.run`), `fusion_bench/method/regmean/clip_regmean.py`
(`RegMeanAlgorithmForCLIP.get_regmean_weights`) and `fusion_bench/method/regmean/utils.py`
(`get_modules_to_merge`). Adapted only to run on plain modules and state dicts: no model pool, fabric, CLIP
processor or tqdm; `compute_logits` is the model's own forward; `run` works on state dicts and returns the merged
state dict it loads `strict=False`.

Exactness: the Gram matrices repeat the reference's hook, so they agree bit for bit. The merge solves for the
task vectors, where the reference inverts Σ G̃_t and multiplies the θ_t: the same merge up to rounding times the
conditioning of Σ G̃_t (float64 to 1e-12, float32 to 1e-5 on these Gram matrices, condition numbers about 10).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Dict, cast  # noqa: UP035  # as the reference writes them

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tatr import merge
from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.core.merging import plan_merge
from tatr.core.options import COMBINERS, check_options, get_option
from tatr.core.regmean import REGMEAN_OPTIONS, reduce_non_diagonal, regmean_grams, save_grams


# --- the reference, transcribed ------------------------------------------------------------------------
# fusion_bench/method/regmean/regmean.py::reduce_non_diagonal_elements (v0.2.33), verbatim
def reduce_non_diagonal_elements(regmean_weights: torch.Tensor, reduce_non_diagonal_ratio: float):
    # diagonal matrix with (1 - reduce_non_diagonal_ratio) as elements
    diag_weights = torch.diag(torch.ones(regmean_weights.shape[0]) - reduce_non_diagonal_ratio).to(
        regmean_weights.device
    )
    # matrix with reduce_non_diagonal_ratio as elements
    non_diag_weights = torch.zeros_like(diag_weights).fill_(reduce_non_diagonal_ratio)
    # diagonal elements are unchanged, while non-diagonal elements are multiplied by reduce_non_diagonal_ratio
    return regmean_weights * (diag_weights + non_diag_weights)


# regmean.py::merging_with_regmean_weights (v0.2.33), verbatim
def merging_with_regmean_weights(
    models_to_merge_param_dict: dict,
    models_to_merge_regmean_weights_list: list,
    reduce_non_diagonal_ratio: float = 1.0,
    weight_transpose: bool = True,
):
    merged_params = {}

    for param_name, param_value_list in models_to_merge_param_dict.items():
        merged_by_regmean = False
        # only perform regmean merging on the "weight" parameter of Linear module
        if param_name.endswith(".weight"):
            module_name = param_name[: -len(".weight")]
            if module_name in models_to_merge_regmean_weights_list[0].keys():  # noqa: SIM118
                # two lists with length num_models_to_merge
                param_multiplied_results, module_regmean_weights_list = [], []
                for model_idx, model_to_merge_regmean_weights in enumerate(models_to_merge_regmean_weights_list):
                    # Tensor, shape (hidden_dim, hidden_dim)
                    module_regmean_weights = model_to_merge_regmean_weights[module_name]

                    # reduce non-diagonal elements
                    module_regmean_weights = reduce_non_diagonal_elements(
                        regmean_weights=module_regmean_weights,
                        reduce_non_diagonal_ratio=reduce_non_diagonal_ratio,
                    )
                    module_regmean_weights_list.append(module_regmean_weights)

                    model_to_merge_param = param_value_list[model_idx]
                    # since the weight shape of Linear module is (output_size, input_size), we need to transpose it
                    param_multiplied_results.append(
                        torch.matmul(
                            module_regmean_weights,
                            (model_to_merge_param.transpose(0, 1) if weight_transpose else model_to_merge_param),
                        )
                    )

                # sum up module_regmean_weights and param_multiplied_results over all individual models
                sum_module_regmean_weights = sum(module_regmean_weights_list)
                sum_param_multiplied_results = sum(param_multiplied_results)

                # get the inverse matrix
                inv_sum_module_regmean_weights = torch.inverse(sum_module_regmean_weights)
                # merge parameters with regmean
                merged_param = torch.matmul(inv_sum_module_regmean_weights, sum_param_multiplied_results)
                # transpose to the original shape of "weight" in Linear module
                merged_params[param_name] = merged_param.transpose(0, 1) if weight_transpose else merged_param
                merged_by_regmean = True
        # use average merging for parameters whose names are not end with ".weight" or not in Linear module
        if not merged_by_regmean:
            merged_params[param_name] = torch.stack(param_value_list, dim=0).mean(dim=0)

    return merged_params


# fusion_bench/method/regmean/utils.py::get_modules_to_merge (v0.2.33), verbatim
def get_modules_to_merge(model: nn.Module, include_module_types: list) -> Dict[str, nn.Module]:  # noqa: UP006
    modules_to_merge: Dict[str, nn.Module] = {}  # noqa: UP006
    for module_name, module in model.named_modules():
        is_valid_type = not include_module_types or any(
            [isinstance(module, include_module_type) for include_module_type in include_module_types]
        )
        if is_valid_type:
            modules_to_merge[module_name] = module
    return modules_to_merge


# clip_regmean.py::RegMeanAlgorithmForCLIP.get_regmean_weights (v0.2.33); adapted: the dataloader and
# `compute_logits` are arguments, `self.num_regmean_examples` is `num_regmean_examples`, no fabric,
# CLIPDataset or tqdm; the modules are `get_modules_to_merge(model, [nn.Linear])`, as `run` passes them.
def get_regmean_weights(model, train_dataloader, linear_modules_to_merge, num_regmean_examples, compute_logits):
    def compute_regmean_weights(module_name: str):
        def hook(module: nn.Module, input: tuple, output: torch.Tensor):
            # Tensor, shape (batch_size, sequence_length, hidden_dim)
            x = cast(Tensor, input[0]).detach()
            batch_num_actual_examples = x.shape[0]
            # Tensor, shape (batch_size * sequence_length, hidden_dim)
            x = x.reshape(-1, x.shape[-1])
            # Tensor, shape (hidden_dim, hidden_dim)
            xtx = torch.matmul(x.transpose(0, 1), x)
            # store the averaged weights in regmean_weights
            if module_name not in regmean_weights.keys():  # noqa: SIM118
                regmean_weights[module_name] = xtx / x.shape[0]
                num_computed_examples[module_name] = x.shape[0]
                num_actual_examples[module_name] = batch_num_actual_examples
            else:
                regmean_weights[module_name] = (
                    regmean_weights[module_name] * num_computed_examples[module_name] + xtx
                ) / (num_computed_examples[module_name] + x.shape[0])
                num_computed_examples[module_name] += x.shape[0]
                num_actual_examples[module_name] += batch_num_actual_examples

        return hook

    handles = []
    regmean_weights = {}
    num_computed_examples = {}
    num_actual_examples = {}

    for module_name, linear_module_to_merge in linear_modules_to_merge.items():
        handle = linear_module_to_merge.register_forward_hook(compute_regmean_weights(module_name=module_name))
        handles.append(handle)
    for step, batch in enumerate(train_dataloader):  # noqa: B007
        if len(num_actual_examples) > 0 and list(num_actual_examples.values())[0] >= num_regmean_examples:  # noqa: RUF015
            break
        logits = compute_logits(model, batch)  # noqa: F841

    for handle in handles:
        handle.remove()

    for module_name in regmean_weights.keys():  # noqa: SIM118
        regmean_weights[module_name] = regmean_weights[module_name].detach().cpu()

    return regmean_weights


# RegMeanAlgorithm.run (v0.2.33), its merging part; adapted: state dicts instead of a model pool, the Gram
# matrices given, the merged parameters loaded into a copy of θ_0 as `load_state_dict(strict=False)` does.
def reference_run(pretrained, finetuned, grams, reduce_non_diagonal_ratio=0.95):
    models_to_merge_param_dict = defaultdict(list)
    for param_dict in finetuned:
        for param_name in param_dict:
            models_to_merge_param_dict[param_name].append(param_dict[param_name])
    merged_params = merging_with_regmean_weights(
        models_to_merge_param_dict=models_to_merge_param_dict,
        models_to_merge_regmean_weights_list=grams,
        reduce_non_diagonal_ratio=reduce_non_diagonal_ratio,
        weight_transpose=True,
    )
    merged = {k: v.clone() for k, v in pretrained.items()}
    merged.update(merged_params)
    return merged


# --- small models --------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """An embedding, a linear layer on every token (3-D inputs), a LayerNorm, a linear head on the pooled
    features (2-D inputs) and a linear layer whose forward never runs: token ids [n, seq] -> logits [n, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)
        self.unused = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(torch.tanh(self.lin1(self.emb(x)))).mean(1))


def models(num_tasks: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Tiny, list[Tiny]]:
    torch.manual_seed(seed)
    base = Tiny().to(dtype)
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


def batches(n: int = 24, size: int = 5, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 11, (n, 4), generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def reference_grams(model: nn.Module, data, num_examples: int = 256) -> dict[str, Tensor]:
    with torch.no_grad():
        linear = get_modules_to_merge(model, [nn.Linear])
        return get_regmean_weights(model, data, linear, num_examples, lambda m, b: m(b[0]))


def by_weight(grams: dict[str, Tensor]) -> dict[str, Tensor]:
    """FusionBench keys Gram matrices by module; tatr by the weight they apply to."""
    return {f"{k}.weight": v for k, v in grams.items()}


def close(a: Tensor, b: Tensor, dtype: torch.dtype) -> None:
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- the Gram matrices -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_examples", [256, 11, 10, 1])
def test_grams_equal_the_reference_bit_for_bit(dtype: torch.dtype, num_examples: int) -> None:
    _, tasks = models(1, dtype)
    data = batches()  # 24 examples in batches of 5: 11 takes three (15 examples), 10 two, 1 one
    ours = regmean_grams(tasks[0], data, num_examples=num_examples)
    ref = reference_grams(tasks[0], data, num_examples)
    assert list(ours) == [f"{k}.weight" for k in ref] == ["lin1.weight", "head.weight"]  # `unused` never ran
    for k, v in ref.items():
        assert ours[f"{k}.weight"].dtype == dtype and torch.equal(ours[f"{k}.weight"], v), k


def test_grams_are_the_inputs_gram_matrix_over_every_token_divided_by_the_rows() -> None:
    """By hand: lin1 sees every token (rows = examples × sequence), the head the pooled features."""
    _, tasks = models(1, torch.float64)
    model = tasks[0]
    data = batches()
    ours = regmean_grams(model, data)
    x = torch.cat([b[0] for b in data])
    tokens = model.emb(x).detach().reshape(-1, 6)
    pooled = model.ln(torch.tanh(model.lin1(model.emb(x)))).mean(1).detach()
    torch.testing.assert_close(ours["lin1.weight"], tokens.T @ tokens / (24 * 4), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours["head.weight"], pooled.T @ pooled / 24, rtol=1e-12, atol=1e-14)
    wrong = tokens.T @ tokens / 24  # divided by the examples instead of the rows: told apart
    assert not torch.allclose(ours["lin1.weight"], wrong)


def test_grams_of_a_custom_forward_and_plain_input_batches() -> None:
    _, tasks = models(1, torch.float64)
    data = batches()
    inputs_only = [b[0] for b in data]
    ours = regmean_grams(tasks[0], inputs_only, forward=lambda m, x: m(x[:, :2]))
    ref = reference_grams(tasks[0], [(b[0][:, :2], None) for b in data])
    for k, v in ref.items():
        assert torch.equal(ours[f"{k}.weight"], v)
    with pytest.raises(ValueError, match="no Gram matrices"):
        regmean_grams(tasks[0], [])


def test_grams_of_an_attention_projection_through_a_given_module() -> None:
    """`nn.MultiheadAttention`'s in_proj_weight is not an `nn.Linear`: hooked through `modules`, its Gram
    matrix is the one of the attention's query input (every token); its out_proj never runs as a module."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(6, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 6, dtype=torch.float64))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.attn = model, attn

        def forward(self, x: Tensor) -> Tensor:
            h = self.pre(x)  # [seq, n, 6]
            return self.attn(h, h, h, need_weights=False)[0]

    block = Block()
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    default = regmean_grams(block, [x])
    assert list(default) == ["pre.0.weight"]  # out_proj's forward never ran, in_proj is no nn.Linear
    ours = regmean_grams(block, [x[:, :2], x[:, 2:]], modules={"attn.in_proj_weight": block.attn})
    h = block.pre(x).detach().reshape(-1, 6)
    torch.testing.assert_close(ours["attn.in_proj_weight"], h.T @ h / 21, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ratio", [0.95, 0.1, 0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reducing_the_off_diagonal_equals_the_reference_bit_for_bit(ratio: float, dtype: torch.dtype) -> None:
    g = torch.randn(7, 7, dtype=dtype)
    assert torch.equal(reduce_non_diagonal(g, ratio), reduce_non_diagonal_elements(g, ratio))


# --- the merge -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_tasks", [2, 3])
@pytest.mark.parametrize("ratio", [0.95, 0.5])
def test_merge_equals_the_reference_model(dtype: torch.dtype, num_tasks: int, ratio: float) -> None:
    base, tasks = models(num_tasks, dtype)
    grams = [reference_grams(t, batches(seed=10 + i)) for i, t in enumerate(tasks)]
    pre, fts = state(base), [state(t) for t in tasks]
    ref = reference_run(pre, fts, grams, ratio)
    ours = merge(
        pre,
        fts,
        method="regmean",
        trust_region="off",
        statistics=[by_weight(g) for g in grams],
        regmean_reduce_ratio=ratio,
    )
    assert list(ours) == list(pre)
    for k in pre:
        assert ours[k].dtype == dtype
        close(ours[k], ref[k], dtype)
    for k in ("lin1.bias", "ln.weight", "emb.weight", "unused.weight"):  # averaged
        close(ours[k], sum(ft[k] for ft in fts) / num_tasks, dtype)
    mean = sum(ft["lin1.weight"] for ft in fts) / num_tasks  # the linear weights are not: told apart
    assert not torch.allclose(ours["lin1.weight"], mean, rtol=1e-3)
    other = reference_run(pre, fts, grams, 0.2)  # another ratio: told apart
    assert not torch.allclose(ours["lin1.weight"], other["lin1.weight"], rtol=1e-4)


def test_default_ratio_and_lambda() -> None:
    base, tasks = models(3, torch.float64, seed=4)
    grams = [reference_grams(t, batches(seed=20 + i)) for i, t in enumerate(tasks)]
    pre, fts = state(base), [state(t) for t in tasks]
    ref = reference_run(pre, fts, grams, 0.95)  # FusionBench's CLIP config
    stats = [by_weight(g) for g in grams]
    ours = merge(pre, fts, method="regmean", trust_region="off", statistics=stats)
    scaled = merge(pre, fts, method="regmean", trust_region="off", statistics=stats, lam=0.3)
    for k in pre:
        close(ours[k], ref[k], torch.float64)
        close(scaled[k], pre[k] + 0.3 * (ref[k] - pre[k]), torch.float64)


def test_the_trust_region_resets_masked_coordinates_to_theta0_before_merging() -> None:
    """With a trust region the combiner sees each θ_t as θ_0 + (masked τ_t): the merge is the reference's
    on those masked models, with the same Gram matrices."""
    base, tasks = models(3, torch.float64, seed=5)
    grams = [reference_grams(t, batches(seed=30 + i)) for i, t in enumerate(tasks)]
    pre, fts = state(base), [state(t) for t in tasks]
    plan = plan_merge(pre, fts, method="regmean", trust_region="zero-shot", statistics=[by_weight(g) for g in grams])
    keep = plan.keep_mask(0.6)
    masked = []
    for ft in fts:
        m = dict(ft)
        for i, key in enumerate(plan.space.keys):
            m[key] = torch.where(plan.space.view(keep, i), ft[key], pre[key])
        masked.append(m)
    ref = reference_run(pre, masked, grams)
    ours = plan.merged(0.6, 1.0)
    for k in pre:
        close(ours[k], ref[k], torch.float64)
    unmasked = reference_run(pre, fts, grams)
    assert not torch.allclose(ours["lin1.weight"], unmasked["lin1.weight"], rtol=1e-3)


def test_a_singular_summed_gram_matrix_is_one_line() -> None:
    base, tasks = models(2, torch.float64)
    pre, fts = state(base), [state(t) for t in tasks]
    stats = [by_weight(reference_grams(t, batches())) for t in tasks]
    for s in stats:  # an input feature that is zero on every task's exemplars
        s["lin1.weight"][2, :] = 0
        s["lin1.weight"][:, 2] = 0
    with pytest.raises(TatrError) as caught:
        merge(pre, fts, method="regmean", trust_region="off", statistics=stats)
    assert str(caught.value).startswith("RegMean: key 'lin1.weight': the summed Gram matrix is singular")


def test_gram_files_are_checked_against_the_model_in_one_line(tmp_path: Path) -> None:
    base, tasks = models(2, torch.float64)
    pre, fts = state(base), [state(t) for t in tasks]
    stats = [by_weight(reference_grams(t, batches())) for t in tasks]
    paths = [save_grams(s, tmp_path / f"g{i}.safetensors", 24) for i, s in enumerate(stats)]
    from_files = merge(pre, fts, method="regmean", trust_region="off", statistics=paths)
    in_memory = merge(pre, fts, method="regmean", trust_region="off", statistics=stats)
    assert all(torch.equal(from_files[k], in_memory[k]) for k in pre)
    fisher = tmp_path / "fisher.safetensors"
    save_file({"head.weight": torch.eye(8, dtype=torch.float64)[:4]}, fisher, metadata={"tatr_statistics": "fisher"})
    cases = {
        "shape": (
            [stats[0], {**stats[1], "head.weight": torch.eye(4, dtype=torch.float64)}],
            "key 'head.weight': a Gram matrix is [in, in] for a 2-D (linear) weight [out, in]: the parameter is "
            "[4, 8], not [4, 4]",
        ),
        "1-D key": (
            [{**stats[0], "ln.bias": torch.ones(8, 8)}, {**stats[1], "ln.bias": torch.ones(8, 8)}],
            "key 'ln.bias': a Gram matrix is [in, in] for a 2-D (linear) weight [out, in]: the parameter is [8], "
            "it takes none",
        ),
        "fisher file": ([paths[0], fisher], "holds 'fisher' statistics, but this method reads Gram matrix"),
        "count": ([paths[0], paths[1], paths[0]], "3 statistics files for 2 fine-tuned models"),
    }
    for name, (given, needle) in cases.items():
        with pytest.raises(TatrError) as caught:
            merge(pre, fts, method="regmean", trust_region="off", statistics=given)
        assert needle in str(caught.value) and "\n" not in str(caught.value), (name, str(caught.value))


def test_the_option_is_declared_with_its_default_and_range() -> None:
    assert check_options({})["regmean_reduce_ratio"] == 0.95
    ratio = get_option("regmean_reduce_ratio")
    assert ratio.flag == "--reduce-non-diagonal-ratio" and "reduce_non_diagonal_ratio" in ratio.help
    assert ratio.searchable and COMBINERS.get("regmean").options == REGMEAN_OPTIONS
    assert check_options({"regmean_reduce_ratio": 0})["regmean_reduce_ratio"] == 0
    for value in (-0.1, 1.5, float("nan")):
        with pytest.raises(TatrError) as caught:
            check_options({"regmean_reduce_ratio": value})
        assert (
            str(caught.value)
            == f"RegMean off-diagonal ratio (reduce_non_diagonal_ratio) must be in [0, 1], got {value!r}"
        )


# --- tatr merge ------------------------------------------------------------------------------------------
def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["merge", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_takes_one_gram_file_per_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, tasks = models(2, torch.float32)
    pre, fts = state(base), [state(t) for t in tasks]
    stats = [by_weight(reference_grams(t, batches(seed=40 + i))) for i, t in enumerate(tasks)]
    save_file(pre, tmp_path / "pre.safetensors")
    ft, st = [], []
    for i in range(2):
        ft.append(tmp_path / f"ft{i}.safetensors")
        save_file(fts[i], ft[-1])
        st.append(save_grams(stats[i], tmp_path / f"gram{i}.safetensors", 24))
    out = tmp_path / "merged.safetensors"
    argv = ["-p", tmp_path / "pre.safetensors", "-f", *ft, "--method", "regmean", "--trust-region", "off"]
    code, _, err = run([*argv, "--statistics", *st, "--reduce-non-diagonal-ratio", "0.5", "-o", out], capsys)
    assert code == 0, err
    expected = merge(pre, fts, method="regmean", trust_region="off", statistics=stats, regmean_reduce_ratio=0.5)
    merged = load_file(out)
    assert all(torch.equal(merged[k], expected[k]) for k in pre)
    errors = {
        "missing": ([*argv, "-o", out], "method 'regmean' needs per-task Gram matrix statistics (--statistics"),
        "bad ratio": ([*argv, "--statistics", *st, "--reduce-non-diagonal-ratio", "1.5", "-o", out], "got 1.5"),
        "ratio to another method": (
            ["-p", tmp_path / "pre.safetensors", "-f", *ft, "--reduce-non-diagonal-ratio", "0.5", "-o", out],
            "--reduce-non-diagonal-ratio applies to regmean, not to --method ta",
        ),
    }
    for name, (args, needle) in errors.items():
        code, _, err = run(args, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (name, err)
