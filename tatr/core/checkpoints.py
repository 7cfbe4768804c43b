"""Reading and writing state dicts: safetensors (per key) and plain `.pt` state dicts.

The merge streams one tensor at a time, so the unit of reading is `read_tensor(source, key)`.
A source is either a path or an in-memory mapping (tests, small suites); both look the same to
the core. Files are opened per read so that pages of T files are never resident together: peak
memory must not grow with the number of tasks.

Safetensors headers are checked by safetensors itself (sizes and offsets against the file) through
its numpy backend, and each key's bytes are then read on their own into a tensor that owns them.
The torch backend is avoided because it maps the whole file privately and writably, which the
kernel refuses (ENOMEM) for a file larger than memory, even to read one key. Torch files are read
by `tatr.core.torchfile`, never by `torch.load` (see there). Every dtype is checked against `DTYPES`,
the one table of what tatr reads, at the header, before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from tatr.core import torchfile
from tatr.core.errors import PickledObjectError, PickleNeedsTrust, TatrError, UnreadableCheckpoint, input_error
from tatr.core.model_folders import LAYOUTS, is_model_folder, weight_map
from tatr.core.outputs import atomic_write
from tatr.core.torchfile import TensorSpec


@runtime_checkable
class DerivedSource(Protocol):
    """A checkpoint computed from others per key (a LoRA adapter over its base, `tatr.core.lora`): it has θ_0's
    header and makes each tensor on demand, so it streams like a file."""

    def header(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    def tensor(self, key: str) -> Tensor: ...


Source = Path | Mapping[str, Tensor] | DerivedSource
SAFETENSORS = (".safetensors",)
TORCH = (".pt", ".pth", ".bin")

_PT_CACHE: dict[Path, tuple[tuple[int, int, int], torchfile.Loaded, dict[str, TensorSpec]]] = {}
_HEADERS: dict[Path, tuple[tuple[int, int, int], dict[str, _Entry]]] = {}
_FOLDERS: dict[Path, tuple[tuple, dict[str, Path]]] = {}


@dataclass(frozen=True)
class _Entry:
    """One safetensors tensor: dtype, shape and its byte range in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def describe(source: Source) -> str:
    return str(source) if isinstance(source, Path | DerivedSource) else "<in-memory state dict>"


def header(source: Source) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key → (shape, dtype) without reading tensor data (safetensors) where the format allows."""
    if isinstance(source, DerivedSource):
        return source.header()
    if not isinstance(source, Path):
        return {k: (tuple(v.shape), v.dtype) for k, v in source.items()}
    if source.is_dir():
        shards = _folder_shards(source)
        return {key: header(shard)[key] for key, shard in shards.items()}
    if source.suffix in SAFETENSORS:
        return {key: (entry.shape, entry.dtype) for key, entry in _safetensors_header(source).items()}
    return {k: (spec.size, spec.dtype) for k, spec in _torch_specs(source)[1].items()}


def read_tensor(source: Source, key: str) -> Tensor:
    """One tensor of a source (for files: opened, read and closed per call)."""
    if isinstance(source, DerivedSource):
        return source.tensor(key)
    if not isinstance(source, Path):
        return source[key]
    if source.is_dir():
        shards = _folder_shards(source)
        if key not in shards:
            raise input_error(source, key, "not in this model folder")
        return read_tensor(shards[key], key)
    if source.suffix in SAFETENSORS:
        entries = _safetensors_header(source)
        if key not in entries:
            raise input_error(source, key, "not in this file")
        with open(source, "rb") as fh:
            return _read_entry(source, fh, key, entries[key])
    loaded, specs = _torch_specs(source)
    if key not in specs:
        raise input_error(source, key, "not in this file")
    return loaded.tensor(specs[key])


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a whole state dict from safetensors or a weights-only torch file."""
    path = _check_path(Path(path))
    if path.is_dir():
        return {key: read_tensor(path, key) for key in header(path)}
    if path.suffix in SAFETENSORS:
        entries = _safetensors_header(path)
        with open(path, "rb") as fh:
            return {key: _read_entry(path, fh, key, entry) for key, entry in entries.items()}
    loaded, specs = _torch_specs(path)
    made: dict[str, torch.UntypedStorage] = {}  # one per storage: tied weights stay tied
    return {key: loaded.tensor(spec, made) for key, spec in specs.items()}


