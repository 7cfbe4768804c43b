"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) and
its Gram matrices.

    W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ  (transposed back)    per linear layer, G_t = XᵀX of its inputs on task t,
    G̃_t = G_t with its off-diagonal entries times r (`reduce_non_diagonal_ratio`); other parameters averaged

Why a per-key combiner: with W_t = W_0 + τ_t, (Σ G̃_t)⁻¹ Σ G̃_t W_tᵀ = W_0ᵀ + (Σ G̃_t)⁻¹ Σ G̃_t τ_tᵀ, so tatr's
stream hands the combiner the T (masked) τ_t of a linear weight with the T Gram matrices of its inputs and
it returns M = ((Σ G̃_t)⁻¹ Σ G̃_t τ_tᵀ)ᵀ; every other key (biases, norms, embeddings, weights without Gram
matrices) is the mean of the τ_t. The merge is θ_0 + λ·M, λ = 1 by default (the RegMean merge itself).
With a trust region the masked coordinates of τ_t are reset to θ_0 in θ_t before merging: the combiner
sees the masked τ_t, the Gram matrices unchanged.

It follows FusionBench 0.2.33 (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1):
`fusion_bench/method/regmean/regmean.py::merging_with_regmean_weights` and `reduce_non_diagonal_elements`
for the merge, `clip_regmean.py::RegMeanAlgorithmForCLIP.get_regmean_weights` for the Gram matrices, with
`config/method/regmean/clip_regmean.yaml`: r = 0.95, 256 examples in batches of 32.

