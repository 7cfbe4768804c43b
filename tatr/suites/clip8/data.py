"""The eight paper datasets, read from a local root in the task_vectors layout (or torchvision's).

Nothing is downloaded: a researcher points `data_root` at a folder prepared as described in
task_vectors' issue #1 ("Split definition of DTD, EuroSAT and SUN397",
https://github.com/mlfoundations/task_vectors/issues/1; the repository has no `datasets.md`).
Every loader checks the layout first and fails with one line that names the folder it looked at
and the layouts it accepts, instead of torchvision's generic "Dataset not found".

Layouts, relative to `data_root`, and the splits task_vectors' `src/datasets/*.py` read from them:

    SUN397    sun397/{train,val}/<class>/*.jpg (or test/)      class 'a_abbey' -> 'abbey'
    Cars      stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}, cars_train/, cars_test/,
              stanford_cars/cars_test_annos_withlabels.mat     (torchvision's layout)
              class names from cars_meta.mat with '_' -> ' ' (as task_vectors' `Cars`)
    RESISC45  resisc45/NWPU-RESISC45/<class>/*.jpg, resisc45/resisc45-{train,test}.txt
    EuroSAT   EuroSAT_splits/{train,val,test}/<class>/*.jpg   validation = the val folder
    SVHN      svhn/{train,test}_32x32.mat                     (torchvision's layout)
    GTSRB     gtsrb/GTSRB/Training/<00000..00042>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm,
              gtsrb/GT-final_test.csv (';' separated, read with skipinitialspace, as task_vectors)
    MNIST     MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (torchvision's layout)
    DTD       dtd/{train,val|test}/<class>/*.jpg   or torchvision's dtd/dtd/{images,labels}, where
              train = train1 + val1 (in ImageFolder order) and test = test1

Validation, for every task but EuroSAT, is carved out of the training split exactly as
task_vectors does it (`split_train_into_train_val`): `random_split` of the training set into
(n − v, v) with v = min(⌊0.1·n⌋, 5000) and a generator seeded with 0. Our "train" split is the
n − v part, so exemplars for the gradients never overlap the validation images that tune q and λ.
EuroSAT is the exception because task_vectors registers its own `EuroSATVal` class: validation is
the `EuroSAT_splits/val` folder and train is all of `EuroSAT_splits/train`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from tatr.core.cache import content_hash
from tatr.core.errors import TatrError
from tatr.core.registry import did_you_mean
from tatr.io.text_files import MIB, csv_records, read_text
from tatr.suites.clip8.splits import (
    MAX_VAL,
    TASKS,
    VAL_FRACTION,
    VAL_SEED,
    ArrayImages,
    ImageFiles,
    TaskData,
    Transform,
    file_stats,
    identity_of,
    require_files,
    task_data,
    train_val_indices,
)
from tatr.suites.clip8.templates import DIGITS, EUROSAT_CLASSNAMES, GTSRB_CLASSNAMES, NUM_CLASSES

__all__ = [
    "MAX_VAL",
    "TASKS",
    "VAL_FRACTION",
    "VAL_SEED",
    "ArrayImages",
    "ImageFiles",
    "TaskData",
    "load_task",
    "train_val_indices",
    "unknown_task",
]


def unknown_task(task: str) -> str:
    """The one message for a task name that is not one of the eight, with a case-blind suggestion."""
    return f"unknown task '{task}'{did_you_mean(task, TASKS, fold_case=True)} (known: {', '.join(TASKS)})"


def load_task(task: str, root: str | Path, transform: Transform = None) -> TaskData:
    """Read `task` from `root`; a wrong layout or a missing class folder is a one-line error."""
    if task not in _LOADERS:
        raise TatrError(unknown_task(task))
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
    """`base/train/<class>` and the first of `base/<test_names>` that exists, in ImageFolder order.

    task_vectors tests SUN397 and DTD on their `val` folder; `test` is accepted as its alias, but a
    root holding both is ambiguous and refused rather than silently read the other way round.
    """
    train_dir = base / "train"
    present = [base / n for n in test_names if (base / n).is_dir()]
    if not train_dir.is_dir() or not present:
        looked = ", ".join(str(base / n) for n in ("train", *test_names))
        raise TatrError(f"{task}: expected the layout {layout_hint} (looked for {looked})")
    if len(present) > 1:
        raise TatrError(
            f"{task}: both {present[0]} and {present[1]} exist; task_vectors tests on "
            f"{base / test_names[-1]}, so keep one of them as the test split"
        )
    test_dir = present[0]
    classes = _listdir_classes(train_dir)
    if not classes:
        raise TatrError(f"{task}: {train_dir} has no class folders (expected {layout_hint})")
    train = _folder_samples(train_dir, classes, task)
    test = _folder_samples(test_dir, classes, task)
    return classes, train, test, f"{base.name}/{{train,{test_dir.name}}}/<class>"


def _sun397(root: Path, transform: Transform) -> TaskData:
    base = root / "sun397"
    classes, train, test, layout = _image_folders(
        "SUN397", base, ("test", "val"), "sun397/{train,test or val}/<class>/"
    )

    def pretty(folder: str) -> str:
        # task_vectors' folders are '<first letter>_<path>' (a_abbey, a_apartment_building_outdoor)
        name = folder[2:] if re.match(r"^([a-z])_\1", folder) else folder
        return name.replace("_", " ")

    return task_data("SUN397", layout, root, [pretty(c) for c in classes], train, test, transform)


def _eurosat(root: Path, transform: Transform) -> TaskData:
    base = root / "EuroSAT_splits"
    if (base / "train").is_dir():
        unknown = [c for c in _listdir_classes(base / "train") if c not in EUROSAT_CLASSNAMES]
        if unknown:
            raise TatrError(
                f"EuroSAT: unknown class folder '{unknown[0]}' in {base / 'train'} "
                f"(expected the EuroSAT folders: {', '.join(EUROSAT_CLASSNAMES)})"
            )
    hint = "EuroSAT_splits/{train,val,test}/<class>/"
    classes, train, test, layout = _image_folders("EuroSAT", base, ("test",), hint)
    if not (base / "val").is_dir():
        raise TatrError(
            f"EuroSAT: validation folder {base / 'val'} not found (expected {hint}; task_vectors' "
            "EuroSATVal reads it instead of carving validation out of train)"
        )
    val = _folder_samples(base / "val", classes, "EuroSAT")
    names = [EUROSAT_CLASSNAMES[c] for c in classes]
    return TaskData(
        "EuroSAT",
        "EuroSAT_splits/{train,val,test}/<class>",
        tuple(names),
        ImageFiles(train, transform),
        ImageFiles(test, transform),
        identity_of("EuroSAT", layout, root, train, val, test),
        validation=ImageFiles(val, transform),
    )


def _dtd(root: Path, transform: Transform) -> TaskData:
    tv = root / "dtd" / "dtd"
    if (tv / "labels").is_dir() or (tv / "images").is_dir():
        return _dtd_torchvision(root, tv, transform)
    classes, train, test, layout = _image_folders(
        "DTD", root / "dtd", ("test", "val"), "dtd/{train,test or val}/<class>/ or dtd/dtd/{images,labels}/"
    )
    return task_data("DTD", layout, root, [c.replace("_", " ") for c in classes], train, test, transform)


def _dtd_torchvision(root: Path, tv: Path, transform: Transform, partition: int = 1) -> TaskData:
    """torchvision's DTD: images/<class>/<file>, labels/{train,val,test}<partition>.txt.

    task_vectors' prepared `dtd/train` folder holds train1 + val1 and its test folder test1, so
    train here is train1 + val1 in ImageFolder order (class, then file name): the order its
    validation carve-out (`random_split` with seed 0) indexes, so both layouts give the same split.
    """

    def read(split: str) -> list[tuple[str, str]]:
        path = tv / "labels" / f"{split}{partition}.txt"
        if not path.is_file():
            raise TatrError(f"DTD: missing split file {path} (torchvision layout dtd/dtd/{{images,labels}})")
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.strip().split("/")
            if line.strip() and (len(parts) != 2 or not all(parts) or ".." in parts):
                raise TatrError(f"DTD: {path} line {n} is not '<class>/<file>': {line.strip()[:80]!r}")
            if line.strip():
                rows.append((parts[0], parts[1]))
        return rows

    train_rows, test_rows = sorted(set(read("train") + read("val"))), read("test")
    classes = sorted({c for c, _ in train_rows})
    index = {c: i for i, c in enumerate(classes)}
    for cls in sorted({c for c, _ in train_rows + test_rows}):
        if not (tv / "images" / cls).is_dir():
            raise TatrError(f"DTD: class folder '{cls}' is missing from {tv / 'images'}")
    if any(c not in index for c, _ in test_rows):
        bad = next(c for c, _ in test_rows if c not in index)
        raise TatrError(f"DTD: test class '{bad}' does not occur in the training split")

    def image_folder_order(rows: list[tuple[str, str]]) -> list[tuple[Path, int]]:
        return sorted(((tv / "images" / c / f, index[c]) for c, f in rows), key=lambda s: (s[1], s[0]))

    train, test = image_folder_order(train_rows), image_folder_order(test_rows)
    require_files("DTD", train + test)
    layout = "dtd/dtd/{images,labels} (torchvision)"
    return task_data("DTD", layout, root, [c.replace("_", " ") for c in classes], train, test, transform)


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
    return task_data("RESISC45", "resisc45/NWPU-RESISC45 + split files", root, names, train, test, transform)


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
    text = read_text(csv_path, "GTSRB label file", 64 * MIB)  # task_vectors reads it with skipinitialspace=True
    fields, rows = csv_records(text, csv_path, delimiter=";", skipinitialspace=True)
    if not {"Filename", "ClassId"} <= set(fields):
        raise TatrError(f"GTSRB: {csv_path} lacks the Filename;ClassId columns")
    test = []
    for line, r in enumerate(rows, start=2):
        name, label = r["Filename"], r["ClassId"]
        if not (isinstance(name, str) and isinstance(label, str) and label.strip().isdigit()):
            raise TatrError(f"{csv_path}:{line}: expected a file name and a class number, got {name!r};{label!r}")
        test.append((test_dir / name, int(label)))
    have = {y for _, y in train}
    absent = sorted({y for _, y in test} - have)
    if absent:
        raise TatrError(f"GTSRB: class folder '{absent[0]:05d}' is missing from {train_dir}")
    require_files("GTSRB", test)
    return task_data("GTSRB", "gtsrb/GTSRB (torchvision)", root, GTSRB_CLASSNAMES, train, test, transform)


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

    raw_names = np.atleast_1d(loadmat(str(meta), squeeze_me=True)["class_names"]).tolist()
    classes = [str(c).replace("_", " ") for c in raw_names]  # as task_vectors' `Cars.classnames`

    def read(path: Path, folder: Path) -> list[tuple[Path, int]]:
        annos = np.atleast_1d(loadmat(str(path), squeeze_me=True)["annotations"])
        samples = [(folder / str(a["fname"]), int(a["class"]) - 1) for a in annos]
        bad = [y for _, y in samples if not 0 <= y < len(classes)]
        if bad:
            raise TatrError(f"Cars: {path} has class id {bad[0] + 1} outside cars_meta.mat's {len(classes)}")
        return samples

    train, test = read(train_annos, base / "cars_train"), read(test_annos, base / "cars_test")
    require_files("Cars", train + test)
    return task_data("Cars", "stanford_cars (torchvision)", root, classes, train, test, transform)


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
    identity = content_hash("clip8-data", "SVHN", file_stats(*files))
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
    identity = content_hash("clip8-data", "MNIST", file_stats(*files))
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
