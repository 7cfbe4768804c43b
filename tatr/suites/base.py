"""The interface every research benchmark implements, so sweeps and reports never special-case one.

A suite hands out *files* (θ_0, the θ_t, gradient statistics) because the merge core streams from
files tensor by tensor; and it evaluates a merged state dict with its own frozen per-task heads.

Classification rule shared by all suites (CLIP zero-shot heads and the testbed alike), written once in
`tatr.core.classify.cosine_logits`:
    logits = scale · normalize(encoder(x)) @ normalize(head).T, with `head` rows L2-normalised class embeddings.

Unlabeled inputs (`Suite.unlabeled_loader`, for AdaMerging's test-time adaptation) are *inputs only*:
the labels never leave the suite, so a method that must not see them cannot read them by mistake.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tatr.core.errors import TatrError
from tatr.core.registry import Registry, did_you_mean, unknown_name

BUILD_THREADS = 1  # builds run on one torch thread: the bytes of a matrix product depend on the count


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op torch threads, restoring the caller's count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Checkpoints:
    """θ_0 and the fine-tuned θ_t on disk (safetensors), in the suite's task order."""

    pretrained: Path
    finetuned: Mapping[str, Path]


@dataclass(frozen=True)
class ExemplarGradients:
    """Per-task gradient statistics at θ_0, as safetensors files keyed like the merged parameters.

    `abs_mean[t]` holds mean_n |∇ℓ_t(x_n)| (the TATR sensitivity s_t); `signed_mean[t]` holds
    mean_n ∇ℓ_t(x_n) (the component ablation, the `gradient-agreement` trust region); `sq_mean[t]`
    mean_n (∇ℓ_t(x_n))² (the `diag-fisher` trust region), None unless asked for (`squared=True`).
    The field names are `tatr.core.gradients.MOMENTS`, which the trust-region modes' `statistic` names.
    """

    abs_mean: Mapping[str, Path]
    signed_mean: Mapping[str, Path]
    sq_mean: Mapping[str, Path] | None = None


# How a suite draws its exemplars (`exemplars.selection`): "random", a seeded uniform draw without
# replacement (the first, the default: every cache key and row from before the option means it), or
# "balanced", the classes in turn (`exemplar_indices`).
SELECTIONS = ("random", "balanced")


def check_selection(selection: object) -> str:
    """An exemplar selection's name (`SELECTIONS`), or one line with "did you mean"."""
    if selection not in SELECTIONS:
        raise TatrError(unknown_name("exemplar selection", selection, SELECTIONS))
    return str(selection)


def exemplar_indices(labels: Tensor, n: int, seed: int, selection: str = "random") -> Tensor:
    """Which `n` of the training examples (with these `labels`) are the exemplars of `seed`.

    random: the first n of a seeded permutation (`torch.randperm`, the draw every suite always made).
    balanced: round-robin over the classes, seeded: the classes in a seeded order, each class's examples
    in a seeded order, then one example per class in turn, skipping classes that ran out, until n are
    taken; so n < #classes takes n distinct classes, and class counts never differ by more than one
    unless a class runs out. The caller checks 1 ≤ n ≤ len(labels).
    """
    if selection == "random":
        return torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    check_selection(selection)
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    classes = classes[torch.randperm(len(classes), generator=generator)]
    queues = []
    for c in classes.tolist():
        members = torch.nonzero(labels == c).flatten()
        queues.append(members[torch.randperm(len(members), generator=generator)].tolist())
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for queue in queues:
            if depth < len(queue) and len(chosen) < n:
                chosen.append(queue[depth])
        depth += 1
    return torch.tensor(chosen, dtype=torch.int64)


