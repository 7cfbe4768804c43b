"""Hugging Face model folders as checkpoints: one `model.safetensors`, or shards listed by an index.

Why a module of its own: a folder is where LLM checkpoints live (`save_pretrained` writes shards of at most
5 GB and `model.safetensors.index.json`), and the index is a file from the internet like any other. It is
read as data and checked before any shard is opened: its `weight_map` must map tensor names to plain relative
file names that resolve inside the folder (no absolute paths, no `..`, no links out of it; a Hugging Face cache
snapshot, `models--org--name/snapshots/<revision>/`, may link into its repository's `blobs/` and nowhere
else), each shard must exist, and
`tatr.core.checkpoints` then checks that every shard holds exactly the keys the index gives it. A folder with
both a single file and an index is refused rather than guessed at.

Which files: `model.safetensors[.index.json]`, else `pytorch_model.bin[.index.json]` (torch files, read by
tatr's own unpickler as any `.bin`).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

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
        where = roots(folder)
        if has_single:
            return contained(folder, single, where, single)
        if has_index:
            return _read_index(folder, contained(folder, index, where, index), Path(single).suffix, where)
    raise TatrError(f"{folder}: not a model folder (no {' or '.join(a for a, _ in LAYOUTS)}, nor an index of shards)")


def _read_index(folder: Path, index: Path, suffix: str, where: list[Path]) -> dict[str, Path]:
    mapping = json_object(index).get("weight_map")
    if not isinstance(mapping, dict) or not mapping:
        raise TatrError(f"{index}: has no 'weight_map' of tensor names to shard files")
    shards: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for key, name in mapping.items():
        if not isinstance(name, str) or not name.endswith(suffix):
            raise TatrError(f"{index}: key '{key}' maps to {name!r}, not a {suffix} file name")
        if name not in shards:
            shards[name] = contained(folder, name, where, f"{index}: shard")
        out[key] = shards[name]
    return out


def roots(folder: Path) -> list[Path]:
    """The folder, and for a Hugging Face cache snapshot its repository's `blobs/` folder."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def contained(folder: Path, name: str, roots: list[Path], what: str) -> Path:
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


def json_object(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise TatrError(f"{path}: {path.stat().st_size:,} bytes is too large for a JSON configuration")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise TatrError(f"{path}: not valid JSON ({detail})") from None
    if not isinstance(value, dict):
        raise TatrError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
