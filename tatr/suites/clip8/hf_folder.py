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

import json
from pathlib import Path, PurePosixPath
from typing import Any

from torch import Tensor

from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError

CLIP_MODEL_TYPES = ("clip_vision_model", "clip")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 * 2**20


def read_hf_dir(folder: Path) -> dict[str, Tensor]:
    """Weights of a `save_pretrained` folder: model.safetensors, shards, or pytorch_model.bin."""
    roots = _roots(folder)
    if _present(folder / "config.json"):
        config_path = _contained(folder, "config.json", roots, "config.json")
        config = _json_object(config_path)
        model_type = config.get("model_type")
        if not isinstance(model_type, str):
            raise TatrError(f"{config_path}: model_type is {model_type!r}, not a string naming the model type")
        if model_type not in CLIP_MODEL_TYPES:
            raise TatrError(f"{config_path}: model_type '{model_type}' is not a CLIP vision model")
    for name in WEIGHT_FILES:
        if _present(folder / name):
            return load_state_dict(_contained(folder, name, roots, name))
    if _present(folder / INDEX):
        return _read_shards(folder, roots)
    raise TatrError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_shards(folder: Path, roots: list[Path]) -> dict[str, Tensor]:
    index_path = _contained(folder, INDEX, roots, INDEX)
    weight_map = _json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise TatrError(f"{index_path}: 'weight_map' must be a non-empty object mapping tensor names to shard files")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise TatrError(f"{index_path}: weight_map['{key}'] is {shard!r}, not a shard file name")
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = _contained(folder, shard, roots, f"{index_path}: shard")
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


def _roots(folder: Path) -> list[Path]:
    """The folder, and for a Hugging Face cache snapshot its repository's `blobs/` folder."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _contained(folder: Path, name: str, roots: list[Path], what: str) -> Path:
    """`folder/name`, refused unless `name` is a plain relative path that resolves inside a root."""
    parts = PurePosixPath(name).parts
    if not name or "\x00" in name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise TatrError(f"{what} '{name}' is not a file name inside {folder}; refusing to read it")
    path = folder / name
    resolved = path.resolve()
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise TatrError(f"{what} '{name}' resolves to {resolved}, outside {folder}; refusing to read it")
    if not resolved.is_file():
        raise TatrError(f"{path}: {'not a file' if resolved.exists() else 'no such file'}")
    return path


def _json_object(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise TatrError(f"{path}: {path.stat().st_size:,} bytes is too large for a JSON configuration")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise TatrError(f"{path}: not valid JSON ({detail})") from None
    if not isinstance(value, dict):
        raise TatrError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
