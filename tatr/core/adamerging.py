"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575): merging coefficients learned at test time.

TA merges with one hand-picked λ. AdaMerging learns the coefficients instead, by minimising the
Shannon entropy of the merged model's predictions on unlabeled inputs of every task:

    θ(λ) = θ_0 + Σ_t λ_t ⊙ τ_t,    L(λ) = Σ_t Σ_b mean_{x ∈ batch b of task t} H(softmax(f_θ(λ)(x))),

with λ_t one number per task (task-wise) or one per parameter tensor and task (layer-wise: the
reference's `lambdas_raw` is [parameter tensors, tasks]). As the reference scripts
(`src/main_task_wise_adamerging.py`, `src/main_layer_wise_adamerging.py`) do it:

* λ starts at 0.3 (its `prior`); θ_0's own coefficient is fixed at 1;
* the merged model uses clamp(λ_raw, 0, 1); Adam (lr 1e-3, betas (0.9, 0.999), no weight decay)
  updates λ_raw, whose gradient is 0 wherever the clamp is active;
* H(z) = −Σ_c softmax(z)_c · log_softmax(z)_c, averaged over a batch of 16 and summed over the tasks;
* a step takes *two* batches per task: its loop `for i, data in enumerate(loader): …; if i > 0:
  break` processes batch 0 and batch 1 before breaking (`batches_per_step=2`);
* 500 steps; the inputs are the test split's, without labels (`adamerging.inputs: test`).

What differs, and why it does not change the result: the merged parameters are built once per step
instead of once per forward (they are the same tensors: λ changes only at the step), and each
batch's entropy is back-propagated to them at once (`merged.detach().requires_grad_()`), then
their summed gradient is carried to λ in one backward. The gradient is the same sum, in another
floating-point order, and the model's activations are held for one batch at a time, not for all
2T batches of a step. `tests/test_adamerging.py` runs a literal transcription of the reference
beside this code.

Memory. AdaMerging holds all T task vectors at once, unlike the streaming merges. With P merged
coordinates of e bytes each (e: 4 for bf16/fp16/fp32 models, which are merged in float32; 8 for
float64), about (T + 5)·P·e bytes: the T (masked) task vectors, θ_0 twice (the arena copy and the
model's own weights), the merged parameters, their gradient and one temporary of the backward; plus
16 bytes per coefficient (its value, gradient and Adam's two moments; T task-wise, T × tensors
layer-wise) and one batch's activations, which depend on the model and are not estimated. ViT-B/32
(87.8M coordinates), T = 8: about 4.6 GB (4.3 GiB). `memory_bytes` computes it and `check_memory` refuses, in
one line, a run that would not fit, before any task vector is read.

With the trust region, the task vectors are masked first (`masked_task_vectors`): AdaMerging then
learns coefficients for what the trust region keeps, and a dropped coordinate keeps θ_0's value
whatever λ becomes (the TATR paper's AdaMerging+TATR rows).

The method names `adamerging-task` and `adamerging-layer` are entries of the merge-method registry
(`tatr.core.methods.METHODS`, `coefficients="task"|"layer"`) with their labels, so tables and
`merge_label` name them like any other method; `tatr merge`, sweeps and `plan_merge` refuse them
at the door (`fixed_method`): a fixed-λ merge of them would silently be TA at λ = 0.3.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from tatr.core.errors import TatrError
from tatr.core.gradients import cosine_logits
from tatr.core.methods import METHODS
from tatr.core.vectors import pretrained_tensor, task_vector

if TYPE_CHECKING:
    from tatr.core.merging import MergePlan

Granularity = Literal["task", "layer"]
GRANULARITIES: tuple[str, ...] = ("task", "layer")
PRIOR = 0.3  # the reference's initial λ (`prior = 0.3`)


# --- the registry entries (in `tatr.core.methods.METHODS`, `coefficients` "task" or "layer") ----------
def is_adamerging(method: object) -> bool:
    """True for a method name whose coefficients AdaMerging learns."""
    return isinstance(method, str) and method in METHODS and METHODS.get(method).learned


def granularity_of(method: str) -> Granularity:
    if not is_adamerging(method):
        known = ", ".join(m.name for m in METHODS.values() if m.learned)
        raise TatrError(f"'{method}' is not an AdaMerging method (known: {known})")
    return METHODS.get(method).coefficients  # type: ignore[return-value]


# --- the reference's pieces -------------------------------------------------------------------------
def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution of each row of `logits` (the reference's `softmax_entropy`)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def clamped(raw: Tensor) -> Tensor:
    """The coefficients the merged model uses: clamp(λ_raw, 0, 1) (the reference's `lambdas()`)."""
    return torch.clamp(raw, min=0.0, max=1.0)


def merged_parameters(
    theta0: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    coefficients: Tensor,
    keys: Sequence[str],
) -> dict[str, Tensor]:
    """θ_0 + Σ_t λ_t τ_t for each key, differentiable in `coefficients` ([1, T] or [len(keys), T]).

    Summed in the reference's order (θ_0 first, then the tasks in order), so with the same λ the
    values are the reference's bit for bit."""
    rows = coefficients.expand(len(keys), -1) if coefficients.shape[0] == 1 else coefficients
    out: dict[str, Tensor] = {}
    for j, key in enumerate(keys):
        value = theta0[key]
        for t, tv in enumerate(task_vectors):
            value = value + tv[key] * rows[j, t]
        out[key] = value
    return out


# --- memory -------------------------------------------------------------------------------------------
def coefficient_count(granularity: str, num_keys: int, num_tasks: int) -> int:
    return num_tasks * (num_keys if granularity == "layer" else 1)


def memory_bytes(num_tasks: int, num_coordinates: int, element_size: int, num_coefficients: int) -> int:
    """Estimated bytes AdaMerging holds beyond activations: (T + 5)·P·e + 16 per coefficient
    (see the module docstring for what each term is)."""
    return (num_tasks + 5) * num_coordinates * element_size + 16 * num_coefficients


def check_memory(required: int, available: int, what: str) -> None:
    """One line, before anything is loaded, when AdaMerging's estimate exceeds what is available."""
    if required > available:
        raise TatrError(
            f"AdaMerging needs about {required / 2**30:.2f} GiB for {what} and {available / 2**30:.2f} GiB is "
            "available; merge fewer tasks, free memory, or set adamerging.max_memory_gib to override the check"
        )


# --- the trust region ---------------------------------------------------------------------------------
def masked_task_vectors(plan: MergePlan, q: float) -> list[dict[str, Tensor]]:
    """The plan's task vectors with its trust-region mask at `q` applied (unmasked when its mode is
    "off"), over the keys some task changes, in the plan's arena dtype. All T are returned at once."""
    ts, space = plan.task_set, plan.space
    keep = None if plan.mode == "off" else plan.keep_mask(q)
    dtype = plan.dtype
    zero = torch.zeros((), dtype=dtype)
    out: list[dict[str, Tensor]] = [{} for _ in range(ts.num_tasks)]
    for i, key in enumerate(space.keys):
        theta0 = pretrained_tensor(ts, key).to(dtype)
        kept = None if keep is None else space.view(keep, i)
        for t in range(ts.num_tasks):
            tau = task_vector(ts, t, key, theta0)
            out[t][key] = tau if kept is None else torch.where(kept, tau, zero)
    return out


# --- learning -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaMerged:
    """What AdaMerging learned, and the model it gives."""

    coefficients: Tensor  # clamp(λ_raw, 0, 1): [1, T] task-wise, [len(keys), T] layer-wise
    keys: tuple[str, ...]  # the merged keys; the rows of a layer-wise `coefficients`
    merged: dict[str, Tensor]  # every key of θ_0, in θ_0's dtypes, on the CPU
    entropy: tuple[float, ...]  # the loss of each step, before its update

    def summary(self) -> dict[str, Any]:
        """Mean, min and max of the learned coefficients, and their per-task means (for records)."""
        c = self.coefficients.double()
        return {
            "mean": float(c.mean()),
            "min": float(c.min()),
            "max": float(c.max()),
            "per_task": [float(v) for v in c.mean(0)],
        }


def adamerging(
    theta0: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    model: nn.Module,
    heads: Sequence[Tensor],
    batches: Sequence[Iterator[Tensor]],
    scale: float,
    *,
    granularity: str = "task",
    steps: int = 500,
    lr: float = 1e-3,
    init: float = PRIOR,
    batches_per_step: int = 2,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> AdaMerged:
    """Learn AdaMerging's coefficients and return them with the merged state dict.

    `theta0`: θ_0's state dict (every key of `model`); `task_vectors`: T state dicts over the merged
    keys (masked already with the trust region), in any floating dtype; `model`: θ_0's network,
    called through `functional_call`, so its own weights are never used or changed; `heads[t]`:
    task t's frozen head ([classes, dim]); `batches[t]`: endless batches of task t's unlabeled
    inputs; `scale`: the suite's logit scale for `cosine_logits`. Defaults are the paper's.
    """
    keys = _check(theta0, task_vectors, heads, batches, granularity, steps, lr, init, batches_per_step)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    dtype = task_vectors[0][keys[0]].dtype
    base = {k: v.to(dev) for k, v in theta0.items()}  # what the model runs on: θ_0 in its own dtypes
    start = {k: base[k].to(dtype) for k in keys}  # θ_0 in the task vectors' (arena) dtype
    tvs = [{k: tv[k].to(device=dev, dtype=dtype) for k in keys} for tv in task_vectors]
    heads = [h.to(dev) for h in heads]
    rows = len(keys) if granularity == "layer" else 1
    raw = torch.nn.Parameter(torch.full((rows, len(tvs)), float(init), device=dev))
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    model.eval()
    history: list[float] = []
    bar = tqdm(range(steps), desc=f"AdaMerging ({granularity}-wise)", unit="step", disable=not progress, leave=False)
    for _ in bar:
        merged = merged_parameters(start, tvs, clamped(raw), keys)
        leaves = {k: v.detach().to(base[k].dtype).requires_grad_() for k, v in merged.items()}
        params = {**base, **leaves}
        total = 0.0
        for t in range(len(tvs)):
            for _b in range(batches_per_step):
                x = next(batches[t]).to(dev)
                loss = softmax_entropy(cosine_logits(functional_call(model, params, (x,)).float(), heads[t], scale))
                loss = loss.mean(0)
                loss.backward()
                total += float(loss.detach())
        used = [k for k in keys if leaves[k].grad is not None]  # a tensor the forward never reads has none
        optimizer.zero_grad()
        if used:
            torch.autograd.backward([merged[k] for k in used], [leaves[k].grad.to(dtype) for k in used])  # type: ignore[union-attr]
        optimizer.step()
        history.append(total)
        bar.set_postfix(entropy=f"{total:.4f}")
    bar.close()
    with torch.no_grad():
        final = clamped(raw.detach())
        learned = merged_parameters(start, tvs, final, keys)
        out = {k: (learned[k].to(v.dtype) if k in learned else v.clone()).cpu() for k, v in base.items()}
    return AdaMerged(final.cpu(), tuple(keys), out, tuple(history))


def _check(
    theta0: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    heads: Sequence[Tensor],
    batches: Sequence[Iterator[Tensor]],
    granularity: str,
    steps: int,
    lr: float,
    init: float,
    batches_per_step: int,
) -> list[str]:
    """The merged keys, after one-line refusals of inputs AdaMerging cannot learn from."""
    if not task_vectors:
        raise TatrError("AdaMerging needs at least one task vector")
    if not len(task_vectors) == len(heads) == len(batches):
        raise TatrError(
            f"AdaMerging needs one head and one input stream per task vector: got {len(task_vectors)} task "
            f"vectors, {len(heads)} heads, {len(batches)} input streams"
        )
    if granularity not in GRANULARITIES:
        raise TatrError(f"AdaMerging granularity must be one of {', '.join(GRANULARITIES)}, got '{granularity}'")
    for name, value, least in (("steps", steps, 1), ("batches_per_step", batches_per_step, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TatrError(f"AdaMerging {name} must be an integer ≥ {least}, got {value!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise TatrError(f"AdaMerging lr must be a positive finite number, got {lr!r}")
    if not math.isfinite(init):
        raise TatrError(f"AdaMerging's initial λ must be finite, got {init!r}")
    keys = list(task_vectors[0])
    if not keys:
        raise TatrError("AdaMerging: the task vectors are empty")
    for t, tv in enumerate(task_vectors):
        if set(tv) != set(keys):
            raise TatrError(f"AdaMerging: task vector {t} has other keys than task vector 0")
        for k in keys:
            if k not in theta0:
                raise TatrError(f"AdaMerging: key '{k}' of the task vectors is not in θ_0")
            if tuple(tv[k].shape) != tuple(theta0[k].shape) or not tv[k].is_floating_point():
                raise TatrError(f"AdaMerging: key '{k}' of task vector {t} is not floating or not θ_0's shape")
    return keys
