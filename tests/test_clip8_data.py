"""Every dataset layout of the CLIP benchmark, on tiny generated folders; no model involved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from tatr.core.errors import TatrError
from tatr.suites.clip8.data import TASKS, load_task, train_val_indices
from tatr.suites.clip8.templates import GTSRB_CLASSNAMES, NUM_CLASSES, TEMPLATES
from tests.clip_fixtures import (
    EUROSAT_FOLDERS,
    write_cars,
    write_dtd_task_vectors,
    write_dtd_torchvision,
    write_eurosat,
    write_gtsrb,
    write_mnist,
    write_resisc45,
    write_sun397,
    write_svhn,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*classes found under:UserWarning")


def _labels(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def test_validation_split_is_task_vectors_split():
    """task_vectors asserts `trainset.indices[0] == 36044` for MNIST's 60000 training images."""
    train, val = train_val_indices(60000)
    assert train[0] == 36044
    assert (len(train), len(val)) == (55000, 5000)  # 10% would be 6000: capped at 5000
    assert sorted(train + val) == list(range(60000))
    train, val = train_val_indices(1000)
    assert len(val) == 100 and train_val_indices(1000) == (train, val)  # seeded: deterministic


def test_templates_and_constants_cover_the_eight_tasks():
    assert set(TEMPLATES) == set(TASKS) == set(NUM_CLASSES)
    assert all(t.count("{}") == 1 for ts in TEMPLATES.values() for t in ts)
    assert len(GTSRB_CLASSNAMES) == NUM_CLASSES["GTSRB"] == 43
    assert len(EUROSAT_FOLDERS) == NUM_CLASSES["EuroSAT"]


def test_eurosat_validation_is_the_val_folder_and_train_is_all_of_train(tmp_path: Path):
    """task_vectors' `EuroSATVal` reads EuroSAT_splits/val; `EuroSAT` trains on all of train/."""
    write_eurosat(tmp_path, classes=EUROSAT_FOLDERS, n_train=4, n_test=2, n_val=1)
    data = load_task("EuroSAT", tmp_path)
    assert data.classnames[:3] == ("annual crop land", "forest", "brushland or shrubland")
    assert data.classnames[-1] == "lake or sea"
    assert len(data.train) == 40 and len(data.test) == 20
    assert _labels(data.test) == [c for c in range(10) for _ in range(2)]
    image, label = data.train[0]
    assert image.mode == "RGB" and image.size == (8, 8) and label == 0
    train, val = data.split("train"), data.split("validation")
    base = tmp_path / "EuroSAT_splits"
    # ImageFolder order over the val folder, labels from the train folder's classes
    assert [(p.relative_to(base).as_posix(), y) for p, y in val.samples] == [
        (f"val/{cls}/val_000.jpg", c) for c, cls in enumerate(EUROSAT_FOLDERS)
    ]
    # train is every file of train/, nothing carved out
    expected = [(f"train/{cls}/img_{i:03d}.jpg", c) for c, cls in enumerate(EUROSAT_FOLDERS) for i in range(4)]
    assert [(p.relative_to(base).as_posix(), y) for p, y in train.samples] == expected
    assert train is data.train and data.split("test") is data.test


def test_eurosat_without_its_val_folder_is_a_layout_error(tmp_path: Path):
    write_eurosat(tmp_path)
    shutil.rmtree(tmp_path / "EuroSAT_splits" / "val")
    with pytest.raises(TatrError, match=r"^EuroSAT: validation folder .*EuroSAT_splits/val not found .*EuroSATVal"):
        load_task("EuroSAT", tmp_path)
    write_eurosat(tmp_path)
    shutil.rmtree(tmp_path / "EuroSAT_splits" / "val" / "Forest")
    with pytest.raises(TatrError, match=r"EuroSAT: class folder 'Forest' is missing from .*EuroSAT_splits/val"):
        load_task("EuroSAT", tmp_path)


