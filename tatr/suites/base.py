"""The interface every research benchmark implements, so sweeps and reports never special-case one.

A suite hands out *files* (θ_0, the θ_t, gradient statistics) because the merge core streams from
files tensor by tensor; and it evaluates a merged state dict with its own frozen per-task heads.

Classification rule shared by all suites (CLIP zero-shot heads and the testbed alike):
    logits = scale · normalize(encoder(x)) @ head.T, with `head` rows L2-normalised class embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.data import DataLoader

from tatr.core.registry import Registry

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Checkpoints:
    """θ_0 and the fine-tuned θ_t on disk (safetensors), in the suite's task order."""

    pretrained: Path
    finetuned: Mapping[str, Path]


@dataclass(frozen=True)
class ExemplarGradients:
    """Per-task gradient statistics at θ_0, as safetensors files keyed like the merged parameters.

    `abs_mean[t]` holds mean_n |∇ℓ_t(x_n)| (the TATR sensitivity s_t); `signed_mean[t]` holds
    mean_n ∇ℓ_t(x_n), which only the component ablation needs.
    """

    abs_mean: Mapping[str, Path]
    signed_mean: Mapping[str, Path]


@runtime_checkable
class Suite(Protocol):
    name: str
    tasks: tuple[str, ...]

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
        """Deterministic loader over (image, label) of `task` for split in SPLITS."""
        ...

    def exemplar_loader(self, task: str, n: int, seed: int) -> DataLoader:
        """`n` training exemplars of `task`, drawn with `seed`, for the gradient statistics."""
        ...

    def exemplar_gradients(self, n: int, seed: int) -> ExemplarGradients:
        """Gradient statistics at θ_0 for every task (cached by content hash)."""
        ...

    def evaluate(
        self,
        state_dict: Mapping[str, Tensor],
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, float]:
        """Top-1 accuracy in percent per task; `on_task` is called as each task finishes (pruning)."""
        ...

    def individual_accuracy(self, split: str) -> dict[str, float]:
        """Accuracy of each task's own fine-tuned model on its task (cached): the normaliser."""
        ...


SuiteFactory = Callable[[dict[str, Any], Path | None], Suite]
SUITES: Registry[SuiteFactory] = Registry("benchmark")
