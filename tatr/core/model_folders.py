"""Hugging Face model folders as checkpoints: one `model.safetensors`, or shards listed by an index.

Why a module of its own: a folder is where LLM checkpoints live (`save_pretrained` writes shards of at most
5 GB and `model.safetensors.index.json`), and the index is a file from the internet like any other. It is
read as data and checked before any shard is opened: its `weight_map` must map tensor names to plain file
names in the folder itself (no path separators, no `..`, no links out of it), each shard must exist, and
`tatr.core.checkpoints` then checks that every shard holds exactly the keys the index gives it. A folder with
both a single file and an index is refused rather than guessed at.

Which files: `model.safetensors[.index.json]`, else `pytorch_model.bin[.index.json]` (torch files, read by
tatr's own unpickler as any `.bin`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tatr.core.errors import TatrError

# (single file, index) per format, in the order tatr prefers them
LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
MAX_INDEX_BYTES = 64 << 20  # a 1T-parameter model's index is a few MB; more is not an index


def is_model_folder(path: Path) -> bool:
    """A folder holding one of the weight layouts (checked further by `weight_map`)."""
    return path.is_dir() and any((path / a).is_file() or (path / b).is_file() for a, b in LAYOUTS)


def weight_map(folder: Path) -> dict[str, Path] | Path:
    """The folder's single weight file, or key → shard path from its index (validated as the docstring says)."""
    for single, index in LAYOUTS:
        has_single, has_index = (folder / single).is_file(), (folder / index).is_file()
        if has_single and has_index:
            raise TatrError(f"{folder}: holds both {single} and {index}; keep one")
        if has_single:
            return _inside(folder, single, folder / single)
        if has_index:
            return _read_index(folder, folder / index, Path(single).suffix)
    raise TatrError(f"{folder}: not a model folder (no {' or '.join(a for a, _ in LAYOUTS)}, nor an index of shards)")


def _read_index(folder: Path, index: Path, suffix: str) -> dict[str, Path]:
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise TatrError(f"{index}: {index.stat().st_size:,} bytes is too large for a weight index")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TatrError(f"{index}: not a readable JSON weight index ({str(exc).splitlines()[0][:120]})") from None
    mapping = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        raise TatrError(f"{index}: has no 'weight_map' of tensor names to shard files")
    shards: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for key, name in mapping.items():
        if not isinstance(name, str) or not name.endswith(suffix):
            raise TatrError(f"{index}: key '{key}' maps to {name!r}, not a {suffix} file name")
        if name not in shards:
            shards[name] = _inside(folder, name, index)
        out[key] = shards[name]
    return out


def _inside(folder: Path, name: str, where: Path) -> Path:
    """`folder/name` for a plain file name that stays in the folder and is a regular file there."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise TatrError(f"{where}: shard name {name!r} is not a plain file name in the folder")
    path = folder / name
    if not path.is_file():
        raise TatrError(f"{where}: shard '{name}' is missing from {folder}")
    if path.resolve().parent != folder.resolve():
        raise TatrError(f"{where}: shard '{name}' links out of {folder}")
    return path