def test_sun397_names_drop_the_letter_prefix_and_val_is_the_test_split(tmp_path: Path):
    write_sun397(tmp_path)
    data = load_task("SUN397", tmp_path)
    assert data.classnames == ("abbey", "apartment building outdoor")
    assert "val" in data.layout and len(data.test) == 4


def test_dtd_in_both_layouts(tmp_path: Path):
    write_dtd_task_vectors(tmp_path / "a")
    write_dtd_torchvision(tmp_path / "b")
    a, b = load_task("DTD", tmp_path / "a"), load_task("DTD", tmp_path / "b")
    assert a.classnames == b.classnames == ("banded", "zigzagged")
    assert "torchvision" in b.layout and "torchvision" not in a.layout
    assert (len(b.train), len(b.test)) == (6, 6)
    assert _labels(b.test) == [0, 0, 0, 1, 1, 1]


def test_dtd_torchvision_train_is_train1_plus_val1_and_test_is_test1(tmp_path: Path):
    write_dtd_torchvision(tmp_path)  # per class: train1 = files 2, 0; val1 = file 1; test1 = 3, 4, 5
    data = load_task("DTD", tmp_path)
    # train1 + val1, in ImageFolder order (class, then file name), as task_vectors' dtd/train holds them
    assert [(p.name, y) for p, y in data.train.samples] == [
        (f"{cls}_{i:03d}.jpg", c) for c, cls in enumerate(("banded", "zigzagged")) for i in (0, 1, 2)
    ]
    assert [(p.name, y) for p, y in data.test.samples] == [
        (f"{cls}_{i:03d}.jpg", c) for c, cls in enumerate(("banded", "zigzagged")) for i in (3, 4, 5)
    ]


def test_dtd_torchvision_splits_equal_the_prepared_folders(tmp_path: Path):
    """The same images moved into task_vectors' dtd/{train,val} (issue #1) give the same splits."""
    write_dtd_torchvision(tmp_path / "tv", n=30)
    tv = tmp_path / "tv" / "dtd" / "dtd"
    labels = {s: (tv / "labels" / f"{s}1.txt").read_text().split() for s in ("train", "val", "test")}
    for split, rows in (("train", labels["train"] + labels["val"]), ("val", labels["test"])):
        for row in rows:
            target = tmp_path / "folders" / "dtd" / split / row
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tv / "images" / row, target)
    a, b = load_task("DTD", tmp_path / "tv"), load_task("DTD", tmp_path / "folders")
    for split in ("train", "validation", "test"):
        assert _named(a.split(split)) == _named(b.split(split)), split
    assert len(a.split("validation")) == 3  # ⌊0.1 · 30⌋ carved out with task_vectors' seed


def _named(dataset) -> list[tuple[str, int]]:
    """(file name, label) of each sample, through a `Subset`'s indices when there is one."""
    if isinstance(dataset, Subset):
        return [(dataset.dataset.samples[i][0].name, dataset.dataset.samples[i][1]) for i in dataset.indices]
    return [(p.name, y) for p, y in dataset.samples]


def test_dtd_and_sun397_refuse_both_a_test_and_a_val_folder(tmp_path: Path):
    write_dtd_task_vectors(tmp_path)
    shutil.copytree(tmp_path / "dtd" / "test", tmp_path / "dtd" / "val")
    with pytest.raises(TatrError, match=r"^DTD: both .*dtd/test and .*dtd/val exist; task_vectors tests on"):
        load_task("DTD", tmp_path)
    write_sun397(tmp_path)
    shutil.copytree(tmp_path / "sun397" / "val", tmp_path / "sun397" / "test")
    with pytest.raises(TatrError, match=r"^SUN397: both .*sun397/test and .*sun397/val exist"):
        load_task("SUN397", tmp_path)


