"""Per-task statistics at θ_t for the combiners that read them (Fisher merging's F_t, RegMean's G_t),
computed by a suite as it computes the exemplar gradients, and cached by content.

Why here and not in the core: the core has the estimators (`tatr.core.fisher`, `tatr.core.regmean`), which
take a model, batches and a classify rule; what a benchmark adds is *which* model (θ_t loaded into the
suite's encoder), *which* examples (a seeded draw of the task's training split, `statistics_batches`), the
rule (the suite's cosine-to-head logits, `tatr.core.classify.cosine_logits` times its logit scale, the rule
of the exemplar gradients), and the modules RegMean hooks where attention is not made of `nn.Linear`s
(`regmean_modules`). Every suite gets it: a `BuiltSuite` (the testbed, the text suite) and clip8 through
their `task_statistics`, a plugin suite through `suite_statistics`, which falls back to this module.

Following FusionBench 0.2.33 (`clip_fisher_merging.py::get_fisher_weights`, `clip_regmean.py::
get_regmean_weights`, their CLIP configs): both statistics at the fine-tuned model θ_t of their task (its
`modelpool.named_models()`), on its training split, 256 examples in batches of 32 by default. Differences:
tatr draws exactly `n` examples by a seeded permutation (FusionBench: the first batches of the unshuffled
training split for the Fisher, of an unseeded shuffle for RegMean, the last batch full), the same draw as
the exemplars of that seed.

RegMean's modules (`regmean_modules`): every `nn.Linear` that runs as a module (BERT's query, key, value and
output projections, the MLPs; all of the text suite's linear layers). torch's `nn.MultiheadAttention` (the
testbed's and clip8's open_clip ViTs) packs q, k and v into `in_proj_weight` and reads `out_proj`'s weight
inside its own forward, so neither is an `nn.Linear` call: `in_proj_weight` is hooked through the attention
module (self-attention: the query is the input of all three), and `out_proj.weight` through a probe fed the
attention's output before its projection (recomputed with the module's weights and an identity projection,
`_pre_projection`). Still averaged there: the patch embedding (`conv1`, a convolution), the visual
projection `proj` (a bare [in, out] parameter, not an [out, in] linear weight), embeddings, biases and
layer norms, as FusionBench averages everything RegMean does not merge.

Cache: `<cache_root>/statistics/<key>/{fisher,gram}.safetensors`, one folder per task, written atomically
and verified on read (`tatr.core.cache.cached_dir`; under torchrun each rank computes its share of the
examples and rank 0 alone writes, `tatr.core.distributed`), the file's metadata the `tatr_statistics` kind,
estimator and example count the core checks (`save_fisher`, `save_grams`). The key covers the suite's name,
the task, the kind and estimator, n, the seed and the batch size, θ_t's file digest, the parameter names,
the logit scale, the head and the bytes of the drawn examples.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tatr.core.cache import content_hash, default_cache_root, file_digest
from tatr.core.checkpoints import header, load_state_dict
from tatr.core.classify import cosine_logits
from tatr.core.distributed import is_main, shared_cached_dir, world
from tatr.core.errors import TatrError
from tatr.core.fisher import (
    DEFAULT_FISHER_ESTIMATOR,
    FISHER_ESTIMATORS,
    fisher_fusionbench,
    fisher_per_sample,
    save_fisher,
)
from tatr.core.registry import unknown_name
from tatr.core.regmean import regmean_grams, save_grams
from tatr.suites.evaluation import tensor_digest  # the one content key of in-memory tensors

STATISTICS_FORMAT = 1  # bump when a statistics file's meaning changes, so old cache entries are not reused
KINDS = ("fisher", "gram")  # `tatr.core.options.StatisticKind` names: Fisher merging's, RegMean's
GRAM_ESTIMATOR = "fusionbench-regmean"  # what `save_grams` writes: RegMean has one estimator


def check_fisher_estimator(name: str) -> str:
    """The estimator's name, or a one-line error with "did you mean"."""
    if name not in FISHER_ESTIMATORS:
        raise TatrError(unknown_name("Fisher estimator", name, FISHER_ESTIMATORS))
    return name


