"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022) and
its Fisher estimators.

    θ = Σ_t c_t·(F_t + ε) ⊙ θ_t / Σ_t c_t·(F_t + ε)      per coordinate, F_t task t's diagonal Fisher

Why a per-key combiner: with θ_t = θ_0 + τ_t the weights sum to one per coordinate, so
θ = θ_0 + Σ_t w_t ⊙ τ_t / Σ_t w_t (w_t = c_t·(F_t + ε)): tatr's stream hands the combiner the T (masked)
τ_t of a key with the T Fishers of that key and it returns M = Σ_t w_t ⊙ τ_t / Σ_t w_t; the merge is
θ_0 + λ·M, λ = 1 by default (the Fisher merge itself). With a trust region the masked coordinates of τ_t
are reset to θ_0 in θ_t before merging: the combiner sees the masked τ_t, the Fishers unchanged.

The merge follows FusionBench 0.2.33 (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1),
`fusion_bench/method/fisher_merging/fisher_merging.py::merging_with_fisher_weights` with
`get_models_fisher_norm`, as `config/method/fisher_merging/clip_fisher_merging.yaml` runs it:

* `minimal_fisher_weight` ε (1e-6) is added to every F_t;
* `normalize_fisher_weight` (true): c_t = (1/T)·u_t / Σ_s u_s with u_t = 1/(‖F_t‖ + ε), ‖F_t‖ the L2
  norm of task t's Fisher over every parameter it has (the model-wide norm, a once-per-merge pass over
  the statistics: `fisher_norms`); without it c_t = 1/T. Options are numbers here, so the boolean is the
  integer `fisher_normalize` ∈ {0, 1} (1, FusionBench's default).

Estimators (each returns a state dict of F_t at θ_t, keyed by parameter name; `save_fisher` writes it):

* `fisher_fusionbench`: FusionBench's CLIP estimator, `clip_fisher_merging.py::get_fisher_weights`,
  transcribed: per batch, the gradient of Σ_n Σ_y √p(y|x_n)·log p(y|x_n) (p detached, the model's own
  predictive distribution), squared, summed over batches and divided by the number of examples; batches
  are taken until at least `num_examples` examples were seen (256 in FusionBench's config, batches of
  32). The square of a batch sum is not a Fisher: cross terms between examples and classes remain.
* `fisher_per_sample`: the diagonal Fisher itself, mean over examples of Σ_y p(y|x)·(∇ log p(y|x))²
  (or, `empirical=True`, of (∇ log p(y_n|x_n))² with the labels), by the per-sample gradients of the
  exemplar trust region (`tatr.core.gradients`: vmap of grad, MATH attention), over (example, class)
  pairs in chunks.

Both run data-parallel under torchrun (`tatr.core.distributed`): FusionBench's by whole batches (its unit:
the square of a batch's gradient), among the batches its stop rule takes over all ranks; the per-sample
Fisher by examples. The sums are all-reduced, so the Fisher equals one process's to float rounding.

Deliberate differences from FusionBench:

* a key the statistics do not cover (a float buffer; a parameter the estimator was not given) is the
  plain mean of the τ_t; FusionBench has a Fisher for every parameter (it fails on float buffers);
* a parameter the loss does not reach gets F = 0 (FusionBench's `param.grad ** 2` fails on a None grad);
* Fishers of half/bfloat16 models are accumulated in float32 (FusionBench: in the model's dtype); the
  merge runs in tatr's arena precision, and the norms are summed in float64;
* ε must be > 0: with ε = 0 a coordinate no task's Fisher reaches would be 0/0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tatr.core.checkpoints import save_state_dict, source_error
from tatr.core.distributed import all_reduce_sums, shard_batches, shard_examples
from tatr.core.gradients import _selected, _vmap_friendly_attention, functional_parts  # the exemplar gradients' code
from tatr.core.options import COMBINERS, CombinerKind, Option, StatisticKind

# The Fisher's estimators by name (`statistics.fisher_estimator`, the store's `fisher_estimator` column):
# FusionBench's CLIP estimator (the default: the published numbers'), the diagonal Fisher Σ_y p·(∇ log p)², and
# the empirical Fisher (the labels' squared gradient).
FISHER_ESTIMATORS = ("fusionbench", "per-sample", "empirical")
DEFAULT_FISHER_ESTIMATOR = FISHER_ESTIMATORS[0]
MINIMAL_FISHER_WEIGHT = 1e-6  # FusionBench config/method/fisher_merging/clip_fisher_merging.yaml
NORMALIZE_FISHER_WEIGHT = 1  # the same file's `normalize_fisher_weight: true`

FISHER_OPTIONS = (
    Option(
        "fisher_normalize",
        int,
        NORMALIZE_FISHER_WEIGHT,
        "--normalize-fisher-weight",
        "Fisher: 1 weighs each task's Fisher by 1/its model-wide L2 norm (FusionBench normalize_fisher_weight), 0 not",
        "Fisher normalisation (normalize_fisher_weight)",
        "norm",
        low=0,
        high=1,
        metavar="0|1",
    ),
    Option(
        "minimal_fisher_weight",
        float,
        MINIMAL_FISHER_WEIGHT,
        "--minimal-fisher-weight",
        "Fisher: ε added to every Fisher value, > 0 (FusionBench minimal_fisher_weight)",
        "minimal Fisher weight (minimal_fisher_weight)",
        "ε",
        low=0.0,
        low_open=True,
        metavar="EPS",
    ),
)

FISHER = StatisticKind("fisher", "diagonal Fisher", lambda shape: tuple(shape), "the parameter's shape")

Classify = Callable[[Any], Tensor]  # the model's output -> logits [n, classes]


# --- the merge -----------------------------------------------------------------------------------------
def fisher_norms(statistics: Any) -> list[float]:
    """‖F_t‖ per task: the L2 norm over every key of its statistics (FusionBench `get_models_fisher_norm`:
    per-parameter norms, then the norm of those), one key of one task in memory at a time."""
    norms = []
    for t in range(len(statistics.sources)):
        total = 0.0
        for key in statistics.keys:
            total += float(torch.linalg.vector_norm(statistics.read(t, key).double())) ** 2
        norms.append(math.sqrt(total))
    return norms


def task_coefficients(norms: list[float], normalize: bool, minimal: float) -> list[float]:
    """c_t: 1/T, times u_t/Σ_s u_s with u_t = 1/(‖F_t‖ + ε) when normalising (FusionBench's
    `fisher_scaling_coefficients` times `normalized_models_fisher_norm`)."""
    num = len(norms)
    if not normalize:
        return [1.0 / num] * num
    inverse = [1.0 / (n + minimal) for n in norms]
    total = sum(inverse)
    return [(1.0 / num) * (u / total) for u in inverse]


def fisher_merge(taus: list[Tensor], fishers: list[Tensor], coefficients: list[float], minimal: float) -> Tensor:
    """M = Σ_t c_t·(F_t + ε)·τ_t / Σ_t c_t·(F_t + ε) for one tensor, in τ's dtype."""
    numerator = torch.zeros_like(taus[0])
    denominator = torch.zeros_like(taus[0])
    for tau, fisher, c in zip(taus, fishers, coefficients, strict=True):
        weight = (fisher.to(tau.dtype) + minimal) * c
        numerator.add_(weight * tau)
        denominator.add_(weight)
    return numerator / denominator


def _combine(
    key: str, taus: list[Tensor], theta0: Tensor, values: Mapping[str, Any], fishers: list[Tensor] | None, norms: Any
) -> Tensor:
    if fishers is None:  # no statistics for this key: the plain mean
        return torch.stack(taus).mean(0)
    for t, fisher in enumerate(fishers):
        if bool((fisher < 0).any()):
            raise source_error(norms.sources[t], key, "has negative values: a diagonal Fisher is a mean of squares")
    minimal = float(values.get("minimal_fisher_weight", MINIMAL_FISHER_WEIGHT))
    normalize = bool(values.get("fisher_normalize", NORMALIZE_FISHER_WEIGHT))
    return fisher_merge(taus, fishers, task_coefficients(norms.values, normalize, minimal), minimal)


class _Norms:
    """The prepared value: each task's model-wide Fisher norm, and the sources (for errors)."""

    def __init__(self, statistics: Any) -> None:
        self.sources = statistics.sources
        self.values = fisher_norms(statistics)


COMBINERS.add("fisher", CombinerKind("fisher", _combine, FISHER_OPTIONS, statistics=FISHER, prepare=_Norms))


# --- the estimators ------------------------------------------------------------------------------------
def _accumulator(param: Tensor) -> Tensor:
    return torch.zeros_like(param, dtype=torch.promote_types(param.dtype, torch.float32))


def fisher_fusionbench(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Any]],
    *,
    classify: Classify | None = None,
    names: Iterable[str] | None = None,
    num_examples: int | None = None,
) -> dict[str, Tensor]:
    """FusionBench's CLIP Fisher estimator (see the module docstring) at the model's parameters.

    `batches` yield (inputs, labels), labels unused; `classify` maps the model's output to logits
    (default: the output is the logits; FusionBench's CLIP: cosine to the zero-shot head times the logit
    scale, `tatr.core.classify.cosine_logits`); `names` picks the parameters (default: all). Batches are
    taken while fewer than `num_examples` examples were seen (None: all)."""
    model = model.eval()
    keys, all_params = _selected(model, names)
    params = {k: all_params[k].detach().requires_grad_() for k in keys}
    frozen = {k: v.detach() for k, v in all_params.items() if k not in params}
    buffers = dict(model.named_buffers())
    classify = classify if classify is not None else _identity
    totals = {k: _accumulator(v) for k, v in params.items()}
    num_computed_examples = 0
    for inputs, _ in shard_batches(batches, num_examples):  # under torchrun: this rank's whole batches
        if num_examples is not None and num_computed_examples >= num_examples:
            break
        logits = classify(functional_call(model, (params, frozen, buffers), (inputs,)))
        labels_probabilities = torch.softmax(logits, dim=-1).detach()
        labels_log_probabilities = torch.log_softmax(logits, dim=-1)
        labels_expectations = torch.sqrt(labels_probabilities) * labels_log_probabilities
        sum_labels_expectations = labels_expectations.sum(dim=-1).sum(dim=0)
        grads = torch.autograd.grad(sum_labels_expectations, list(params.values()), allow_unused=True)
        for k, g in zip(keys, grads, strict=True):
            if g is not None:
                totals[k].add_(g.detach() ** 2)
        num_computed_examples += inputs.size(0)
    num_computed_examples = all_reduce_sums([totals], num_computed_examples)
    if num_computed_examples == 0:
        raise ValueError("no examples: the batches are empty")
    return {k: v / num_computed_examples for k, v in totals.items()}


def fisher_per_sample(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    empirical: bool = False,
    classify: Classify | None = None,
    names: Iterable[str] | None = None,
    num_examples: int | None = None,
    chunk: int | None = None,
    math_attention: bool = True,
) -> dict[str, Tensor]:
    """The diagonal Fisher, mean over examples of Σ_y p(y|x)·(∇ log p(y|x))² (`empirical`: of
    (∇ log p(y_n|x_n))², the labels' class), from per-sample gradients (`tatr.core.gradients`' code).

    `classify` and `names` as for `fisher_fusionbench`; exactly the first `num_examples` examples (None:
    all). `chunk` (example, class) pairs are differentiated at once (default: `auto_chunk`, about 1 GiB of
    gradients). The true Fisher costs one backward pass per example and class."""
    model = model.eval()
    params, frozen, buffers, chunk = functional_parts(model, names, chunk)
    classify = classify if classify is not None else _identity

    def negative_log_prob(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(classify(out), y.unsqueeze(0))  # −log p(y|x): its square is the same

    per_pair = vmap(grad(negative_log_prob), in_dims=(None, 0, 0))
    totals = {k: _accumulator(v) for k, v in params.items()}
    count = 0
    with _vmap_friendly_attention(math_attention):
        for inputs, labels in shard_examples(batches, num_examples):  # under torchrun: this rank's examples
            if num_examples is not None:
                inputs, labels = inputs[: num_examples - count], labels[: num_examples - count]
            if len(inputs) == 0:
                break
            if empirical:
                probs, classes = None, 1
            else:
                with torch.no_grad():
                    probs = torch.softmax(classify(functional_call(model, (params, frozen, buffers), (inputs,))), -1)
                classes = probs.shape[-1]
            pairs = len(inputs) * classes
            for start in range(0, pairs, chunk):
                idx = torch.arange(start, min(start + chunk, pairs), device=inputs.device)
                example = idx // classes
                ys = labels[example] if probs is None else idx % classes
                grads = per_pair(params, inputs[example], ys)
                for k, g in grads.items():
                    sq = g.to(totals[k].dtype) ** 2
                    if probs is not None:
                        weight = probs.reshape(-1)[idx].to(sq.dtype)
                        sq = sq * weight.view(-1, *([1] * (sq.dim() - 1)))
                    totals[k].add_(sq.sum(0))
                del grads
            count += len(inputs)
    count = all_reduce_sums([totals], count)
    if count == 0:
        raise ValueError("no examples: the batches are empty")
    return {k: v / count for k, v in totals.items()}


def save_fisher(fisher: Mapping[str, Tensor], path: str | Path, estimator: str, examples: int) -> Path:
    """Write a Fisher state dict as a `tatr merge --statistics` file (atomically), its kind, estimator and
    example count in the metadata."""
    meta = {"tatr_statistics": FISHER.name, "estimator": estimator, "examples": str(examples)}
    return save_state_dict(fisher, path, metadata=meta)


def _identity(output: Any) -> Tensor:
    return output
