"""The eight paper datasets, read from a local root in the task_vectors layout (or torchvision's).

Nothing is downloaded: a researcher points `data_root` at a folder prepared as in task_vectors'
`datasets.md`. Every loader checks the layout first and fails with one line that names the folder
it looked at and the layouts it accepts, instead of torchvision's generic "Dataset not found".

Layouts, relative to `data_root` (the test split is the official one; see `SPLIT_NOTES`):

    SUN397    sun397/{train,test|val}/<class>/*.jpg            class 'a_abbey' -> 'abbey'
    Cars      stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}, cars_train/, cars_test/,
              stanford_cars/cars_test_annos_withlabels.mat     (torchvision's layout)
    RESISC45  resisc45/NWPU-RESISC45/<class>/*.jpg, resisc45/resisc45-{train,test}.txt
    EuroSAT   EuroSAT_splits/{train,test}/<class>/*.jpg
    SVHN      svhn/{train,test}_32x32.mat                     (torchvision's layout)
    GTSRB     gtsrb/GTSRB/Training/<00000..00042>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm,
              gtsrb/GT-final_test.csv                          (torchvision's layout)
    MNIST     MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (torchvision's layout)
    DTD       dtd/{train,test|val}/<class>/*.jpg   or torchvision's dtd/dtd/{images,labels}

Validation is carved out of the official training split exactly as task_vectors does it
(`split_train_into_train_val`): `random_split` of the training set into (n − v, v) with
v = min(⌊0.1·n⌋, 5000) and a generator seeded with 0. Our "train" split is the n − v part, so
exemplars for the gradients never overlap the validation images that tune q and λ.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, random_split
from torchvision.datasets.folder import IMG_EXTENSIONS

from tatr.cache import content_hash
from tatr.errors import TatrError
from tatr.suites.clip_templates import DIGITS, EUROSAT_CLASSNAMES, GTSRB_CLASSNAMES, NUM_CLASSES

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


@dataclass(frozen=True)
class TaskData:
    """One task's official splits, its class names and a content key of what was read."""

    task: str
    layout: str
    classnames: tuple[str, ...]
    train: Dataset  # the official training split, before validation is carved out of it
    test: Dataset
    identity: str  # hash of the sample list (or data-file stats): keys caches of evaluations

    def split(self, split: str) -> Dataset:
        """'train' (the 90% part), 'validation' (10%, at most 5000) or 'test' (official)."""
        if split == "test":
            return self.test
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


def load_task(task: str, root: str | Path, transform: Transform = None) -> TaskData:
    """Read `task` from `root`; a wrong layout or a missing class folder is a one-line error."""
    if task not in _LOADERS:
        raise TatrError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TatrError(f"data root {root} does not exist or is not a folder")
    data = _LOADERS[task](root, transform)
    expected = NUM_CLASSES[task]
    if len(data.classnames) != expected:
        warnings.warn(
            f"{task}: {len(data.classnames)} classes found under {root}, the published dataset has {expected}",
            stacklevel=2,
        )
    return data


# ---------------------------------------------------------------------------------------------
# folder layouts (ImageFolder semantics: classes sorted, files sorted within a class)


