"""Weights of a Hugging Face `save_pretrained` folder, read without trusting what the folder says.

`config.json` and `model.safetensors.index.json` are data: the index names the files to read, so
a hostile folder could name `../../secret.safetensors`, an absolute path, or hold a shard that is
a symlink to a file elsewhere. Every file read here must resolve inside the folder, with one
exception that the Hugging Face cache needs: a snapshot folder
(`models--org--name/snapshots/<revision>/`) holds symlinks into its repository's `blobs/`, so
that folder is allowed too, and nothing else. A config or index that is not JSON, not an object,
or has fields of the wrong type, and a config of another model type, get one line each.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError
from tatr.core.model_folders import contained, json_object, present, roots

CLIP_MODEL_TYPES = ("clip_vision_model", "clip")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX = "model.safetensors.index.json"


def read_hf_dir(folder: Path) -> dict[str, Tensor]:
    """Weights of a `save_pretrained` folder: model.safetensors, shards, or pytorch_model.bin."""
    where = roots(folder)
    if present(folder / "config.json"):
        config_path = contained(folder, "config.json", where, "config.json")
        config = json_object(config_path)
        model_type = config.get("model_type")
        if not isinstance(model_type, str):
            raise TatrError(f"{config_path}: model_type is {model_type!r}, not a string naming the model type")
        if model_type not in CLIP_MODEL_TYPES:
            raise TatrError(f"{config_path}: model_type '{model_type}' is not a CLIP vision model")
    for name in WEIGHT_FILES:
        if present(folder / name):
            return load_state_dict(contained(folder, name, where, name))
    if present(folder / INDEX):
        return _read_shards(folder, where)
    raise TatrError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_shards(folder: Path, where: list[Path]) -> dict[str, Tensor]:
    index_path = contained(folder, INDEX, where, INDEX)
    weight_map = json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise TatrError(f"{index_path}: 'weight_map' must be a non-empty object mapping tensor names to shard files")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise TatrError(f"{index_path}: weight_map['{key}'] is {shard!r}, not a shard file name")
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = contained(folder, shard, where, f"{index_path}: shard")
        if path.suffix != ".safetensors":
            raise TatrError(f"{index_path}: shard '{shard}' is not a .safetensors file")
        tensors = load_state_dict(path)
        twice = sorted(set(tensors) & set(out))
        if twice:
            raise TatrError(f"{folder / shard}: key '{twice[0]}' is also in another shard")
        out.update(tensors)
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise TatrError(f"{index_path}: key '{missing[0]}' is not in its shard '{weight_map[missing[0]]}'")
    return out
