"""Hugging Face model folders as `-p`/`-f` inputs (issue 22): single-file and sharded folders merge exactly as
their single files do, and a hostile index is one line naming what is wrong, before any merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tatr import merge
from tatr.core.checkpoints import header, load_state_dict, read_tensor
from tatr.core.errors import TatrError
from tests.core_helpers import make_models

INDEX = "model.safetensors.index.json"


def _floats(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if v.is_floating_point()}


def write_sharded(folder: Path, sd: dict[str, torch.Tensor], per_shard: int = 2) -> Path:
    """Shards of `per_shard` keys and their index, as `save_pretrained` lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    groups = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for n, group in enumerate(groups, 1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in group}, str(folder / name))
        weight_map.update(dict.fromkeys(group, name))
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def models(tmp_path: Path):
    pre, tasks = make_models(3, seed=4)
    pre, tasks = _floats(pre), [_floats(t) for t in tasks]
    files = []
    for name, sd in [("pre", pre), *((f"ft{i}", t) for i, t in enumerate(tasks))]:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
        files.append(tmp_path / f"{name}.safetensors")
    return pre, tasks, files


def test_sharded_and_single_folders_merge_as_their_files(models, tmp_path: Path) -> None:
    pre, tasks, files = models
    pre_dir = write_sharded(tmp_path / "pre_dir", pre)
    ft_dirs = [write_sharded(tmp_path / f"ft{i}_dir", t, per_shard=1 + i) for i, t in enumerate(tasks)]
    single = tmp_path / "single"
    single.mkdir()
    save_file({k: v.contiguous() for k, v in tasks[0].items()}, str(single / "model.safetensors"))
    expected = merge(files[0], files[1:], method="ties-sum", trust_region="zero-shot", q=0.8, lam=0.4)
    got = merge(pre_dir, [single, *ft_dirs[1:]], method="ties-sum", trust_region="zero-shot", q=0.8, lam=0.4)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert header(pre_dir) == header(files[0])
    assert torch.equal(read_tensor(pre_dir, "blocks.1.mlp.weight"), pre["blocks.1.mlp.weight"])
    assert set(load_state_dict(pre_dir)) == set(pre)


def _hostile(folder: Path, sd: dict[str, torch.Tensor], change) -> Path:
    write_sharded(folder, sd)
    index = json.loads((folder / INDEX).read_text())
    change(folder, index)
    (folder / INDEX).write_text(json.dumps(index) if not isinstance(index, str) else index)
    return folder


def _remap(name: str):
    def change(folder: Path, index: dict) -> None:
        index["weight_map"][sorted(index["weight_map"])[0]] = name

    return change


SHARD2 = "model-00002-of-00003.safetensors"
CASES = {
    "escapes": (_remap("../pre.safetensors"), "is not a file name inside"),
    "absolute": (_remap("/etc/passwd.safetensors"), "is not a file name inside"),
    "missing shard": (_remap("gone.safetensors"), "no such file"),
    "not safetensors": (_remap("x.bin"), "not a .safetensors file"),
    "wrong shard": (_remap(SHARD2), "which lacks it"),
    "no weight_map": (lambda f, i: i.pop("weight_map"), "no 'weight_map'"),
    # a key its shard holds, dropped from the index while the shard stays listed for another key
    "unlisted key": (lambda f, i: i["weight_map"].pop("blocks.0.attn.bias"), "not listed there"),
    "both layouts": (lambda f, i: save_file({"a": torch.zeros(1)}, str(f / "model.safetensors")), "keep one"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_index_is_one_line(models, tmp_path: Path, case: str) -> None:
    pre, _, files = models
    change, message = CASES[case]
    folder = _hostile(tmp_path / "bad", pre, change)
    with pytest.raises(TatrError, match=message) as err:
        merge(folder, files[1:], trust_region="off")
    assert "\n" not in str(err.value)


def test_a_link_out_of_the_folder_and_junk_index_are_refused(models, tmp_path: Path) -> None:
    pre, _, files = models
    folder = write_sharded(tmp_path / "linked", pre)
    shard = folder / "model-00001-of-00003.safetensors"
    os.replace(shard, tmp_path / "outside.safetensors")
    shard.symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(TatrError, match="outside"):
        merge(folder, files[1:], trust_region="off")
    junk = write_sharded(tmp_path / "junk", pre)
    (junk / INDEX).write_text("{not json")
    with pytest.raises(TatrError, match="not valid JSON"):
        merge(junk, files[1:], trust_region="off")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TatrError, match="not a model folder"):
        merge(empty, files[1:], trust_region="off")
    assert load_file(str(files[0]))  # the inputs are untouched


def test_a_hub_cache_snapshot_reads_its_blobs(models, tmp_path: Path) -> None:
    """`models--org--name/snapshots/<rev>/` links every file into the repository's `blobs/`: allowed, and only there."""
    pre, _, files = models
    built = write_sharded(tmp_path / "built", pre)
    repo = tmp_path / "hub" / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in built.iterdir():
        blob = repo / "blobs" / f"{abs(hash(f.name)):x}"
        os.replace(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    expected = merge(files[0], files[1:], trust_region="zero-shot", q=0.9, lam=0.3)
    got = merge(snapshot, files[1:], trust_region="zero-shot", q=0.9, lam=0.3)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