def save_state_dict(state_dict: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors atomically: the file appears complete or not at all."""
    path = Path(path)
    if path.suffix not in SAFETENSORS:
        raise TatrError(f"{path}: output must be a .safetensors file")
    tensors = untie({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
    with atomic_write(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def untie(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Copy every tensor that shares its storage with an earlier one (tied weights, views).

    safetensors refuses shared storages, and a later in-place write into one key would change the
    other; a copy per extra key is the price, and only tied keys pay it.
    """
    seen: set[tuple[torch.device, int]] = set()
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        storage = (value.device, value.untyped_storage().data_ptr())
        shared = storage in seen and value.numel() > 0
        seen.add(storage)
        out[key] = value.clone() if shared else value
    return out


def as_source(path: str | Path) -> Path:
    """Validate that `path` is a readable checkpoint and return it as a streaming source."""
    path = _check_path(Path(path))
    if path.is_dir():
        _folder_shards(path)
    elif path.suffix in SAFETENSORS:
        _safetensors_header(path)
    else:
        _torch_specs(path)
    return path


def _folder_shards(folder: Path) -> dict[str, Path]:
    """Key → the file holding it, for a model folder (`tatr.core.model_folders`), checked once per index
    version: every key the index lists is in its shard, and no shard holds a key the index gives elsewhere
    or not at all (a key in two shards would make the merge depend on which one is read)."""
    # checked per read of a key, so only the layout files are looked at (a shard that changes later is
    # checked again by its own header cache, and a key it lost is "not in this file")
    watched = [folder / name for pair in LAYOUTS for name in pair if (folder / name).is_file()]
    signature = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in watched)
    cached = _FOLDERS.get(folder)
    if cached is not None and cached[0] == signature:
        return cached[1]
    files = weight_map(folder)
    if isinstance(files, Path):
        shards = {key: files for key in header(files)}
    else:
        shards = dict(files)
        held: dict[Path, set[str]] = {}
        for key, shard in shards.items():
            held.setdefault(shard, set()).add(key)
        for shard, keys in held.items():
            present = set(header(shard))
            if keys - present:
                raise input_error(folder, min(keys - present), f"listed in the index for {shard.name}, which lacks it")
            if present - keys:
                raise input_error(folder, min(present - keys), f"in {shard.name} but not listed there by the index")
    if len(_FOLDERS) >= 64:
        _FOLDERS.clear()
    _FOLDERS[folder] = (signature, shards)
    return shards


def _check_path(path: Path) -> Path:
    if not path.exists():
        raise TatrError(f"{path}: no such file")
    if path.is_dir():
        if not is_model_folder(path):
            raise TatrError(f"{path}: a folder, but not a model folder (no model.safetensors or shard index)")
        return path
    if not path.is_file():
        raise TatrError(f"{path}: not a file")
    if path.suffix not in SAFETENSORS + TORCH:
        raise TatrError(f"{path}: unknown checkpoint format '{path.suffix}' (use .safetensors, .pt or .pth)")
    return path


def _open(path: Path):
    """safetensors' own header checks, through its numpy backend (no whole-file mapping)."""
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UnreadableCheckpoint(f"{path}: cannot read this file: not readable as safetensors ({detail})") from None


def _safetensors_header(path: Path) -> dict[str, _Entry]:
    """Key → dtype, shape and byte range; every dtype checked against `DTYPES` before any data is read."""
    stat = path.stat()
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    cached = _HEADERS.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    with _open(path) as fh:
        names = {key: fh.get_slice(key).get_dtype() for key in fh.keys()}  # noqa: SIM118 - not a Mapping
    for key, name in names.items():
        if name not in DTYPES:
            raise input_error(path, key, f"dtype {name} is not supported ({', '.join(DTYPES)})")
    try:
        with open(path, "rb") as fh:
            length = struct.unpack("<Q", fh.read(8))[0]
            raw = json.loads(fh.read(length))
        entries = {}
        for key, name in names.items():
            shape, (start, end) = tuple(int(n) for n in raw[key]["shape"]), raw[key]["data_offsets"]
            entries[key] = _Entry(DTYPES[name], shape, 8 + length + int(start), 8 + length + int(end))
            if entries[key].end - entries[key].start != math.prod(shape) * DTYPES[name].itemsize:
                raise ValueError(f"key '{key}' has {end - start} bytes for shape {list(shape)}")
            if entries[key].end > stat.st_size:
                raise ValueError(f"key '{key}' runs past the end of the file")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UnreadableCheckpoint(f"{path}: cannot read this file: a damaged safetensors header ({exc})") from None
    if len(_HEADERS) >= 256:
        _HEADERS.clear()
    _HEADERS[path] = (signature, entries)
    return entries