* `regmean_grams` hooks every `nn.Linear` (subclasses included, FusionBench's `get_modules_to_merge`)
  and keeps, per module, the running mean of xᵀx over the rows of its inputs flattened to [rows, in]
  (every token of every example): G = Σ xᵀx / Σ rows, updated per call as FusionBench does,
  G ← (G·n + xᵀx)/(n + rows). Batches are taken until the first hooked module has seen at least
  `num_examples` examples (its inputs' first dimension). A module whose `forward` never runs (e.g.
  `nn.MultiheadAttention`'s `out_proj`, whose weight the attention reads directly) gets no Gram matrix,
  nor does a projection that is not an `nn.Linear` (its `in_proj_weight`: pass `modules` to hook it).
  Statistics are keyed by the weight they apply to, `<module>.weight` (FusionBench: by module name).
* r scales the off-diagonal entries as FusionBench's mask does: built in float32 (`torch.ones` and
  `fill_`), so the factor is float32(r) whatever the Gram matrix's dtype, and the diagonal stays exact.

Deliberate differences from FusionBench:

* tatr solves (Σ G̃_t)·Mᵀ = Σ G̃_t τ_tᵀ (`torch.linalg.solve`) rather than forming (Σ G̃_t)⁻¹ (`torch.inverse`)
  and multiplying W_t: the same merge, more accurately (the solution is the small τ, not W); a singular
  Σ G̃_t (an input feature zero on every task's exemplars) is a one-line error naming the key, where
  FusionBench's inverse fails;
* Gram matrices of half/bfloat16 inputs are accumulated in float32 (FusionBench: in the input's dtype);
  the merge runs in tatr's arena precision;
* a 2-D weight without a Gram matrix, and every other key, is averaged, as FusionBench averages every
  parameter not merged by RegMean (integer keys never reach a combiner: tatr copies them from θ_0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tatr.core.checkpoints import save_state_dict
from tatr.core.distributed import active, all_reduce_sums, shard
from tatr.core.errors import TatrError
from tatr.core.options import COMBINERS, CombinerKind, Option, StatisticKind

REDUCE_NON_DIAGONAL_RATIO = 0.95  # FusionBench config/method/regmean/clip_regmean.yaml

REGMEAN_OPTIONS = (
    Option(
        "regmean_reduce_ratio",
        float,
        REDUCE_NON_DIAGONAL_RATIO,
        "--reduce-non-diagonal-ratio",
        "RegMean: scale the Gram matrices' off-diagonal entries by r in [0, 1] (FusionBench reduce_non_diagonal_ratio)",
        "RegMean off-diagonal ratio (reduce_non_diagonal_ratio)",
        "r",
        low=0.0,
        high=1.0,
        metavar="R",
    ),
)


def _gram_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    return (shape[1], shape[1]) if len(shape) == 2 else None


GRAM = StatisticKind("gram", "Gram matrix", _gram_shape, "[in, in] for a 2-D (linear) weight [out, in]")


# --- the merge -----------------------------------------------------------------------------------------
def reduce_non_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """G with its off-diagonal entries times float32(r), its diagonal unchanged: FusionBench's
    `gram * (diag(1 − r) + r)` with the float32 mask it builds (its diagonal is exactly 1)."""
    factor = float(torch.tensor(ratio, dtype=torch.float32))
    reduced = gram * factor
    reduced.diagonal().copy_(gram.diagonal())
    return reduced


def regmean_merge(key: str, taus: list[Tensor], grams: list[Tensor], ratio: float) -> Tensor:
    """M = ((Σ_t G̃_t)⁻¹ Σ_t G̃_t τ_tᵀ)ᵀ for one linear weight τ_t [out, in], G_t [in, in], in τ's dtype."""
    dtype = taus[0].dtype
    total = torch.zeros_like(grams[0], dtype=dtype)
    products = torch.zeros(taus[0].shape[1], taus[0].shape[0], dtype=dtype)
    for tau, gram in zip(taus, grams, strict=True):
        reduced = reduce_non_diagonal(gram.to(dtype), ratio)
        total.add_(reduced)
        products.add_(reduced @ tau.transpose(0, 1))
    solution, info = torch.linalg.solve_ex(total, products)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        raise TatrError(
            f"RegMean: key '{key}': the summed Gram matrix is singular (an input feature is zero on every task's "
            "exemplars), so the merge is not defined"
        )
    return solution.transpose(0, 1)


def _combine(
    key: str, taus: list[Tensor], theta0: Tensor, values: Mapping[str, Any], grams: list[Tensor] | None, _: Any
) -> Tensor:
    if grams is None:  # not a linear weight with Gram matrices: the plain mean, as FusionBench averages
        return torch.stack(taus).mean(0)
    return regmean_merge(key, taus, grams, float(values.get("regmean_reduce_ratio", REDUCE_NON_DIAGONAL_RATIO)))


COMBINERS.add("regmean", CombinerKind("regmean", _combine, REGMEAN_OPTIONS, statistics=GRAM))


# --- the Gram matrices ---------------------------------------------------------------------------------
def regmean_grams(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_examples: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> dict[str, Tensor]:
    """The Gram matrix of every `nn.Linear`'s inputs over `batches`, keyed `<module>.weight` (see the module
    docstring). A batch is (inputs, labels) or inputs; `forward(model, inputs)` runs the model (default
    `model(inputs)`: only the modules it calls are hooked). Batches are taken while the first hooked module
    has seen fewer than `num_examples` examples (None: all). `modules` replaces the default hooks: weight key
    → the module whose forward's first input is that weight's input (e.g. an `nn.MultiheadAttention` for
    its `in_proj_weight`; the Gram matrix is the same for inputs [seq, n, d] and [n, seq, d], the rows being
    every token, but the example count is the first dimension).

    Under torchrun (`tatr.core.distributed`) each rank takes every W-th batch, and each module's running mean
    is turned back into a sum (times its rows) and all-reduced with the rows, then divided once: the same
    Gram matrices to float rounding. `num_examples` is refused there (the first module's example count is
    only known after a forward pass, so the ranks could not agree where to stop without one)."""
    distributed = active()
    if distributed and num_examples is not None:
        raise ValueError("regmean_grams: num_examples under torchrun; pass exactly the batches to take")
    model = model.eval()
    linear_modules_to_merge = (
        dict(modules)
        if modules is not None
        else {(f"{n}.weight" if n else "weight"): m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )
    regmean_weights: dict[str, Tensor] = {}
    num_computed_examples: dict[str, int] = {}
    num_actual_examples: dict[str, int] = {}

    def compute_regmean_weights(module_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, input: tuple, output: Tensor) -> None:
            x = input[0].detach()
            batch_num_actual_examples = x.shape[0]
            x = x.reshape(-1, x.shape[-1])
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            xtx = torch.matmul(x.transpose(0, 1), x)
            if module_name not in regmean_weights:
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

    handles = [m.register_forward_hook(compute_regmean_weights(n)) for n, m in linear_modules_to_merge.items()]
    try:
        with torch.no_grad():
            for batch in shard(batches):
                if (
                    num_examples is not None
                    and len(num_actual_examples) > 0
                    and next(iter(num_actual_examples.values())) >= num_examples
                ):
                    break
                inputs = batch[0] if isinstance(batch, tuple | list) else batch
                forward(model, inputs) if forward is not None else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if distributed:
        regmean_weights = _summed_over_ranks(regmean_weights, num_computed_examples)
    if not regmean_weights:
        raise ValueError("no Gram matrices: no nn.Linear module ran on the batches (or they are empty)")
    return regmean_weights


def _summed_over_ranks(means: dict[str, Tensor], rows: dict[str, int]) -> dict[str, Tensor]:
    """Σ_ranks G_r·n_r / Σ_ranks n_r per module, from each rank's running mean G_r over n_r rows; a module
    this rank's batches never ran gets the others' (`all_reduce_sums` adds the missing keys as zeros)."""
    sums = {k: g * rows[k] for k, g in means.items()}
    counts = {k: torch.tensor(float(rows[k]), dtype=torch.float64, device=g.device) for k, g in means.items()}
    all_reduce_sums([sums, counts], 0)
    return {k: sums[k] / float(counts[k]) for k in sums}


def save_grams(grams: Mapping[str, Tensor], path: str | Path, examples: int) -> Path:
    """Write Gram matrices as a `tatr merge --statistics` file (atomically), kind and example count in the
    metadata."""
    meta = {"tatr_statistics": GRAM.name, "estimator": "fusionbench-regmean", "examples": str(examples)}
    return save_state_dict(grams, path, metadata=meta)
