"""Exemplar gradient statistics at θ_0: mean |per-sample gradient| (TATR's s_i) and the signed mean.

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
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from tatr.core.classify import cosine_logits  # the one rule; AdaMerging imports it from here too


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
    """Return (mean |∇ℓ_n|, mean ∇ℓ_n) over all samples in `batches`, as fp32 state dicts.

    `chunk` samples are differentiated at once; their gradients are materialised together, so
    memory grows as chunk × parameters. The default (`auto_chunk`) keeps that near 1 GiB: 32 for
    small models, 3 for ViT-B/32, where larger chunks only add memory traffic (on CPU the loop and
    vmap do the same FLOPs; see `benchmarks/bench_gradients.py`). Results do not depend on
    `chunk` beyond float summation order.
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
    count = 0
    bar = tqdm(desc="exemplar gradients", unit="ex", disable=not progress, leave=False)
    with _vmap_friendly_attention(math_attention):
        for x, y in batches:
            for start in range(0, len(x), chunk):
                xs, ys = x[start : start + chunk], y[start : start + chunk]
                grads = per_sample(params, xs, ys)
                for k, g in grads.items():
                    g = g.float()
                    abs_sum[k].add_(g.abs().sum(0))
                    signed_sum[k].add_(g.sum(0))
                del grads
                count += len(xs)
                bar.update(len(xs))
    bar.close()
    if count == 0:
        raise ValueError("no exemplars: the exemplar loader is empty")
    return ({k: v / count for k, v in abs_sum.items()}, {k: v / count for k, v in signed_sum.items()})


def gradient_stats_loop(
    model: nn.Module,
    head: Tensor,
    scale: float,
    batches: Iterable[tuple[Tensor, Tensor]],
    names: Iterable[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Reference: one backward pass per sample. Used by tests and the benchmark as the baseline."""
    model = model.eval()
    keys, all_params = _selected(model, names)
    abs_sum = {k: torch.zeros_like(all_params[k], dtype=torch.float32) for k in keys}
    signed_sum = {k: torch.zeros_like(all_params[k], dtype=torch.float32) for k in keys}
    count = 0
    for x, y in batches:
        for i in range(len(x)):
            loss = F.cross_entropy(cosine_logits(model(x[i : i + 1]), head, scale), y[i : i + 1])
            gs = torch.autograd.grad(loss, [all_params[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, gs, strict=True):
                if g is not None:
                    abs_sum[k].add_(g.float().abs())
                    signed_sum[k].add_(g.float())
            count += 1
    if count == 0:
        raise ValueError("no exemplars: the exemplar loader is empty")
    return ({k: v / count for k, v in abs_sum.items()}, {k: v / count for k, v in signed_sum.items()})