@runtime_checkable
class Suite(Protocol):
    name: str
    tasks: tuple[str, ...]

    @property
    def model_name(self) -> str:
        """The model every store row of this suite names (its `model` column), e.g. "ViT-B-32"."""
        ...

    def checkpoints(self) -> Checkpoints:
        """Build or fetch θ_0 and θ_t (cached, content-addressed) and return their paths."""
        ...

    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        """The image encoder with `state_dict` loaded (θ_0 when None), in eval mode."""
        ...

    def head(self, task: str) -> Tensor:
        """Frozen classification head of `task`: [classes, dim], rows L2-normalised."""
        ...

    def logit_scale(self) -> float:
        """Temperature applied to cosine logits for the loss (evaluation is scale-free)."""
        ...

    def loader(self, task: str, split: str, batch_size: int = 256) -> DataLoader:
        """Deterministic loader over (image, label) of `task` for a split in `tatr.store.schema.SPLITS`."""
        ...

    def exemplar_loader(self, task: str, n: int, seed: int) -> DataLoader:
        """`n` training exemplars of `task`, drawn with `seed`, for the gradient statistics.

        The built-in suites take a keyword `selection` too (`SELECTIONS`, drawn by `exemplar_indices`);
        it is passed only when it is not "random", so a plugin suite without it still runs the rest."""
        ...

    def unlabeled_loader(self, task: str, split: str, batch_size: int = 16, seed: int = 0) -> Iterator[Tensor]:
        """Endless batches of `task`'s inputs of `split`, without labels (AdaMerging learns on these).

        Inputs only: the labels stay inside the suite. The order is a seeded shuffle, reshuffled at
        every pass (`seeded_batches`); the same (seed, task) gives the same batches, and tasks differ
        for the same seed. AdaMerging's paper uses the test inputs (`adamerging.inputs: test`).
        """
        ...

    def exemplar_gradients(self, n: int, seed: int) -> ExemplarGradients:
        """Gradient statistics at θ_0 for every task (cached by content hash).

        The built-in suites take keywords `selection` (as `exemplar_loader`) and `squared` (also the mean
        squared gradients, `sq_mean`); each is passed only where it is not its default.

        Fisher merging and RegMean read other per-task statistics, at each θ_t. A suite may define
        `task_statistics(kind, n, seed, *, estimator, batch_size) -> {task: path}` ("fisher" or "gram",
        cached by content) and `statistics_loader(task, n, seed, batch_size)` (the examples they are
        computed on); the built-in suites do (`tatr.suites.task_statistics`). Neither is part of this
        protocol: without them the statistics are computed over it (θ_t from `checkpoints`, `encoder`,
        `head`, `logit_scale`, the exemplar loader's batches cut again), so a plugin suite runs them too.
        """
        ...

    def evaluate(
        self,
        state_dict: Mapping[str, Tensor],
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, float]:
        """Top-1 accuracy in percent per task; `on_task` is called as each task finishes (pruning).

        A suite may also define `evaluate_predictions` with the same arguments, returning per task a
        `tatr.store.predictions.TaskPredictions` (which examples were right and the predicted class, in
        the fixed order of its loader): the built-in suites do, and every writer then stores them. It is
        not part of this protocol, so a plugin suite without it still is a `Suite` (its rows have none).
        """
        ...

    def individual_accuracy(self, split: str) -> dict[str, float]:
        """Accuracy of each task's own fine-tuned model on its task (cached): the normaliser."""
        ...


def input_seed(seed: int, task: str) -> int:
    """The seed of task `task`'s unlabeled input order: stable across runs and machines (no `hash()`), distinct
    per task."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{task}".encode()).digest()[:7], "big")


def seeded_batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Index batches over `n` items, forever: a seeded permutation per pass, cut into full batches.

    Each pass sees every item at most once; the last partial batch of a pass is left out (the next
    pass reshuffles), so every batch has `batch_size` items, or all `n` when n < batch_size.
    AdaMerging's reference draws each step's batches from a freshly shuffled loader instead; both
    give uniformly drawn batches, this one also covers the data evenly.
    """
    if n < 1:
        raise TatrError("no inputs to draw unlabeled batches from (the split is empty)")
    if batch_size < 1:
        raise TatrError(f"the unlabeled batch size must be at least 1, got {batch_size}")
    return shuffled_batches(n, batch_size, torch.Generator().manual_seed(seed))


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches from `generator`: a permutation per pass, cut into full batches, a batch larger
    than the data cut to the data. The suites' fine-tunes and unlabeled inputs all draw from it."""
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


SuiteFactory = Callable[[dict[str, Any], Path | None], Suite]
SUITES: Registry[SuiteFactory] = Registry("benchmark")


S = TypeVar("S", bound=BaseModel)


def validated_spec(spec_type: type[S], options: Mapping[str, Any], suite: str) -> S:
    """A suite's pydantic options from the `suite:` mapping: an unknown key gets a did-you-mean line, a bad value
    one line naming `suite.<key>`; the one reading of the suites whose options are a pydantic model."""
    for key in options:
        if key not in spec_type.model_fields:
            hint = did_you_mean(key, sorted(spec_type.model_fields), prefix="suite.")
            raise TatrError(f"unknown {suite} suite option 'suite.{key}'{hint}")
    try:
        return spec_type.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise TatrError(f"suite.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