def test_dtd_label_lines_must_be_class_slash_file(tmp_path: Path):
    write_dtd_torchvision(tmp_path)
    labels = tmp_path / "dtd" / "dtd" / "labels" / "val1.txt"
    for bad in ("banded_000.jpg", "banded/../../secret.jpg", "banded/sub/x.jpg"):
        labels.write_text(f"{bad}\n")
        with pytest.raises(TatrError, match=r"DTD: .*val1\.txt line 1 is not '<class>/<file>'"):
            load_task("DTD", tmp_path)


def test_resisc45_uses_the_split_files(tmp_path: Path):
    write_resisc45(tmp_path)
    data = load_task("RESISC45", tmp_path)
    assert data.classnames == ("airplane", "baseball diamond", "sea ice")
    assert (len(data.train), len(data.test)) == (12, 6)
    assert all(p.name.endswith(("_004.jpg", "_005.jpg")) for p, _ in data.test.samples)


def test_gtsrb_labels_are_the_folder_numbers(tmp_path: Path):
    write_gtsrb(tmp_path, labels=(0, 14))
    data = load_task("GTSRB", tmp_path)
    assert data.classnames == GTSRB_CLASSNAMES  # 43 names even when few folders are present
    assert sorted(set(_labels(data.train))) == [0, 14] and _labels(data.test) == [0, 0, 14, 14]
    assert data.classnames[14] == "stop"


def test_gtsrb_test_csv_is_read_with_skipinitialspace(tmp_path: Path):
    """task_vectors reads GT-final_test.csv with `skipinitialspace=True`: '; ' separates fields too."""
    write_gtsrb(tmp_path, labels=(3, 14), sep="; ")
    data = load_task("GTSRB", tmp_path)
    test_dir = tmp_path / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    assert data.test.samples == [
        (test_dir / "00000.ppm", 3),
        (test_dir / "00001.ppm", 3),
        (test_dir / "01000.ppm", 14),
        (test_dir / "01001.ppm", 14),
    ]


