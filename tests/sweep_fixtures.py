"""A tiny benchmark suite for the sweep tests, registered as `sweep-toy`, plus helpers.

Why a toy and not only the testbed: the sweep's contracts (trial counts, resume after kill -9,
storage back ends, store rows, W&B runs) do not depend on the model, and the toy makes a trial
cost milliseconds, so the tests can run many of them on 2 shared cores. The end-to-end test on
the real testbed lives beside it and uses the testbed fixture.

The toy is a real `Suite`: a 2-layer MLP encoder (θ_0 random), one teacher θ_t = θ_0 + Δ_t per
task that labels that task's data through a frozen cosine head, so each θ_t is 100% accurate on
its own task, θ_0 is not, and a merge's accuracy depends on λ and on the trust-region mask.

Subprocesses (the CLI, sweep workers) see the suite through `TATR_PLUGINS=tests.sweep_fixtures`.
Option `delay` sleeps that many seconds per evaluated task, to make a trial long enough to be
killed in the middle.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tatr.core.cache import cached_dir, content_hash, default_cache_root
from tatr.core.checkpoints import save_state_dict
from tatr.store.predictions import TaskPredictions
from tatr.suites import evaluation as ev
from tatr.suites.base import SUITES, Checkpoints, ExemplarGradients

REPO = Path(__file__).resolve().parents[1]
NAME = "sweep-toy"
DIM, HIDDEN, CLASSES = 8, 16, 4
SPLIT_SEEDS = {"train": 11, "validation": 22, "test": 33}


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))


class ToySweepSuite:
    """See the module docstring. Options: tasks (int), seed, n (samples per split), delay (s)."""

    name = NAME

    def __init__(self, options: dict[str, Any], cache_dir: Path | None) -> None:
        self.num_tasks = int(options.get("tasks", 3))
        self.seed = int(options.get("seed", 0))
        self.n = int(options.get("n", 64))
        self.delay = float(options.get("delay", 0.0))
        self.tasks = tuple(f"task{i}" for i in range(self.num_tasks))
        self.cache = Path(cache_dir) if cache_dir is not None else default_cache_root()
        g = torch.Generator().manual_seed(self.seed)
        self._theta0 = {k: v.detach().clone() for k, v in _seeded_encoder(g).state_dict().items()}
        self._delta = [
            {k: 0.6 * torch.randn(v.shape, generator=g) for k, v in self._theta0.items()} for _ in self.tasks
        ]
        self._heads = {t: F.normalize(torch.randn(CLASSES, DIM, generator=g), dim=-1) for t in self.tasks}
        self._ckpt: Checkpoints | None = None

    # --- files ---------------------------------------------------------------------------------
    def checkpoints(self) -> Checkpoints:
        if self._ckpt is None:
            key = content_hash("sweep-toy", self.num_tasks, self.seed)

            def build(folder: Path) -> None:
                save_state_dict(self._theta0, folder / "pretrained.safetensors")
                for t, delta in zip(self.tasks, self._delta, strict=True):
                    theta = {k: v + delta[k] for k, v in self._theta0.items()}
                    save_state_dict(theta, folder / f"{t}.safetensors")

            folder = cached_dir(self.cache / "sweep-toy", key, build)
            self._ckpt = Checkpoints(
                folder / "pretrained.safetensors", {t: folder / f"{t}.safetensors" for t in self.tasks}
            )
        return self._ckpt

    def exemplar_gradients(self, n: int, seed: int) -> ExemplarGradients:
        return ev.exemplar_gradients(self, n, seed, cache_root=self.cache)

    # --- model and data ------------------------------------------------------------------------
    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        model = _encoder()
        model.load_state_dict(dict(state_dict) if state_dict is not None else self._theta0)
        return model.eval()

    def head(self, task: str) -> Tensor:
        return self._heads[task]

    def logit_scale(self) -> float:
        return 10.0

    def _data(self, task: str, split: str, n: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
        i = self.tasks.index(task)
        g = torch.Generator().manual_seed(1000 * SPLIT_SEEDS[split] + 10 * i + seed)
        x = torch.randn(n or self.n, DIM, generator=g)
        teacher = self.encoder({k: v + self._delta[i][k] for k, v in self._theta0.items()})
        with torch.no_grad():
            y = (F.normalize(teacher(x), dim=-1) @ self._heads[task].T).argmax(-1)
        return x, y

    def loader(self, task: str, split: str, batch_size: int = 256) -> DataLoader:
        ev.check_split(split)
        return DataLoader(TensorDataset(*self._data(task, split)), batch_size=batch_size)

    def exemplar_loader(self, task: str, n: int, seed: int) -> DataLoader:
        return DataLoader(TensorDataset(*self._data(task, "train", n, seed)), batch_size=8)

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(
        self,
        state_dict: Mapping[str, Tensor],
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, float]:
        return {t: p.accuracy for t, p in self.evaluate_predictions(state_dict, split, tasks, on_task).items()}

    def evaluate_predictions(
        self,
        state_dict: Mapping[str, Tensor],
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, TaskPredictions]:
        def slow(task: str, acc: float) -> None:
            if self.delay:
                time.sleep(self.delay)
            if on_task is not None:
                on_task(task, acc)

        return ev.predictions(self, state_dict, split, tasks, slow)

    def individual_accuracy(self, split: str) -> dict[str, float]:
        out = {}
        for i, task in enumerate(self.tasks):
            theta = {k: v + self._delta[i][k] for k, v in self._theta0.items()}
            out[task] = ev.accuracy(self, theta, split, [task])[task]
        return out


def _seeded_encoder(g: torch.Generator) -> nn.Module:
    model = _encoder()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


if NAME not in SUITES:
    SUITES.add(NAME, ToySweepSuite)


# --- helpers for the tests -----------------------------------------------------------------------
def write_experiment(folder: Path, name: str = "toy", **suite: Any) -> Path:
    """An experiment YAML for the toy suite (JSON is valid YAML)."""
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "benchmark": NAME, "suite": suite, "seed": 0}))
    return path


def write_space(folder: Path, name: str = "space", **body: Any) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(body))
    return path


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for `python -m tatr` subprocesses: toy suite, private caches, offline W&B."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        TATR_PLUGINS="tests.sweep_fixtures",
        TATR_CACHE=str(tmp / "cache"),
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp / "wandb-env"),
        WANDB_SILENT="true",
        TATR_HEARTBEAT="1",
        OMP_NUM_THREADS="1",
    )
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def tatr_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "tatr", *map(str, args)]