def suite_statistics(suite: Any, kind: str, n: int, seed: int, **options: Any) -> dict[str, Path]:
    """Statistics files per task through the suite's own `task_statistics` where it has one (the built-in
    suites), else `task_statistics` over the `Suite` protocol (a plugin suite written before statistics)."""
    own = getattr(suite, "task_statistics", None)
    if own is not None:
        options.pop("cache_root", None)  # a suite caches under its own root, as its gradients
        return dict(own(kind, n, seed, **options))
    return task_statistics(suite, kind, n, seed, **options)


def task_statistics(
    suite: Any,
    kind: str,
    n: int,
    seed: int,
    *,
    estimator: str = DEFAULT_FISHER_ESTIMATOR,
    batch_size: int = 32,
    cache_root: Path | None = None,
    chunk: int | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """One statistics file per task (task → path), each computed at θ_t on `n` training examples drawn
    with `seed` in batches of `batch_size` (`statistics_batches`), cached by content (module docstring).

    `kind`: "fisher" (with `estimator`, one of `FISHER_ESTIMATORS`) or "gram" (RegMean). `chunk`: the
    per-sample Fishers' (example, class) pairs per vmap call (None: `auto_chunk`). `progress`: a line per
    task computed (not per task read from the cache)."""
    if kind not in KINDS:
        raise TatrError(unknown_name("statistics kind", kind, KINDS))
    estimator = check_fisher_estimator(estimator) if kind == "fisher" else GRAM_ESTIMATOR
    if n < 1 or batch_size < 1:
        raise TatrError(f"statistics.n and statistics.batch must be at least 1, got {n} and {batch_size}")
    world()  # under torchrun: the process group, and this rank's GPU as "cuda", before an encoder is built
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    checkpoints = suite.checkpoints()
    scale = float(suite.logit_scale())
    names = [k for k, p in suite.encoder(None).named_parameters() if p.dtype.is_floating_point]
    out: dict[str, Path] = {}
    for task in suite.tasks:
        finetuned = Path(checkpoints.finetuned[task])
        missing = sorted(set(names) - set(header(finetuned)))
        if missing:  # the statistics are keyed by the encoder's parameter names
            raise TatrError(f"{finetuned}: encoder parameter '{missing[0]}' is not a key of the checkpoint")
        batches = list(statistics_batches(suite, task, n, seed, batch_size))
        head = suite.head(task)
        key = content_hash(
            "task-statistics",
            STATISTICS_FORMAT,
            suite.name,
            task,
            kind,
            estimator,
            n,
            seed,
            batch_size,
            chunk if estimator in ("per-sample", "empirical") else None,  # the summation order of those
            file_digest(finetuned),
            names,
            scale,
            tensor_digest(head),
            tensor_digest(*(t for batch in batches for t in batch)),
        )

        def compute(batches=batches, head=head, finetuned=finetuned, task=task) -> dict[str, Tensor]:
            if progress and is_main():
                print(f"{suite.name}: {estimator} statistics of task '{task}' (n={n}, seed={seed})", flush=True)
            model = suite.encoder(load_state_dict(finetuned))
            classify = partial(cosine_logits, head=head, scale=scale)
            if kind == "fisher":
                return estimate_fisher(model, batches, classify, names, estimator, n, chunk)
            with regmean_modules(model) as modules:  # every batch: the draw holds exactly n examples
                return regmean_grams(model, batches, modules=modules)

        def write(folder: Path, statistics: dict[str, Tensor]) -> None:
            if kind == "fisher":
                save_fisher(statistics, folder / "fisher.safetensors", estimator, n)
            else:
                save_grams(statistics, folder / "gram.safetensors", n)

        # under torchrun every rank computes its share, rank 0 alone writes (`tatr.core.distributed`)
        out[task] = shared_cached_dir(root / "statistics", key, compute, write) / f"{kind}.safetensors"
    return out


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    classify: Callable[[Any], Tensor],
    names: list[str],
    estimator: str,
    n: int,
    chunk: int | None = None,
) -> dict[str, Tensor]:
    """The Fisher of `model` (at its parameters) by the named estimator (`FISHER_ESTIMATORS`)."""
    if check_fisher_estimator(estimator) == "fusionbench":
        return fisher_fusionbench(model, batches, classify=classify, names=names, num_examples=n)
    empirical = estimator == "empirical"
    return fisher_per_sample(
        model, batches, empirical=empirical, classify=classify, names=names, num_examples=n, chunk=chunk
    )


