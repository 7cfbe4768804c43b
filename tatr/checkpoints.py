"""Reading and writing state dicts: safetensors (memory-mapped, per key) and weights-only `.pt`.

The merge streams one tensor at a time, so the unit of reading is `read_tensor(source, key)`.
A source is either a path or an in-memory mapping (tests, small suites); both look the same to
the core. Files are opened per read so that memory-mapped pages of T files are never resident
together: peak memory must not grow with the number of tasks. Tensors read from safetensors may
be backed by the file's mapping rather than copied; that is safe because tatr only ever replaces
files by atomic rename, never rewrites them in place.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from tatr.cache import atomic_write
from tatr.errors import PickledObjectError, TatrError, input_error

Source = Path | Mapping[str, Tensor]
SAFETENSORS = (".safetensors",)
TORCH = (".pt", ".pth", ".bin")

_PT_CACHE: dict[Path, dict[str, Tensor]] = {}


def describe(source: Source) -> str:
    return str(source) if isinstance(source, Path) else "<in-memory state dict>"


def header(source: Source) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key → (shape, dtype) without reading tensor data (safetensors) where the format allows."""
    if not isinstance(source, Path):
        return {k: (tuple(v.shape), v.dtype) for k, v in source.items()}
    if source.suffix in SAFETENSORS:
        with _open(source) as fh:
            out = {}
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                sl = fh.get_slice(key)
                out[key] = (tuple(sl.get_shape()), _SAFE_DTYPES[sl.get_dtype()])
            return out
    return {k: (tuple(v.shape), v.dtype) for k, v in _load_torch(source).items()}


def read_tensor(source: Source, key: str) -> Tensor:
    """One tensor of a source (for files: opened, read and closed per call)."""
    if not isinstance(source, Path):
        return source[key]
    if source.suffix in SAFETENSORS:
        with _open(source) as fh:
            return fh.get_tensor(key)
    return _load_torch(source)[key]


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a whole state dict from safetensors or a weights-only torch file."""
    path = _check_path(Path(path))
    if path.suffix in SAFETENSORS:
        with _open(path) as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    return dict(_load_torch(path))


def save_state_dict(state_dict: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors atomically: the file appears complete or not at all."""
    path = Path(path)
    if path.suffix not in SAFETENSORS:
        raise TatrError(f"{path}: output must be a .safetensors file")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_write(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def as_source(path: str | Path) -> Path:
    """Validate that `path` is a readable checkpoint and return it as a streaming source."""
    path = _check_path(Path(path))
    if path.suffix in SAFETENSORS:
        with _open(path):
            pass
    else:
        _load_torch(path)
    return path


def _check_path(path: Path) -> Path:
    if not path.exists():
        raise TatrError(f"{path}: no such file")
    if not path.is_file():
        raise TatrError(f"{path}: not a file")
    if path.suffix not in SAFETENSORS + TORCH:
        raise TatrError(f"{path}: unknown checkpoint format '{path.suffix}' (use .safetensors, .pt or .pth)")
    return path


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise TatrError(f"{path}: not a readable safetensors file ({exc})") from None


def _load_torch(path: Path) -> dict[str, Tensor]:
    """Weights-only torch load, cached per path (torch files cannot be read key by key)."""
    path = path.resolve()
    if path in _PT_CACHE:
        return _PT_CACHE[path]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise PickledObjectError(
            f"{path}: this is a pickled Python object, not a plain state dict ({str(exc).splitlines()[0][:80]}); "
            "convert it once with `tatr convert` (see README, 'Checkpoint formats')"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise TatrError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TatrError(f"{path}: expected a state dict (a mapping of names to tensors)")
    _PT_CACHE.clear()  # keep at most one torch file resident
    _PT_CACHE[path] = dict(obj)
    return _PT_CACHE[path]


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def source_error(source: Source, key: str | None, problem: str) -> TatrError:
    return input_error(describe(source), key, problem)


_SAFE_DTYPES = {
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
