"""Data-parallel statistics under `torchrun`: each rank takes a share of the examples, sums its share, and
the sums are all-reduced, so the result equals one process's to float rounding (only the order of the
additions differs).

Why sums and not means: a mean of rank means is wrong when the shares differ in size (7 exemplars on 2
ranks), and a rank may hold no example at all (1 exemplar on 2 ranks); sums and counts add up whatever the
shares. So every estimator here keeps running sums and a count (`tatr.core.gradients`, the Fishers of
`tatr.core.fisher`), or turns its running mean back into a sum before the reduction (RegMean's Gram
matrices), and divides once, after `all_reduce_sums`.

The shares are deterministic and cover the one-process draw exactly once: `shard_examples` strides over
the examples across batch boundaries (example i goes to rank i mod W), `shard` over whole items (per-example
losses, or batches where a batch is the unit of the estimator, as FusionBench's Fisher squares a batch's
gradient), and `shard_batches` first applies FusionBench's stop rule (batches while fewer than `num_examples`
examples were seen) over all the batches, so every rank agrees on which are taken.

Caches: `shared_cached_dir` lets rank 0 alone decide whether an entry must be built and alone write it
(through `tatr.core.cache.cached_dir`: temporary folder, then rename); every rank computes its share, and
the others wait on a barrier, then use the same path. The cache folder must be shared by the ranks (one
machine, or a shared file system).

"Under torchrun" means: the default process group is initialised with more than one rank, or `WORLD_SIZE`
> 1 in the environment, in which case the group is initialised here on first use (`env://`: gloo for CPU
tensors and, where CUDA is available, NCCL for CUDA tensors, each rank on the GPU `LOCAL_RANK`). Otherwise
every function here returns its input untouched and nothing is initialised: the one-process path computes
the same bytes as before this module existed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from tatr.core.cache import cached_dir, verify_dir
from tatr.core.errors import TatrError

T = TypeVar("T")
Batch = TypeVar("Batch", bound=Sequence[Any])


def world() -> tuple[int, int]:
    """(rank, number of ranks): (0, 1) outside torchrun; under it, the default process group's, which is
    initialised here on first use when `WORLD_SIZE` > 1 and no group exists yet."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if _world_size_from_environment() <= 1:
        return 0, 1
    _initialise()
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    """Whether the statistics run data-parallel (more than one rank)."""
    return world()[1] > 1


def is_main() -> bool:
    """Whether this process is rank 0 (always outside torchrun): the one that writes and prints."""
    return world()[0] == 0


def _world_size_from_environment() -> int:
    value = os.environ.get("WORLD_SIZE", "")
    if not value:
        return 1
    try:
        return int(value)
    except ValueError:
        raise TatrError(f"WORLD_SIZE={value!r} is not a number of processes (torchrun sets it)") from None


