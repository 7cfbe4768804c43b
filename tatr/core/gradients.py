"""Exemplar gradient statistics at θ_0: mean |per-sample gradient| (TATR's s_i), the signed mean, and
the mean square (the diagonal empirical Fisher: the `diag-fisher` trust-region mode's s_i).

The mean of |∇ℓ(x_n)| is not |mean ∇ℓ|, so one backward over a batch cannot give it; per-sample
gradients are computed with `torch.func.vmap(grad(...))` over chunks of exemplars instead of one
backward pass per sample. Only parameters that require grad are differentiated; the caller picks
them (e.g. the visual tower) by passing `names`. The loss is cross-entropy of the one classification
rule of every suite, `tatr.core.classify.cosine_logits`, times the suite's logit scale.

Attention runs on PyTorch's MATH scaled-dot-product kernel inside the vmap, and
`nn.MultiheadAttention`'s fused inference fast path is switched off meanwhile: neither fused op
has a vmap batching rule, so functorch would warn and fall back to a per-sample loop over it.
Measured on CPU (`benchmarks/bench_gradients.py`, process CPU time) the fallback costs about the
same as MATH at testbed and ViT-B/32 sizes, so this is about a clean, predictable path rather than
speed. What does matter is the chunk size for large models (`auto_chunk`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from tatr.core.classify import cosine_logits  # the one rule; AdaMerging imports it from here too
from tatr.core.distributed import all_reduce_sums, is_main, shard, shard_examples


@contextlib.contextmanager
def _vmap_friendly_attention(math_attention: bool) -> Iterator[None]:
    """MATH attention kernel, and no `nn.MultiheadAttention` fused fast path (no batching rule
    either; it is taken when the attention weights are not among the differentiated ones)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _selected(model: nn.Module, names: Iterable[str] | None) -> tuple[list[str], dict[str, Tensor]]:
    all_params = dict(model.named_parameters())
    keys = list(names) if names is not None else list(all_params)
    unknown = [k for k in keys if k not in all_params]
    if unknown:
        raise KeyError(f"not parameters of the model: {', '.join(unknown[:3])}")
    return keys, all_params


def functional_parts(
    model: nn.Module, names: Iterable[str] | None, chunk: int | None
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], int]:
    """(differentiated parameters, frozen parameters, buffers, chunk) for `torch.func` per-sample
    gradients of `model`: the one setup of the exemplar gradients and the per-sample Fisher."""
    keys, all_params = _selected(model, names)
    chunk = auto_chunk(sum(all_params[k].numel() for k in keys)) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    params = {k: all_params[k].detach() for k in keys}
    frozen = {k: v.detach() for k, v in all_params.items() if k not in params}
    return params, frozen, dict(model.named_buffers()), chunk


