"""The clip8 suite as the generic gradient and statistics code sees it: in the gradient precision, on the
suite's device.

Why views: `tatr.suites.evaluation.exemplar_gradients` and `tatr.suites.task_statistics.task_statistics`
work over the `Suite` protocol and key their caches by the suite's name; clip8 computes both in
`suite.gradient_precision` on its device, so a view gives them an encoder in that precision, heads and
examples already on the device (the vmapped per-sample gradients never cross devices), and a name that
carries the precision (fp32 and bf16 statistics must not share a cache entry).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from tatr.core.errors import TatrError
from tatr.suites.base import Checkpoints


class GradientView:
    """The suite as `tatr.suites.evaluation.exemplar_gradients` sees it, in the gradient precision (θ_0)."""

    def __init__(self, suite: Any, precision: str) -> None:  # a `tatr.suites.clip8.suite.Clip8`
        self.suite = suite
        self.name = f"clip8[{suite.options.model},{precision}]"
        self.tasks = suite.tasks
        self.precision = precision

    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.suite._pretrained_dir / "visual.safetensors", {})

    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        return self.suite.encoder(state_dict, precision=self.precision)

    def head(self, task: str) -> Tensor:
        return self.suite.head(task).to(self.suite.device)

    def logit_scale(self) -> float:
        return self.suite.logit_scale()

    def exemplar_loader(
        self, task: str, n: int, seed: int, selection: str = "random"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.suite.device
        for x, y in self.suite.exemplar_loader(task, n, seed, selection):
            yield x.to(device), y.to(device)


class StatisticsView(GradientView):
    """The suite as `tatr.suites.task_statistics.task_statistics` sees it: the θ_t too, and the exemplar
    draw of a seed in batches of any size (FusionBench's 32)."""

    def checkpoints(self) -> Checkpoints:
        return self.suite.checkpoints()

    def statistics_loader(self, task: str, n: int, seed: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """`n` train images (never validation) drawn by the exemplars' seeded permutation, on the device."""
        train = self.suite.task_data(task).split("train")
        if not 1 <= n <= len(train):
            raise TatrError(f"statistics.n must be between 1 and {len(train)} for clip8 task '{task}', got {n}")
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        device = self.suite.device
        for x, y in self.suite._loader(Subset(train, idx), batch_size):
            yield x.to(device), y.to(device)
