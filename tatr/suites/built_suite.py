"""What every suite that builds itself into one cache folder shares: the folder's layout and its reads.

Why a base class: the testbed and the text suite build the same folder (θ_0, one θ_t per task, the
frozen heads, `meta.json` with classes and build-time accuracies, `build_log.json`), and a new
self-building suite should get the reads for free and only write `folder`, `encoder`, the loaders
and `evaluate`. The class keeps only lazily loaded state (the heads, the meta).

    <folder>/pretrained.safetensors        θ_0
    <folder>/finetuned/<task>.safetensors  θ_t
    <folder>/heads.safetensors             task → [classes, dim], rows L2-normalised
    <folder>/meta.json                     {"classes": {task: [...]}, "accuracy": {...}, ...}
    <folder>/build_log.json                build timings (seconds)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from tatr.core.errors import TatrError
from tatr.suites import evaluation as ev
from tatr.suites.base import Checkpoints


class BuiltSuite:
    """The shared reads of a built folder; a subclass sets `name`, `tasks`, `spec` (with `logit_scale`)
    and provides `folder`, the verified build folder (built on first use)."""

    name: str
    tasks: tuple[str, ...]
    spec: Any
    _heads: dict[str, Tensor] | None = None
    _meta: dict[str, Any] | None = None

    @property
    def folder(self) -> Path:
        raise NotImplementedError

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = json.loads((self.folder / "meta.json").read_text())
        return self._meta

    def build_log(self) -> dict[str, float]:
        """Timings of the build that produced the cached folder (seconds)."""
        return json.loads((self.folder / "build_log.json").read_text())

    def checkpoints(self) -> Checkpoints:
        folder = self.folder
        return Checkpoints(
            folder / "pretrained.safetensors", {t: folder / "finetuned" / f"{t}.safetensors" for t in self.tasks}
        )

    def head(self, task: str) -> Tensor:
        if self._heads is None:
            self._heads = load_file(str(self.folder / "heads.safetensors"))
        return self._heads[self._check_task(task)]

    def logit_scale(self) -> float:
        return float(self.spec.logit_scale)

    def classes(self, task: str) -> tuple[str, ...]:
        return tuple(self.meta["classes"][self._check_task(task)])

    def individual_accuracy(self, split: str) -> dict[str, float]:
        return self._recorded("individual", split)

    def pretrained_accuracy(self, split: str) -> dict[str, float]:
        return self._recorded("pretrained", split)

    def _recorded(self, which: str, split: str) -> dict[str, float]:
        """Accuracies measured at build time (validation/test); other splits are measured now."""
        return ev.recorded_accuracy(self, self.meta["accuracy"], which, split)

    def _check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise TatrError(f"unknown {self.name} task '{task}' (known: {', '.join(self.tasks)})")
        return task