def auto_chunk(num_params: int, budget_bytes: int = 1 << 30, most: int = 32) -> int:
    """Samples per vmap call so that their fp32 per-sample gradients fit in `budget_bytes`."""
    return max(1, min(most, budget_bytes // (4 * max(1, num_params))))


# The per-sample gradient moments `gradient_moments` returns, by the names the suites' `ExemplarGradients`
# fields and the trust-region modes' `statistic` use: mean |∇ℓ_n|, mean ∇ℓ_n, mean (∇ℓ_n)².
MOMENTS = ("abs_mean", "signed_mean", "sq_mean")


def gradient_stats(
    model: nn.Module,
    head: Tensor,
    scale: float,
    batches: Iterable[tuple[Tensor, Tensor]],
    names: Iterable[str] | None = None,
    chunk: int | None = None,
    progress: bool = False,
    math_attention: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Return (mean |∇ℓ_n|, mean ∇ℓ_n) over all samples in `batches`, as fp32 state dicts: the first two
    of `gradient_moments`, bit for bit."""
    moments = gradient_moments(model, head, scale, batches, names, chunk, progress, math_attention)
    return moments["abs_mean"], moments["signed_mean"]


def gradient_moments(
    model: nn.Module,
    head: Tensor,
    scale: float,
    batches: Iterable[tuple[Tensor, Tensor]],
    names: Iterable[str] | None = None,
    chunk: int | None = None,
    progress: bool = False,
    math_attention: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Every moment of `MOMENTS` over all samples in `batches`, each as an fp32 state dict, from one pass.

    `chunk` samples are differentiated at once; their gradients are materialised together, so
    memory grows as chunk × parameters. The default (`auto_chunk`) keeps that near 1 GiB: 32 for
    small models, 3 for ViT-B/32, where larger chunks only add memory traffic (on CPU the loop and
    vmap do the same FLOPs; see `benchmarks/bench_gradients.py`). Results do not depend on
    `chunk` beyond float summation order. The squares are summed in their own buffer, so the first two
    moments are what they were before it existed, bit for bit. Under torchrun each rank differentiates its
    share of the exemplars and the sums are all-reduced (`tatr.core.distributed`): the same moments, to
    float rounding, on every rank.
    """
    model = model.eval()
    params, frozen, buffers, chunk = functional_parts(model, names, chunk)
    head = head.detach()

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(cosine_logits(out, head, scale), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    abs_sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    signed_sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    sq_sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    count = 0
    bar = tqdm(desc="exemplar gradients", unit="ex", disable=not (progress and is_main()), leave=False)
    with _vmap_friendly_attention(math_attention):
        for x, y in shard_examples(batches):
            for start in range(0, len(x), chunk):
                xs, ys = x[start : start + chunk], y[start : start + chunk]
                grads = per_sample(params, xs, ys)
                for k, g in grads.items():
                    g = g.float()
                    abs_sum[k].add_(g.abs().sum(0))
                    signed_sum[k].add_(g.sum(0))
                    sq_sum[k].add_(g.square().sum(0))
                del grads
                count += len(xs)
                bar.update(len(xs))
    bar.close()
    count = all_reduce_sums((abs_sum, signed_sum, sq_sum), count)
    if count == 0:
        raise ValueError("no exemplars: the exemplar loader is empty")
    return _means(count, abs_sum, signed_sum, sq_sum)


def _means(count: int, *sums: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    return {name: {k: v / count for k, v in total.items()} for name, total in zip(MOMENTS, sums, strict=True)}


def gradient_stats_loop(
    model: nn.Module,
    head: Tensor,
    scale: float,
    batches: Iterable[tuple[Tensor, Tensor]],
    names: Iterable[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Reference: one backward pass per sample. Used by tests and the benchmark as the baseline."""
    moments = gradient_moments_loop(model, head, scale, batches, names)
    return moments["abs_mean"], moments["signed_mean"]


def gradient_moments_loop(
    model: nn.Module,
    head: Tensor,
    scale: float,
    batches: Iterable[tuple[Tensor, Tensor]],
    names: Iterable[str] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """`gradient_moments` by one backward pass per sample: the reference of the tests."""

    def losses() -> Iterator[Tensor]:
        for x, y in batches:
            for i in range(len(x)):
                yield F.cross_entropy(cosine_logits(model(x[i : i + 1]), head, scale), y[i : i + 1])

    return per_example_moments(model.eval(), losses(), names)


def per_example_moments(
    model: nn.Module,
    losses: Iterable[Tensor | Callable[[], Tensor]],
    names: Iterable[str] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """Every moment of `MOMENTS` over examples whose losses `losses` yields one at a time (one backward pass
    each): for a model whose per-example loss is not a head's cross-entropy (a causal LM's answer tokens), and
    the memory-lean path for a large one: one gradient of the model at a time beside the three running sums.
    A parameter tied to another (an LM head to its embedding) is one parameter: its gradient sums both uses.

    Under torchrun each rank takes every W-th loss and the sums are all-reduced (`tatr.core.distributed`); a
    loss given as a callable is computed only by the rank that takes it, where a tensor yielded by a generator
    has had its forward pass computed on every rank."""
    keys, all_params = _selected(model, names)
    sums = [{k: torch.zeros_like(all_params[k], dtype=torch.float32) for k in keys} for _ in MOMENTS]
    count = 0
    quiet = not (progress and is_main())
    for loss in tqdm(shard(losses), desc="exemplar gradients", unit="ex", disable=quiet, leave=False):
        loss = loss() if callable(loss) else loss
        gs = torch.autograd.grad(loss, [all_params[k] for k in keys], allow_unused=True)
        for k, g in zip(keys, gs, strict=True):
            if g is not None:
                g = g.float()
                sums[0][k].add_(g.abs())
                sums[1][k].add_(g)
                sums[2][k].add_(g.square())
        count += 1
    count = all_reduce_sums(sums, count)
    if count == 0:
        raise ValueError("no exemplars: the exemplar loader is empty")
    return _means(count, *sums)
