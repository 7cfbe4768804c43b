"""Test helpers for the CLIP benchmark: random open_clip models and tiny datasets in each layout.

Nothing here downloads anything. Models are randomly initialised open_clip ViT-B-32s (the real
architecture, so key names and shapes are the paper's); datasets are a few 8×8 images written
with PIL into the exact folder layouts `tatr.suites.clip8.data` reads.
"""

from __future__ import annotations

import functools
import struct
import sys
import types
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch import Tensor, nn

MODEL = "ViT-B-32"


@functools.lru_cache(maxsize=1)
def _random_clip(model: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(model, pretrained=None, force_quick_gelu=True).eval()


def random_clip(model: str = MODEL, seed: int = 0) -> nn.Module:
    """A randomly initialised open_clip CLIP (QuickGELU, as the OpenAI weights use), eval mode."""
    import copy

    return copy.deepcopy(_random_clip(model, seed))


def random_clip_state(model: str = MODEL, seed: int = 0, copy: bool = True) -> dict[str, Tensor]:
    """The state of `random_clip(model, seed)`: fresh tensors, or with `copy=False` read-only views
    of the cached model's (no second copy of 600 MB)."""
    state = _random_clip(model, seed).state_dict()
    return {k: v.detach().clone() if copy else v.detach() for k, v in state.items()}


def perturbed_visual(state: dict[str, Tensor], seed: int, scale: float = 0.01) -> dict[str, Tensor]:
    """A "fine-tuned" copy: every visual tensor moved by seeded noise, the text tower untouched."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.startswith("visual.") and value.is_floating_point():
            out[key] = value + scale * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        else:
            out[key] = value  # shared, not copied: callers treat these as read-only
    return out


def random_images(n: int, size: int = 8, seed: int = 0, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]


def write_images(folder: Path, n: int, seed: int, suffix: str = ".jpg", prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(random_images(n, seed=seed)):
        path = folder / f"{prefix}_{i:03d}{suffix}"
        img.save(path)
        paths.append(path)
    return paths


# --- dataset layouts -------------------------------------------------------------------------

EUROSAT_FOLDERS = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)


def write_eurosat(
    root: Path, classes: tuple[str, ...] = EUROSAT_FOLDERS[:3], n_train: int = 4, n_test: int = 2, n_val: int = 1
) -> None:
    """EuroSAT_splits/{train,val,test}/<class>/ as task_vectors prepares it (issue #1)."""
    for c, cls in enumerate(classes):
        write_images(root / "EuroSAT_splits" / "train" / cls, n_train, seed=100 + c)
        write_images(root / "EuroSAT_splits" / "val" / cls, n_val, seed=150 + c, prefix="val")
        write_images(root / "EuroSAT_splits" / "test" / cls, n_test, seed=200 + c)


def write_sun397(root: Path, classes: tuple[str, ...] = ("a_abbey", "a_apartment_building_outdoor")) -> None:
    for c, cls in enumerate(classes):
        write_images(root / "sun397" / "train" / cls, 3, seed=300 + c)
        write_images(root / "sun397" / "val" / cls, 2, seed=400 + c)


def write_dtd_task_vectors(root: Path, classes: tuple[str, ...] = ("banded", "zigzagged")) -> None:
    for c, cls in enumerate(classes):
        write_images(root / "dtd" / "train" / cls, 3, seed=500 + c)
        write_images(root / "dtd" / "test" / cls, 2, seed=600 + c)


def write_dtd_torchvision(root: Path, classes: tuple[str, ...] = ("banded", "zigzagged"), n: int = 6) -> None:
    """torchvision's dtd/dtd/{images,labels}: per class, the first half of the files split between
    train1 (listed in reverse) and val1 (every file i with i % 3 == 1), the second half in test1;
    so train1 + val1 in list order is not ImageFolder order. n=6: train1 = 2, 0; val1 = 1."""
    base = root / "dtd" / "dtd"
    lines: dict[str, list[str]] = {"train1": [], "test1": [], "val1": []}
    for c, cls in enumerate(classes):
        paths = write_images(base / "images" / cls, n, seed=700 + c, prefix=cls)
        names = [f"{cls}/{p.name}" for p in paths]
        half = n // 2
        lines["train1"] += [names[i] for i in reversed(range(half)) if i % 3 != 1]
        lines["val1"] += [names[i] for i in range(half) if i % 3 == 1]
        lines["test1"] += names[half:]
    (base / "labels").mkdir(parents=True)
    for split, rows in lines.items():
        (base / "labels" / f"{split}.txt").write_text("\n".join(rows) + "\n")


RESISC45_CLASSES = ("airplane", "baseball_diamond", "sea_ice")


def write_resisc45(root: Path, classes: tuple[str, ...] = RESISC45_CLASSES, n: int = 6) -> None:
    """resisc45/NWPU-RESISC45/<class>/<class>_NNN.jpg plus the torchgeo split files."""
    base = root / "resisc45"
    train, test = [], []
    for c, cls in enumerate(classes):
        paths = write_images(base / "NWPU-RESISC45" / cls, n, seed=800 + c, prefix=cls)
        train += [p.name for p in paths[: n - 2]]
        test += [p.name for p in paths[n - 2 :]]
    (base / "resisc45-train.txt").write_text("\n".join(train) + "\n")
    (base / "resisc45-val.txt").write_text("")
    (base / "resisc45-test.txt").write_text("\n".join(test) + "\n")


def write_gtsrb(root: Path, labels: tuple[int, ...] = (0, 14), sep: str = ";") -> None:
    """torchvision's GTSRB layout; `sep="; "` writes the test CSV with spaces after each ';'."""
    base = root / "gtsrb"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId".replace(";", sep)]
    for c, label in enumerate(labels):
        write_images(base / "GTSRB" / "Training" / f"{label:05d}", 3, seed=900 + c, suffix=".ppm")
        for i, img in enumerate(random_images(2, seed=950 + c)):
            name = f"{c:02d}{i:03d}.ppm"
            (base / "GTSRB" / "Final_Test" / "Images").mkdir(parents=True, exist_ok=True)
            img.save(base / "GTSRB" / "Final_Test" / "Images" / name)
            rows.append(sep.join([name, "8", "8", "0", "0", "7", "7", str(label)]))
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def _idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0, 0, type 0x08, ndim), big-endian dims, then uint8 data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 20, n_test: int = 6) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_svhn(root: Path, n_train: int = 12, n_test: int = 4) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    (root / "svhn").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10 + 1).reshape(-1, 1)  # SVHN labels digit 0 as 10
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        savemat(str(root / "svhn" / f"{split}_32x32.mat"), {"X": x, "y": labels})


