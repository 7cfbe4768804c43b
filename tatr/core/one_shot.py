"""One merge at one (q, λ): `merge` returns the merged state dict, `merge_once` also writes it (what `tatr merge`
runs). Both choose the path: a `MergePlan` in memory (`tatr.core.merging`), or out of core when its arenas would
not fit the memory budget or `low_memory` asks for it (`tatr.core.out_of_core`: the same bits, the inputs read
once per pass, peak memory a few tensors × T). A plan, which keeps its arenas for many (q, λ) trials, is always
in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from tatr.core.checkpoints import save_state_dict
from tatr.core.components import check_components
from tatr.core.errors import TatrError
from tatr.core.memory_budget import choose_out_of_core
from tatr.core.merge_inputs import check_lam_neg_method, check_numbers
from tatr.core.merging import MergePlan, StateInput, open_inputs, plan_statistics
from tatr.core.methods import MergeMethod, get_method
from tatr.core.options import OptionValues, check_options
from tatr.core.out_of_core import Sink, StreamedMerge, merge_streamed
from tatr.core.vectors import TaskSet


def merge(
    pretrained: StateInput,
    finetuned: Sequence[StateInput],
    *,
    method: str | MergeMethod = "ta",
    trust_region: str = "zero-shot",
    q: float = 0.99,
    lam: float | None = None,
    components: Sequence[str] | None = None,
    gradients: Sequence[StateInput] | None = None,
    signed_gradients: Sequence[StateInput] | None = None,
    progress: bool = False,
    lam_neg: float | None = None,
    statistics: Sequence[StateInput] | None = None,
    low_memory: bool | None = None,
    memory_budget: int | None = None,
    **options: object,
) -> dict[str, Tensor]:
    """Merge once: θ_0 + λ·M with the trust region at q (θ_0 + λ·M_rest + λ_neg·M_neg with `lam_neg`).
    The method's options are keywords and `statistics` per-task files, as for `plan_merge`. Returns every
    key of θ_0. `low_memory`, `memory_budget`: as `merge_once` (an automatic switch is a `ResourceWarning`)."""
    merged, _ = merge_once(
        pretrained,
        finetuned,
        method=method,
        trust_region=trust_region,
        q=q,
        lam=lam,
        lam_neg=lam_neg,
        components=components,
        gradients=gradients,
        signed_gradients=signed_gradients,
        progress=progress,
        statistics=statistics,
        options=options,
        low_memory=low_memory,
        memory_budget=memory_budget,
        note=lambda line: warnings.warn(line, ResourceWarning, stacklevel=3),
    )
    assert merged is not None
    return merged


def merge_once(
    pretrained: StateInput,
    finetuned: Sequence[StateInput],
    *,
    method: str | MergeMethod = "ta",
    trust_region: str = "zero-shot",
    q: float = 0.99,
    lam: float | None = None,
    lam_neg: float | None = None,
    components: Sequence[str] | None = None,
    gradients: Sequence[StateInput] | None = None,
    signed_gradients: Sequence[StateInput] | None = None,
    progress: bool = False,
    statistics: Sequence[StateInput] | None = None,
    options: Mapping[str, object] | None = None,
    low_memory: bool | None = None,
    memory_budget: int | None = None,
    out: str | Path | Sink | None = None,
    metadata: Mapping[str, str] | None = None,
    note: Callable[[str], None] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor] | None, MergePlan | StreamedMerge]:
    """One merge at (q, λ), in memory (a `MergePlan`) or out of core (`tatr.core.out_of_core`: the same
    bits without arenas over the N coordinates); returns (the merged state dict, what the merge reports:
    the plan, or a `StreamedMerge` answering the same questions).

    `low_memory`: True out of core, False in memory, None out of core only when the in-memory arenas would
    exceed `memory_budget` bytes (default: 80% of the available memory); `note` gets the one line saying so.
    With `out` (a .safetensors file) the result is written there, tensor by tensor out of core, with
    `metadata`, and None is returned in place of the state dict; `out` may also be a `Sink` for θ_0's keys,
    shapes and dtypes (a model folder's shards, `tatr.io.model_folder_writer`), which gets every merged tensor
    (out of core as it is computed, in memory from the merged dict) and which the caller commits.
    `out_dtype` (mergekit's): every floating tensor in that dtype, rounded once; out of core only where it
    is not more precise than θ_0's dtypes."""
    check_numbers(q=q, lam=lam, lam_neg=lam_neg)  # before any work
    values = options if isinstance(options, OptionValues) else check_options(dict(options or {}))
    if lam_neg is not None:
        named = method if isinstance(method, MergeMethod) else get_method(method)
        check_lam_neg_method(named, check_components(components))
    inputs = (pretrained, finetuned, method, trust_region, components, gradients, signed_gradients, statistics)
    task_set, merge_method, chosen = open_inputs(*inputs)
    merge_method.check_tasks(values, task_set.num_tasks)
    if low_memory is None and out_dtype is not None and _streamed_dtype_problem(task_set, out_dtype, out):
        low_memory = False  # only the in-memory merge rounds to this out_dtype once: not chosen away from it
    decide = (task_set, merge_method, trust_region, chosen, q, low_memory, memory_budget, lam_neg)
    streamed, why = choose_out_of_core(*decide)
    if why is not None and note is not None:
        note(why)
    if streamed:
        lam_value = merge_method.default_lam if lam is None else float(lam)
        stats = plan_statistics(merge_method, task_set, statistics)
        args = (task_set, merge_method, trust_region, q, lam_value, values, chosen, stats, progress)
        if out_dtype is None:
            return merge_streamed(*args, out=out, metadata=metadata)
        _check_streamed_dtype(task_set, out_dtype, out)
        result, report = merge_streamed(*args)
        assert result is not None
        return {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in result.items()}, report
    plan = MergePlan(task_set, merge_method, trust_region, None, chosen, False, progress, values, statistics=statistics)
    plan.prepare([q], release_scores=True)
    merged = plan.merged(q, lam, lam_neg, out_dtype)
    if out is None:
        return merged, plan
    if not isinstance(out, str | Path):
        for key, value in merged.items():
            out.put(key, value)
        return None, plan
    save_state_dict(merged, out, metadata=dict(metadata) if metadata else None)
    return None, plan


def _streamed_dtype_problem(task_set: TaskSet, out_dtype: torch.dtype, out: object) -> str | None:
    """Why `out_dtype` cannot be applied out of core, or None: θ_0 + λ·M is rounded to θ_0's dtypes as it
    streams, so an `out_dtype` more precise than one of them would round twice, and a file is written as it
    streams."""
    finer = [
        d
        for d in set(task_set.dtypes.values())
        if d.is_floating_point and torch.finfo(d).eps > torch.finfo(out_dtype).eps
    ]
    if finer:
        return f"it is more precise than θ_0's {finer[0]}"
    return "a file is written as it streams" if out is not None else None


def _check_streamed_dtype(task_set: TaskSet, out_dtype: torch.dtype, out: object) -> None:
    """The one-line refusal of `_streamed_dtype_problem`, for a merge forced out of core."""
    why = _streamed_dtype_problem(task_set, out_dtype, out)
    if why is not None:
        raise TatrError(f"out_dtype {out_dtype} cannot be applied out of core ({why}); merge in memory or change it")
