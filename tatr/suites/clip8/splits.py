"""The datasets and splits behind `tatr.suites.clip8.data`: what a loaded task is, not where it came from.

`TaskData.split` is the one place that decides which images are train, validation and test, as
task_vectors' `<Task>` and `<Task>Val` classes do (see `tatr.suites.clip8.data`'s docstring for the layouts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, random_split

from tatr.core.cache import content_hash
from tatr.core.errors import TatrError

TASKS: tuple[str, ...] = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
VAL_FRACTION = 0.1
MAX_VAL = 5000
VAL_SEED = 0

Transform = Callable[[Image.Image], Any] | None


class ImageFiles(Dataset):
    """(path, label) pairs read as RGB PIL images, like torchvision's `ImageFolder` loader."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Transform = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        return (self.transform(image) if self.transform else image), label


class ArrayImages(Dataset):
    """Images held in one uint8 array ([N,H,W] grey or [N,H,W,3] RGB): MNIST and SVHN."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Transform = None) -> None:
        self.images = images
        self.labels = [int(y) for y in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(np.ascontiguousarray(self.images[index]))
        return (self.transform(image) if self.transform else image), self.labels[index]


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The labels of a split, in its order, without reading an image (balanced exemplars need them)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.int64)]
    if isinstance(dataset, ImageFiles):
        return torch.tensor([label for _, label in dataset.samples], dtype=torch.int64)
    if isinstance(dataset, ArrayImages):
        return torch.tensor(dataset.labels, dtype=torch.int64)
    raise TatrError(f"cannot read the labels of a {type(dataset).__name__} without loading its images")


@dataclass(frozen=True)
class TaskData:
    """One task's official splits, its class names and a content key of what was read."""

    task: str
    layout: str
    classnames: tuple[str, ...]
    train: Dataset  # the official training split, before validation is carved out of it
    test: Dataset
    identity: str  # hash of the sample list (or data-file stats): keys caches of evaluations
    validation: Dataset | None = None  # a validation split of its own (EuroSAT's val folder)

    def split(self, split: str) -> Dataset:
        """'train', 'validation' or 'test' (official), as task_vectors' `<Task>` and `<Task>Val`.

        With a validation split of its own, 'train' is the whole training split; otherwise
        validation is 10% of it (at most 5000) and 'train' is the rest.
        """
        if split == "test":
            return self.test
        if self.validation is not None and split in ("train", "validation"):
            return self.train if split == "train" else self.validation
        train_idx, val_idx = train_val_indices(len(self.train))
        if split == "train":
            return Subset(self.train, train_idx)
        if split == "validation":
            return Subset(self.train, val_idx)
        raise TatrError(f"unknown split '{split}' (known: train, validation, test)")


def train_val_indices(n: int, seed: int = VAL_SEED) -> tuple[list[int], list[int]]:
    """task_vectors' split: `random_split(range(n), [n - v, v], Generator().manual_seed(seed))`."""
    val = min(int(n * VAL_FRACTION), MAX_VAL)
    if n < 2 or val < 1:
        raise TatrError(f"a training split of {n} images is too small to carve a validation split from")
    train_part, val_part = random_split(range(n), [n - val, val], generator=torch.Generator().manual_seed(seed))
    return list(train_part.indices), list(val_part.indices)


def identity_of(task: str, layout: str, root: Path, *lists: Sequence[tuple[Path, int]]) -> str:
    rel = [[(str(p.relative_to(root)), y) for p, y in samples] for samples in lists]
    return content_hash("clip8-data", task, layout, rel)


def file_stats(*paths: Path) -> list[tuple[str, int, int]]:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def task_data(
    task: str, layout: str, root: Path, classnames: Sequence[str], train: list, test: list, transform: Transform
) -> TaskData:
    return TaskData(
        task,
        layout,
        tuple(classnames),
        ImageFiles(train, transform),
        ImageFiles(test, transform),
        identity_of(task, layout, root, train, test),
    )


def require_files(task: str, samples: Sequence[tuple[Path, int]]) -> None:
    missing = [p for p, _ in samples if not p.is_file()]
    if missing:
        raise TatrError(f"{task}: {len(missing)} listed images do not exist (first: {missing[0]})")