def _read_entry(path: Path, fh: Any, key: str, entry: _Entry) -> Tensor:
    """Only this key's bytes, into a tensor that owns them (writable, shared with nothing)."""
    if entry.end == entry.start:
        return torch.empty(entry.shape, dtype=entry.dtype)
    data = torchfile.allocate(path, f"key '{key}'", entry.end - entry.start)
    fh.seek(entry.start)
    if fh.readinto(data) != len(data):
        raise UnreadableCheckpoint(f"{path}: cannot read this file: key '{key}' is truncated")
    return torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)


def _torch_specs(path: Path) -> tuple[torchfile.Loaded, dict[str, TensorSpec]]:
    """A torch file's checked tensor specs, cached per path; tensors are made per key on demand.

    Read by `tatr.core.torchfile`, never by `torch.load`: no code from the file runs, TorchScript and
    legacy tar archives are refused by their bytes, and every tensor is checked against its
    storage before anything is allocated. Reading one key reads only its storage's bytes.
    """
    path = path.resolve()
    stat = path.stat()
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    cached = _PT_CACHE.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1], cached[2]
    try:
        loaded = torchfile.read(path, strict=True)
    except PickledObjectError as exc:
        raise PickledObjectError(
            f"{path}: this is a pickled Python object, not a plain state dict (it names {exc}); "
            "convert it once with `tatr convert` (see README, 'Checkpoint formats')"
        ) from None
    specs = state_dict_specs(loaded.obj, path)
    loaded.check()
    _PT_CACHE.clear()  # parsed specs only: small, but one file at a time is enough
    _PT_CACHE[path] = (signature, loaded, specs)
    return loaded, specs


def state_dict_specs(obj: Any, path: Path, prefix: str = "") -> dict[str, TensorSpec]:
    """The (possibly `{"state_dict": ...}`-wrapped) mapping of names to tensors in a torch file.

    One line, naming the key, for a non-string key, a value that is not a tensor (nested dicts,
    lists, numbers), a sparse/quantized/subclassed tensor, a crafted one, or an unsupported dtype.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TatrError(f"{path}: expected a state dict (a mapping of names to tensors), found {describe_value(obj)}")
    out: dict[str, TensorSpec] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            problem = f"is {describe_value(key)}, not a string; a state dict maps names to tensors"
            raise TatrError(f"{path}: key {key!r} {problem}")
        out[prefix + key] = tensor_spec(value, path, prefix + key)
    return out


def tensor_spec(value: Any, path: Path, key: str) -> TensorSpec:
    """`value` as a checked dense tensor of a supported dtype, or one line saying why not."""
    if isinstance(value, torchfile.Refused):
        raise input_error(path, key, value.reason)
    if isinstance(value, torchfile.NeedsTrust):
        raise PickleNeedsTrust(
            f"{path}: key '{key}' is a tensor of the file's own class {value.qualname}, which cannot be rebuilt "
            "without running code from the file; if you trust it, rerun with --trust-pickle"
        )
    if not isinstance(value, TensorSpec):
        raise input_error(path, key, f"holds {describe_value(value)}, not a tensor")
    check_dtype(value.dtype, path, key)
    return value


def check_dtype(dtype: torch.dtype, source: object, key: str) -> None:
    if dtype not in SUPPORTED:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES.values())
        raise input_error(source, key, f"dtype {str(dtype).removeprefix('torch.')} is not supported ({names})")


def describe_value(value: Any) -> str:
    """'a dict', 'an int', 'None', 'a torch.nn.modules.linear.Linear': for one-line messages."""
    if value is None:
        return "None"
    name = getattr(value, "_qualname", None) or type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def source_error(source: Source, key: str | None, problem: str) -> TatrError:
    return input_error(describe(source), key, problem)


# The one table of dtypes tatr reads and writes, by safetensors name. Everything else (fp8, U16,
# U32, U64, complex, quantized, ...) is refused at the header, naming file, key and dtype.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SUPPORTED = frozenset(DTYPES.values())