def _initialise() -> None:
    """`init_process_group` from torchrun's variables: gloo for CPU tensors, NCCL for CUDA ones."""
    if not dist.is_available():
        raise TatrError("WORLD_SIZE > 1, but this build of torch has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is then this rank's GPU
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TatrError(f"WORLD_SIZE > 1, but the process group cannot start ({first}); run under torchrun") from None


def shard(items: Iterable[T]) -> Iterable[T]:
    """This rank's share of `items`: those at positions rank, rank + W, rank + 2W, … (W ranks); `items`
    itself outside torchrun. Items are only iterated over, so a lazy item (a callable, see
    `tatr.core.gradients.per_example_moments`) costs nothing on the ranks that skip it."""
    rank, size = world()
    if size == 1:
        return items
    return (item for i, item in enumerate(items) if i % size == rank)


def shard_examples(batches: Iterable[Batch], num_examples: int | None = None) -> Iterable[Batch]:
    """This rank's rows of the first `num_examples` examples (None: all) of `batches`, strided over the
    examples of the whole draw (example i, counted across batches, goes to rank i mod W); a batch is a
    sequence of tensors indexed alike along their first dimension (given back as a tuple), and a batch
    that leaves this rank no row is skipped. Outside torchrun, `batches` itself (the caller truncates as before)."""
    rank, size = world()
    if size == 1:
        return batches
    return _strided_rows(batches, num_examples, rank, size)


def _strided_rows(batches: Iterable[Batch], num_examples: int | None, rank: int, size: int) -> Iterator[Batch]:
    offset = 0
    for batch in batches:
        length = len(batch[0])
        if num_examples is not None:
            length = min(length, num_examples - offset)
        if length <= 0:
            return
        rows = slice((rank - offset) % size, length, size)
        offset += length
        if rows.start < length:
            yield tuple(part[rows] for part in batch)  # type: ignore[misc]


def shard_batches(batches: Iterable[Batch], num_examples: int | None = None) -> Iterable[Batch]:
    """This rank's whole batches among those taken while fewer than `num_examples` examples (None: all)
    were seen, counted over every rank's batches (FusionBench's stop rule, the same on every rank); batch b
    goes to rank b mod W. Outside torchrun, `batches` itself."""
    if world()[1] == 1:
        return batches

    def taken() -> Iterator[Batch]:
        seen = 0
        for batch in batches:
            if num_examples is not None and seen >= num_examples:
                return
            seen += len(batch[0])
            yield batch

    return shard(taken())


def all_reduce_sums(sums: Sequence[dict[str, Tensor]], count: int) -> int:
    """Sum, in place, every tensor of the state dicts `sums` over the ranks, and return the sum of the
    ranks' `count`s. A key some rank lacks (a module its share never ran) is added there as zeros first, so
    every rank ends with the same keys. Outside torchrun: `count`, nothing touched."""
    if world()[1] == 1:
        return count
    layouts = [
        {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), v.device.type) for k, v in d.items()} for d in sums
    ]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (layouts, count))
    for i, state in enumerate(sums):
        for rank_layouts, _ in gathered:  # the same order on every rank: rank 0's keys, then the others'
            for key, (shape, dtype, device) in rank_layouts[i].items():
                if key not in state:
                    state[key] = torch.zeros(shape, dtype=getattr(torch, dtype), device=torch.device(device))
                elif tuple(state[key].shape) != shape:
                    raise ValueError(f"'{key}' has shape {tuple(state[key].shape)} here but {shape} on another rank")
        for key in _union_keys(gathered, i):
            dist.all_reduce(state[key], op=dist.ReduceOp.SUM)
    return sum(int(c) for _, c in gathered)


def _union_keys(gathered: list[Any], index: int) -> list[str]:
    keys: dict[str, None] = {}
    for rank_layouts, _ in gathered:
        keys.update(dict.fromkeys(rank_layouts[index]))
    return list(keys)


def shared_cached_dir(root: Path, key: str, compute: Callable[[], T], write: Callable[[Path, T], None]) -> Path:
    """`tatr.core.cache.cached_dir(root, key, build)` with build = write(folder, compute()), where
    `compute` may be collective (its sums all-reduced): under torchrun rank 0 decides whether the entry
    must be built, every rank then runs `compute`, rank 0 alone writes the entry, and the others wait on a
    barrier and return the same path. Outside torchrun: `cached_dir` itself."""
    rank, size = world()
    if size == 1:
        return cached_dir(root, key, lambda folder: write(folder, compute()))
    final = Path(root) / key
    decision: list[Any] = [not verify_dir(final)] if rank == 0 else [None]
    dist.broadcast_object_list(decision, src=0)
    if decision[0]:
        result = compute()
        if rank == 0:
            try:
                cached_dir(root, key, lambda folder: write(folder, result))
            finally:
                dist.barrier()  # released even when writing failed: the others then report it
        else:
            dist.barrier()
    if not final.is_dir():
        raise TatrError(f"{final}: rank 0 did not write this cache entry (is the cache folder shared by every rank?)")
    return final