def statistics_batches(suite: Any, task: str, n: int, seed: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """`n` training examples of `task` drawn with `seed`, in batches of `batch_size`: the suite's
    `statistics_loader` where it has one (the built-in suites: the exemplar draw of that seed), else its
    exemplar loader's batches cut again to `batch_size` (inputs of one shape)."""
    own = getattr(suite, "statistics_loader", None)
    if own is not None:
        yield from own(task, n, seed, batch_size)
        return
    pending: list[tuple[Tensor, Tensor]] = []
    for x, y in suite.exemplar_loader(task, n, seed):
        pending.append((x, y))
    if not pending:
        raise TatrError(f"{suite.name}: the exemplar loader of task '{task}' is empty")
    x = torch.cat([b[0] for b in pending])
    y = torch.cat([b[1] for b in pending])
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


@contextlib.contextmanager
def regmean_modules(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Weight key → the module whose forward's first input is that weight's input (`regmean_grams`'
    `modules`), in the model's module order: every `nn.Linear` but an attention's `out_proj`; for every
    `nn.MultiheadAttention` with packed q/k/v, `<attn>.in_proj_weight` (the attention itself) and
    `<attn>.out_proj.weight` (a probe, fed by a hook this context adds and removes)."""
    modules: dict[str, nn.Module] = {}
    handles = []
    owned = set()  # the out_proj modules of attentions, which never run as modules
    try:
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                modules[f"{prefix}in_proj_weight"] = module
                probe = nn.Identity()
                modules[f"{prefix}out_proj.weight"] = probe
                owned.add(id(module.out_proj))
                handles.append(module.register_forward_hook(_feed(probe, name), with_kwargs=True))
            elif isinstance(module, nn.Linear) and id(module) not in owned:
                modules[f"{prefix}weight"] = module
        yield modules
    finally:
        for handle in handles:
            handle.remove()


def _feed(probe: nn.Module, name: str) -> Callable[..., None]:
    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
        probe(_pre_projection(module, name, args, kwargs))

    return hook


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _pre_projection(module: nn.MultiheadAttention, name: str, args: tuple, kwargs: dict) -> Tensor:
    """The attention's output before `out_proj` (the concatenated heads), shaped like its query: the
    module's own computation (`F.multi_head_attention_forward`) with an identity output projection."""
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if not (query is key and key is value):
        raise TatrError(
            f"RegMean: attention '{name}' is not self-attention (its query, key and value differ), so one Gram "
            "matrix of its inputs does not describe in_proj_weight"
        )
    if module.batch_first and query.dim() == 3:
        query = query.transpose(0, 1)
    dim = module.embed_dim
    weight = module.out_proj.weight
    identity = torch.eye(dim, dtype=weight.dtype, device=weight.device)
    zero = torch.zeros(dim, dtype=weight.dtype, device=weight.device)
    heads, _ = F.multi_head_attention_forward(
        query,
        query,
        query,
        dim,
        module.num_heads,
        module.in_proj_weight,
        module.in_proj_bias,
        module.bias_k,
        module.bias_v,
        module.add_zero_attn,
        0.0,  # eval: no dropout
        identity,
        zero,
        training=False,
        key_padding_mask=a["key_padding_mask"],
        need_weights=False,
        attn_mask=a["attn_mask"],
        is_causal=a["is_causal"],
    )
    return heads.transpose(0, 1) if module.batch_first and heads.dim() == 3 else heads