def _listdir_classes(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _folder_samples(folder: Path, classes: Sequence[str], task: str) -> list[tuple[Path, int]]:
    """Samples of `folder/<class>/...` in ImageFolder order, with labels from `classes`."""
    present = set(_listdir_classes(folder))
    missing = [c for c in classes if c not in present]
    if missing:
        raise TatrError(
            f"{task}: class folder '{missing[0]}' is missing from {folder} "
            f"({len(missing)} of {len(classes)} class folders missing; every split needs all classes)"
        )
    extra = sorted(present - set(classes))
    if extra:
        raise TatrError(f"{task}: {folder} has class folder '{extra[0]}' that the training split lacks")
    samples: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = 0
        for dirpath, _, fnames in sorted(os.walk(folder / cls, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((Path(dirpath) / fname, label))
                    found += 1
        if not found:
            raise TatrError(f"{task}: class folder {folder / cls} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return samples


def _image_folders(
    task: str, base: Path, test_names: Sequence[str], layout_hint: str
) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]], str]:
    train_dir = base / "train"
    test_dir = next((base / n for n in test_names if (base / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        looked = ", ".join(str(base / n) for n in ("train", *test_names))
        raise TatrError(f"{task}: expected the layout {layout_hint} (looked for {looked})")
    classes = _listdir_classes(train_dir)
    if not classes:
        raise TatrError(f"{task}: {train_dir} has no class folders (expected {layout_hint})")
    train = _folder_samples(train_dir, classes, task)
    test = _folder_samples(test_dir, classes, task)
    return classes, train, test, f"{base.name}/{{train,{test_dir.name}}}/<class>"


def _identity(task: str, layout: str, root: Path, *lists: Sequence[tuple[Path, int]]) -> str:
    rel = [[(str(p.relative_to(root)), y) for p, y in samples] for samples in lists]
    return content_hash("clip8-data", task, layout, rel)


def _file_stats(*paths: Path) -> list[tuple[str, int, int]]:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def _task_data(
    task: str, layout: str, root: Path, classnames: Sequence[str], train: list, test: list, transform: Transform
) -> TaskData:
    return TaskData(
        task,
        layout,
        tuple(classnames),
        ImageFiles(train, transform),
        ImageFiles(test, transform),
        _identity(task, layout, root, train, test),
    )


def _sun397(root: Path, transform: Transform) -> TaskData:
    base = root / "sun397"
    classes, train, test, layout = _image_folders(
        "SUN397", base, ("test", "val"), "sun397/{train,test or val}/<class>/"
    )

    def pretty(folder: str) -> str:
        # task_vectors' folders are '<first letter>_<path>' (a_abbey, a_apartment_building_outdoor)
        name = folder[2:] if re.match(r"^([a-z])_\1", folder) else folder
        return name.replace("_", " ")

    return _task_data("SUN397", layout, root, [pretty(c) for c in classes], train, test, transform)


def _eurosat(root: Path, transform: Transform) -> TaskData:
    base = root / "EuroSAT_splits"
    if (base / "train").is_dir():
        unknown = [c for c in _listdir_classes(base / "train") if c not in EUROSAT_CLASSNAMES]
        if unknown:
            raise TatrError(
                f"EuroSAT: unknown class folder '{unknown[0]}' in {base / 'train'} "
                f"(expected the EuroSAT folders: {', '.join(EUROSAT_CLASSNAMES)})"
            )
    classes, train, test, layout = _image_folders("EuroSAT", base, ("test",), "EuroSAT_splits/{train,test}/<class>/")
    names = [EUROSAT_CLASSNAMES[c] for c in classes]
    return _task_data("EuroSAT", layout, root, names, train, test, transform)


def _dtd(root: Path, transform: Transform) -> TaskData:
    tv = root / "dtd" / "dtd"
    if (tv / "labels").is_dir() or (tv / "images").is_dir():
        return _dtd_torchvision(root, tv, transform)
    classes, train, test, layout = _image_folders(
        "DTD", root / "dtd", ("test", "val"), "dtd/{train,test or val}/<class>/ or dtd/dtd/{images,labels}/"
    )
    return _task_data("DTD", layout, root, [c.replace("_", " ") for c in classes], train, test, transform)


def _dtd_torchvision(root: Path, tv: Path, transform: Transform, partition: int = 1) -> TaskData:
    """torchvision's DTD: images/<class>/<file>, labels/{train,test}<partition>.txt."""

    def read(split: str) -> list[tuple[str, str]]:
        path = tv / "labels" / f"{split}{partition}.txt"
        if not path.is_file():
            raise TatrError(f"DTD: missing split file {path} (torchvision layout dtd/dtd/{{images,labels}})")
        return [tuple(line.strip().split("/", 1)) for line in path.read_text().splitlines() if line.strip()]

    train_rows, test_rows = read("train"), read("test")
    classes = sorted({c for c, _ in train_rows})
    index = {c: i for i, c in enumerate(classes)}
    for cls in sorted({c for c, _ in train_rows + test_rows}):
        if not (tv / "images" / cls).is_dir():
            raise TatrError(f"DTD: class folder '{cls}' is missing from {tv / 'images'}")
    if any(c not in index for c, _ in test_rows):
        bad = next(c for c, _ in test_rows if c not in index)
        raise TatrError(f"DTD: test class '{bad}' does not occur in the training split")
    train = [(tv / "images" / c / f, index[c]) for c, f in train_rows]
    test = [(tv / "images" / c / f, index[c]) for c, f in test_rows]
    _require_files("DTD", train + test)
    layout = "dtd/dtd/{images,labels} (torchvision)"
    return _task_data("DTD", layout, root, [c.replace("_", " ") for c in classes], train, test, transform)


def _require_files(task: str, samples: Sequence[tuple[Path, int]]) -> None:
    missing = [p for p, _ in samples if not p.is_file()]
    if missing:
        raise TatrError(f"{task}: {len(missing)} listed images do not exist (first: {missing[0]})")


def _resisc45(root: Path, transform: Transform) -> TaskData:
    base = root / "resisc45"
    images = base / "NWPU-RESISC45"
    hint = "resisc45/NWPU-RESISC45/<class>/*.jpg with resisc45/resisc45-{train,test}.txt"
    if not images.is_dir():
        raise TatrError(f"RESISC45: {images} not found (expected {hint})")
    classes = _listdir_classes(images)
    if not classes:
        raise TatrError(f"RESISC45: {images} has no class folders (expected {hint})")
    by_name: dict[str, tuple[Path, int]] = {}
    for label, cls in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(images / cls, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    by_name[fname] = (Path(dirpath) / fname, label)

    def read(split: str) -> list[tuple[Path, int]]:
        path = base / f"resisc45-{split}.txt"
        if not path.is_file():
            raise TatrError(f"RESISC45: missing split file {path} (expected {hint})")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        missing = [n for n in names if n not in by_name]
        if missing:
            cls = missing[0].rsplit("_", 1)[0]
            raise TatrError(
                f"RESISC45: {path.name} lists {len(missing)} images not found under {images} "
                f"(first: '{missing[0]}'; is the class folder '{cls}' missing?)"
            )
        chosen = set(names)
        # ImageFolder order (class, then file), as task_vectors' filtered ImageFolder yields it
        return [by_name[n] for n in by_name if n in chosen]

    train, test = read("train"), read("test")
    names = [c.replace("_", " ") for c in classes]
    return _task_data("RESISC45", "resisc45/NWPU-RESISC45 + split files", root, names, train, test, transform)


def _gtsrb(root: Path, transform: Transform) -> TaskData:
    base = root / "gtsrb"
    train_dir = base / "GTSRB" / "Training"
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    csv_path = base / "GT-final_test.csv"
    hint = "gtsrb/GTSRB/Training/<00000..00042>/, gtsrb/GTSRB/Final_Test/Images/, gtsrb/GT-final_test.csv"
    for path in (train_dir, test_dir, csv_path):
        if not path.exists():
            raise TatrError(f"GTSRB: {path} not found (expected torchvision's layout {hint})")
    train: list[tuple[Path, int]] = []
    for folder in _listdir_classes(train_dir):
        if not re.fullmatch(r"\d{5}", folder) or int(folder) >= len(GTSRB_CLASSNAMES):
            raise TatrError(f"GTSRB: unexpected class folder '{folder}' in {train_dir} (expected 00000..00042)")
        for path in sorted((train_dir / folder).iterdir()):
            if path.suffix.lower() == ".ppm":
                train.append((path, int(folder)))
    if not train:
        raise TatrError(f"GTSRB: no .ppm images under {train_dir} (expected {hint})")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    if rows and not {"Filename", "ClassId"} <= set(rows[0]):
        raise TatrError(f"GTSRB: {csv_path} lacks the Filename;ClassId columns")
    test = [(test_dir / r["Filename"], int(r["ClassId"])) for r in rows]
    have = {y for _, y in train}
    absent = sorted({y for _, y in test} - have)
    if absent:
        raise TatrError(f"GTSRB: class folder '{absent[0]:05d}' is missing from {train_dir}")
    _require_files("GTSRB", test)
    return _task_data("GTSRB", "gtsrb/GTSRB (torchvision)", root, GTSRB_CLASSNAMES, train, test, transform)


def _cars(root: Path, transform: Transform) -> TaskData:
    base = root / "stanford_cars"
    meta, train_annos = base / "devkit" / "cars_meta.mat", base / "devkit" / "cars_train_annos.mat"
    test_annos = base / "cars_test_annos_withlabels.mat"
    hint = (
        "stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}, stanford_cars/cars_train/, "
        "stanford_cars/cars_test/, stanford_cars/cars_test_annos_withlabels.mat"
    )
    for path in (meta, train_annos, test_annos, base / "cars_train", base / "cars_test"):
        if not path.exists():
            raise TatrError(f"Cars: {path} not found (expected torchvision's layout {hint})")
    from scipy.io import loadmat  # scipy comes with scikit-learn; only Cars and SVHN need it

    classes = [str(c) for c in np.atleast_1d(loadmat(str(meta), squeeze_me=True)["class_names"]).tolist()]

    def read(path: Path, folder: Path) -> list[tuple[Path, int]]:
        annos = np.atleast_1d(loadmat(str(path), squeeze_me=True)["annotations"])
        samples = [(folder / str(a["fname"]), int(a["class"]) - 1) for a in annos]
        bad = [y for _, y in samples if not 0 <= y < len(classes)]
        if bad:
            raise TatrError(f"Cars: {path} has class id {bad[0] + 1} outside cars_meta.mat's {len(classes)}")
        return samples

    train, test = read(train_annos, base / "cars_train"), read(test_annos, base / "cars_test")
    _require_files("Cars", train + test)
    return _task_data("Cars", "stanford_cars (torchvision)", root, classes, train, test, transform)


def _svhn(root: Path, transform: Transform) -> TaskData:
    base = root / "svhn"
    files = [base / "train_32x32.mat", base / "test_32x32.mat"]
    for path in files:
        if not path.is_file():
            raise TatrError(f"SVHN: {path} not found (expected torchvision's layout svhn/{{train,test}}_32x32.mat)")
    from scipy.io import loadmat

    def read(path: Path) -> ArrayImages:
        mat = loadmat(str(path))
        if "X" not in mat or "y" not in mat or mat["X"].ndim != 4:
            raise TatrError(f"SVHN: {path} is not an SVHN .mat file (needs X [32,32,3,N] and y [N,1])")
        labels = mat["y"].astype(np.int64).reshape(-1)
        labels[labels == 10] = 0  # SVHN stores the digit 0 as label 10 (as torchvision does)
        return ArrayImages(np.transpose(mat["X"], (3, 0, 1, 2)), labels.tolist(), transform)

    train, test = read(files[0]), read(files[1])
    identity = content_hash("clip8-data", "SVHN", _file_stats(*files))
    return TaskData("SVHN", "svhn/*_32x32.mat (torchvision)", DIGITS, train, test, identity)


def _mnist(root: Path, transform: Transform) -> TaskData:
    raw = root / "MNIST" / "raw"
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    files = [raw / n for n in names]
    for path in files:
        if not path.is_file():
            raise TatrError(
                f"MNIST: {path} not found (expected torchvision's layout MNIST/raw/ with the four "
                "uncompressed idx files)"
            )
    from torchvision.datasets.mnist import read_image_file, read_label_file

    def read(images: Path, labels: Path) -> ArrayImages:
        try:
            x, y = read_image_file(str(images)), read_label_file(str(labels))
        except (AssertionError, ValueError, RuntimeError) as exc:
            raise TatrError(f"MNIST: {images.name}/{labels.name} are not valid idx files ({exc})") from None
        if len(x) != len(y):
            raise TatrError(f"MNIST: {images} has {len(x)} images but {labels} has {len(y)} labels")
        return ArrayImages(x.numpy(), y.tolist(), transform)

    train, test = read(files[0], files[1]), read(files[2], files[3])
    identity = content_hash("clip8-data", "MNIST", _file_stats(*files))
    return TaskData("MNIST", "MNIST/raw (torchvision)", DIGITS, train, test, identity)


_LOADERS: dict[str, Callable[[Path, Transform], TaskData]] = {
    "SUN397": _sun397,
    "Cars": _cars,
    "RESISC45": _resisc45,
    "EuroSAT": _eurosat,
    "SVHN": _svhn,
    "GTSRB": _gtsrb,
    "MNIST": _mnist,
    "DTD": _dtd,
}