def write_cars(root: Path, classes: tuple[str, ...] = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012")) -> None:
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": np.array(classes, dtype=object)})
    for split, folder, n, annos in (
        ("train", "cars_train", 4, base / "devkit" / "cars_train_annos.mat"),
        ("test", "cars_test", 2, base / "cars_test_annos_withlabels.mat"),
    ):
        paths = write_images(base / folder, n * len(classes), seed=1000 if split == "train" else 1100)
        records = np.zeros(len(paths), dtype=[("fname", object), ("class", object)])
        for i, p in enumerate(paths):
            records[i] = (p.name, i % len(classes) + 1)
        savemat(str(annos), {"annotations": records})


# --- task_vectors-style pickles --------------------------------------------------------------


def throwaway_module(name: str) -> types.ModuleType:
    """A module that exists only in `sys.modules`: delete it and pickles naming it cannot load."""
    parts = name.split(".")
    for i in range(1, len(parts)):  # parents too, so that `import a.b` works while it exists
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    module = types.ModuleType(name)
    sys.modules[name] = module
    return module


def forget_module(name: str) -> None:
    """Remove a throwaway module and its parents from `sys.modules`."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        sys.modules.pop(".".join(parts[:i]), None)


def save_task_vectors_pickle(path: Path, clip: nn.Module, module_name: str = "tv_src.modeling") -> None:
    """`torch.save` a whole `ImageEncoder` the way task_vectors does, then make its class vanish.

    Like the release: the module holds the open_clip model without its text transformer and the
    preprocessing transforms, and names a class (`<module_name>.ImageEncoder`) that is not
    importable when the file is read back. `clip` loses its text transformer (as in task_vectors).
    """
    module = throwaway_module(module_name)

    class ImageEncoder(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.train_preprocess = open_clip.image_transform(224, is_train=False)
            self.val_preprocess = self.train_preprocess
            self.cache_dir = None
            if hasattr(self.model, "transformer"):
                delattr(self.model, "transformer")

        def forward(self, images: Tensor) -> Tensor:
            return self.model.encode_image(images)

    ImageEncoder.__module__ = module_name
    ImageEncoder.__qualname__ = "ImageEncoder"
    module.ImageEncoder = ImageEncoder
    try:
        torch.save(ImageEncoder(clip).cpu(), path)
    finally:
        forget_module(module_name)