def test_mnist_and_svhn_arrays(tmp_path: Path):
    write_mnist(tmp_path)
    write_svhn(tmp_path)
    mnist, svhn = load_task("MNIST", tmp_path), load_task("SVHN", tmp_path)
    assert mnist.classnames == svhn.classnames == tuple("0123456789")
    assert (len(mnist.train), len(mnist.test)) == (20, 6)
    image, label = mnist.train[3]
    assert image.size == (28, 28) and label == 3
    assert _labels(svhn.train)[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # SVHN's label 10 is the digit 0
    assert svhn.train[0][0].size == (32, 32)


def test_cars_from_the_devkit(tmp_path: Path):
    write_cars(tmp_path)
    data = load_task("Cars", tmp_path)
    assert data.classnames == ("AM General Hummer SUV 2000", "Acura RL Sedan 2012")
    assert (len(data.train), len(data.test)) == (8, 4)
    assert _labels(data.test) == [0, 1, 0, 1]


def test_cars_class_names_replace_underscores_with_spaces(tmp_path: Path):
    """task_vectors' `Cars.classnames` is `idx_to_class[i].replace('_', ' ')`."""
    write_cars(tmp_path, classes=("Ram_C/V_Cargo_Van_Minivan_2012", "smart fortwo Convertible 2012"))
    data = load_task("Cars", tmp_path)
    assert data.classnames == ("Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012")


def test_transform_is_applied_and_identity_tracks_the_files(tmp_path: Path):
    write_eurosat(tmp_path)
    data = load_task("EuroSAT", tmp_path, transform=lambda img: torch.tensor(img.size))
    assert data.test[0][0].tolist() == [8, 8]
    before = data.identity
    (tmp_path / "EuroSAT_splits" / "test" / "Forest" / "img_000.jpg").rename(
        tmp_path / "EuroSAT_splits" / "test" / "Forest" / "img_009.jpg"
    )
    assert load_task("EuroSAT", tmp_path).identity != before


# --- bad inputs: one line that names the folder and the expected layout ------------------------


@pytest.mark.parametrize("task", TASKS)
def test_empty_root_names_the_expected_layout(tmp_path: Path, task: str):
    with pytest.raises(TatrError, match=rf"^{task}: .*(expected|not found)") as info:
        load_task(task, tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_extra_class_folders(tmp_path: Path):
    write_eurosat(tmp_path)
    shutil.rmtree(tmp_path / "EuroSAT_splits" / "test" / "Forest")
    with pytest.raises(TatrError, match=r"EuroSAT: class folder 'Forest' is missing from .*test \(1 of 3"):
        load_task("EuroSAT", tmp_path)
    shutil.rmtree(tmp_path / "EuroSAT_splits" / "train" / "Forest")
    (tmp_path / "EuroSAT_splits" / "test" / "Forest").mkdir()
    with pytest.raises(TatrError, match="has class folder 'Forest' that the training split lacks"):
        load_task("EuroSAT", tmp_path)


def test_unknown_eurosat_folder_and_empty_class(tmp_path: Path):
    write_eurosat(tmp_path)
    (tmp_path / "EuroSAT_splits" / "train" / "Lake").mkdir()
    (tmp_path / "EuroSAT_splits" / "test" / "Lake").mkdir()
    with pytest.raises(TatrError, match="EuroSAT: unknown class folder 'Lake'"):
        load_task("EuroSAT", tmp_path)
    write_dtd_task_vectors(tmp_path)
    for f in (tmp_path / "dtd" / "test" / "banded").iterdir():
        f.unlink()
    with pytest.raises(TatrError, match=r"class folder .*banded holds no images"):
        load_task("DTD", tmp_path)


def test_resisc45_missing_class_folder(tmp_path: Path):
    write_resisc45(tmp_path)
    shutil.rmtree(tmp_path / "resisc45" / "NWPU-RESISC45" / "sea_ice")
    expected = r"resisc45-train\.txt lists 4 images not found .*class folder 'sea_ice' missing"
    with pytest.raises(TatrError, match=expected):
        load_task("RESISC45", tmp_path)


def test_gtsrb_missing_class_folder(tmp_path: Path):
    write_gtsrb(tmp_path, labels=(0, 14))
    shutil.rmtree(tmp_path / "gtsrb" / "GTSRB" / "Training" / "00014")
    with pytest.raises(TatrError, match="GTSRB: class folder '00014' is missing"):
        load_task("GTSRB", tmp_path)


def test_gtsrb_bad_folder_name(tmp_path: Path):
    write_gtsrb(tmp_path, labels=(0,))
    (tmp_path / "gtsrb" / "GTSRB" / "Training" / "stop_signs").mkdir()
    with pytest.raises(TatrError, match="unexpected class folder 'stop_signs'"):
        load_task("GTSRB", tmp_path)


def test_dtd_torchvision_missing_class_folder(tmp_path: Path):
    write_dtd_torchvision(tmp_path)
    shutil.rmtree(tmp_path / "dtd" / "dtd" / "images" / "zigzagged")
    with pytest.raises(TatrError, match="DTD: class folder 'zigzagged' is missing"):
        load_task("DTD", tmp_path)


def test_corrupt_array_files(tmp_path: Path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01\x00\x00\x00\x09" + b"\x00" * 9
    )
    with pytest.raises(TatrError, match=r"MNIST: .* has 6 images but .* has 9 labels"):
        load_task("MNIST", tmp_path)
    from scipy.io import savemat

    (tmp_path / "svhn").mkdir()
    savemat(str(tmp_path / "svhn" / "train_32x32.mat"), {"images": [1]})
    savemat(str(tmp_path / "svhn" / "test_32x32.mat"), {"images": [1]})
    with pytest.raises(TatrError, match=r"SVHN: .* is not an SVHN \.mat file"):
        load_task("SVHN", tmp_path)


def test_not_a_folder_and_unknown_task(tmp_path: Path):
    with pytest.raises(TatrError, match="does not exist or is not a folder"):
        load_task("MNIST", tmp_path / "missing")
    with pytest.raises(TatrError, match="unknown task 'ImageNet'"):
        load_task("ImageNet", tmp_path)
