"""What every suite that builds itself into one cache folder shares: the folder's layout, its reads, and the
defaults of the build and of the `Suite` methods that do not depend on the suite.

Why a base class: the testbed and the text suite build the same folder (θ_0, one θ_t per task, the
frozen heads, the data, `meta.json` with classes and build-time accuracies, `build_log.json`), and a
new self-building suite should get the rest for free and only write `folder` (with `built_folder`),
`encoder`, the loaders (`loader`, `exemplar_loader`) and `evaluate`. The class keeps only lazily
loaded state (the folder's path, the heads, the meta, the data).

    <folder>/pretrained.safetensors        θ_0
    <folder>/finetuned/<task>.safetensors  θ_t
    <folder>/heads.safetensors             task → [classes, dim], rows L2-normalised
    <folder>/data_<task>.safetensors       x_<split>, y_<split> (stored inputs and labels) per split
    <folder>/meta.json                     {"classes": {task: [...]}, "accuracy": {...}, ...}
    <folder>/build_log.json                build timings (seconds)

The defaults:
* `built_folder`: the verified cache folder `<cache_root>/<name>/<key>`, written on first use on
  `BUILD_THREADS` torch threads (`pinned_build`: the bytes of a matrix product depend on the count).
* `finetune` (a function, called by the builds): the one fine-tune loop, every weight against the frozen
  head with the one cosine rule (`tatr.core.classify`), AdamW with warmup + cosine (`warmup_cosine`).
* `exemplar_gradients`: `tatr.suites.evaluation.exemplar_gradients` with the suite's `gradient_chunk`.
* `task_statistics` (Fisher merging's and RegMean's, at each θ_t: `tatr.suites.task_statistics`) over
  `statistics_loader`, the exemplar draw of a seed in batches of any size.
* `unlabeled_loader`: endless seeded batches of a split's stored inputs, through `prepare`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from tatr.core.cache import cached_dir, default_cache_root
from tatr.core.classify import cosine_logits
from tatr.core.errors import TatrError
from tatr.store.predictions import TaskPredictions
from tatr.suites import evaluation as ev
from tatr.suites.base import (
    BUILD_THREADS,
    Checkpoints,
    ExemplarGradients,
    input_seed,
    seeded_batches,
    shuffled_batches,
    torch_threads,
)
from tatr.suites.task_statistics import task_statistics

P = ParamSpec("P")
R = TypeVar("R")


# --- the build ----------------------------------------------------------------------------------
def pinned_build(build: Callable[P, R]) -> Callable[P, R]:
    """`build` run on `BUILD_THREADS` intra-op torch threads whatever the caller's setting (restored after):
    with another count, small matrix products and layer norm's weight gradient round differently, so the
    built bytes would change with the machine's load while the cache key stays the same."""

    @functools.wraps(build)
    def pinned(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch_threads(BUILD_THREADS):
            return build(*args, **kwargs)

    return pinned


def warmup_cosine(step: int, total: int, warmup: int, dtype: torch.dtype = torch.float64) -> float:
    """The learning-rate factor at `step`: linear warmup over `warmup` steps, then cosine decay to zero.

    `dtype` is the precision of the cosine, and each is computed exactly as the build that uses it
    always did, since the factor rounds into every weight a build writes: float32 (the testbed) takes
    the cosine of the float32-rounded angle progress·π; float64 (the text suite) is `math.cos` of
    π·(step − warmup)/(total − warmup).
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    if dtype == torch.float32:
        angle = (step - warmup) / span * torch.pi
        return 0.5 * (1 + torch.cos(torch.tensor(angle, dtype=torch.float32)).item())
    if dtype == torch.float64:
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))
    raise ValueError(f"the schedule is computed in float32 or float64, not {dtype}")


def finetune(
    encoder: nn.Module,
    theta0: Mapping[str, Tensor],
    head: Tensor,
    x: Tensor,
    y: Tensor,
    spec: Any,
    seed: int,
    prepare: Callable[[Tensor], Tensor] | None = None,
    schedule_dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """Fine-tune every weight of `encoder`, loaded with θ_0, against the frozen `head`; returns θ_t.

    `spec` gives `finetune_steps`, `finetune_batch`, `finetune_lr`, `weight_decay` and `logit_scale`.
    The loss is cross-entropy of the cosine rule's logits times `logit_scale`; AdamW with a warmup
    of a tenth of the steps, then cosine decay (`warmup_cosine` in `schedule_dtype`). The batches are a
    seeded shuffle (`shuffled_batches`), each `prepare`d (`x[idx]` as is when None); dropout, where
    the encoder has any, draws from a generator seeded with `seed`, and the caller's random state is
    left as it was. The encoder is left in eval mode, holding θ_t.
    """
    encoder.load_state_dict(dict(theta0))
    opt = torch.optim.AdamW(encoder.parameters(), lr=spec.finetune_lr, weight_decay=spec.weight_decay)
    stream = shuffled_batches(len(y), spec.finetune_batch, torch.Generator().manual_seed(seed))
    steps = spec.finetune_steps
    warmup = max(1, steps // 10)
    encoder.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # dropout
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = spec.finetune_lr * warmup_cosine(step, steps, warmup, schedule_dtype)
            idx = next(stream)
            inputs = x[idx] if prepare is None else prepare(x[idx])
            loss = F.cross_entropy(cosine_logits(encoder(inputs), head, spec.logit_scale), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    encoder.eval()
    return {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}


# --- the suite ----------------------------------------------------------------------------------
class BuiltSuite:
    """The shared reads of a built folder and the default `Suite` methods; a subclass sets `name`, `tasks`,
    `spec` (with `logit_scale`), `cache_root` and `progress`, and provides `folder` (with `built_folder`),
    `encoder`, `loader`, `exemplar_loader` and `evaluate`; `prepare` where its stored inputs are not the
    encoder's inputs, `gradient_chunk` to fix the exemplar gradients' chunk."""

    name: str
    tasks: tuple[str, ...]
    spec: Any
    cache_root: Path | None = None
    progress: bool = False
    # samples per vmap call of the exemplar gradients; None: `auto_chunk`. A fixed value keeps regenerated
    # gradients bit for bit (the float summation order depends on it).
    gradient_chunk: int | None = None
    _folder: Path | None = None
    _heads: dict[str, Tensor] | None = None
    _meta: dict[str, Any] | None = None
    _data: dict[str, dict[str, Tensor]] | None = None

    # --- the folder -----------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        """The verified build folder, built on first use (a subclass returns `self.built_folder(...)`)."""
        raise NotImplementedError

    def built_folder(self, key: str, write: Callable[[Path], None]) -> Path:
        """`<cache_root>/<name>/<key>`, verified on every open; written by `write(tmp)` on `BUILD_THREADS`
        torch threads when missing or corrupted. Kept for the suite's lifetime."""
        if self._folder is None:
            root = Path(self.cache_root) if self.cache_root is not None else default_cache_root()
            self._folder = cached_dir(root / self.name, key, pinned_build(write))
        return self._folder

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = json.loads((self.folder / "meta.json").read_text())
        return self._meta

    def build_log(self) -> dict[str, float]:
        """Timings of the build that produced the cached folder (seconds)."""
        return json.loads((self.folder / "build_log.json").read_text())

    # --- Suite protocol: the reads --------------------------------------------------------------
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

    # --- Suite protocol: the defaults -----------------------------------------------------------
    def evaluate(
        self,
        state_dict: Mapping[str, Tensor],
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, float]:
        """Accuracy per task (%), from `evaluate_predictions`: one evaluation path whatever a suite overrides."""
        return {t: p.accuracy for t, p in self.evaluate_predictions(state_dict, split, tasks, on_task).items()}

    def evaluate_predictions(
        self,
        state_dict: Mapping[str, Tensor],
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, TaskPredictions]:
        """Each task's per-example predictions, in the build's fixed example order (`ev.predictions`)."""
        return ev.predictions(self, state_dict, split, tasks, on_task)

    def prepare(self, x: Tensor) -> Tensor:
        """A batch of stored inputs (rows of `x_<split>`) as the encoder takes them; as stored by default."""
        return x

    def unlabeled_loader(self, task: str, split: str, batch_size: int = 16, seed: int = 0) -> Iterator[Tensor]:
        """Endless seeded batches of `task`'s `prepare`d inputs of `split` (`seeded_batches`), labels left behind."""
        ev.check_split(split)
        x, _ = self._split(task, split)
        return (self.prepare(x[idx]) for idx in seeded_batches(len(x), batch_size, input_seed(seed, task)))

    def exemplar_gradients(
        self, n: int, seed: int, *, selection: str = "random", squared: bool = False
    ) -> ExemplarGradients:
        """Gradient statistics at θ_0 for every task, cached by content (`tatr.suites.evaluation`)."""
        options = {"chunk": self.gradient_chunk, "progress": self.progress, "selection": selection, "squared": squared}
        return ev.exemplar_gradients(self, n, seed, cache_root=self.cache_root, **options)

    def statistics_loader(self, task: str, n: int, seed: int, batch_size: int = 32) -> list[tuple[Tensor, Tensor]]:
        """`n` training examples of `task` drawn with `seed` (the exemplar draw: the same permutation, so
        the first `exemplars.n` are the exemplars of that seed), `prepare`d in batches of `batch_size`."""
        x, y = self._split(task, "train")
        if not 1 <= n <= len(y):
            raise TatrError(f"statistics.n must be between 1 and {len(y)} for {self.name} task '{task}', got {n}")
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return [(self.prepare(x[i]), y[i]) for i in idx.split(batch_size)]

    def task_statistics(
        self, kind: str, n: int, seed: int, *, estimator: str = "fusionbench", batch_size: int = 32
    ) -> dict[str, Path]:
        """Fisher merging's or RegMean's statistics at each θ_t, per task, cached by content
        (`tatr.suites.task_statistics`); the per-sample Fishers with the suite's `gradient_chunk`."""
        options = {"cache_root": self.cache_root, "chunk": self.gradient_chunk, "progress": self.progress}
        return task_statistics(self, kind, n, seed, estimator=estimator, batch_size=batch_size, **options)

    # --- helpers --------------------------------------------------------------------------------
    def _split(self, task: str, split: str) -> tuple[Tensor, Tensor]:
        """The stored (inputs, labels) of `task`'s `split`, from `data_<task>.safetensors` (loaded once)."""
        self._check_task(task)
        ev.check_split(split)
        if self._data is None:
            self._data = {}
        if task not in self._data:
            self._data[task] = load_file(str(self.folder / f"data_{task}.safetensors"))
        return self._data[task][f"x_{split}"], self._data[task][f"y_{split}"]

    def _recorded(self, which: str, split: str) -> dict[str, float]:
        """Accuracies measured at build time (validation/test); other splits are measured now."""
        return ev.recorded_accuracy(self, self.meta["accuracy"], which, split)

    def _check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise TatrError(f"unknown {self.name} task '{task}' (known: {', '.join(self.tasks)})")
        return task
