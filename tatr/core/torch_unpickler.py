"""The unpickler behind `tatr.core.torchfile`: an explicit allowlist and checked tensor rebuilders.

Python's unpickler runs whatever callable a pickle names. This one resolves only a fixed list,
none of which allocates from its arguments (not `torch.Tensor`, not `bytearray`), and replaces
torch's tensor rebuilders with checks that return a `TensorSpec` (storage, dtype, offset, size,
stride) rather than a tensor. A storage's byte count must equal what the file holds for it; a
spec must lie inside its storage and hold no more elements than it (which refuses stride-0 and
overlapping views claiming TiBs, negative strides, offsets past the end, and counts that overflow
64 bits, the arithmetic being done on Python integers). Refusals are returned as `Refused`
values, so that the caller can name the key, and recorded, so that one anywhere refuses the file.

Names outside the allowlist raise `PickledObjectError` in strict mode and otherwise become
`Inert` stand-ins that record their arguments and state and never execute.
"""

from __future__ import annotations

import _compat_pickle
import functools
import math
import pickle
import pickletools
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from tatr.core.errors import PickledObjectError

MAX_DIMS = 64


class Inert:
    """Stand-in for a class or function a pickle names: records its arguments, never executes."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_state", None)
        object.__setattr__(obj, "_items", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return Inert(*args)

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items.append((key, value))

    def append(self, value: Any) -> None:
        self._items.append(value)

    def extend(self, values: Any) -> None:
        self._items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self._qualname}>"


@dataclass(frozen=True)
class Refused:
    """What a rebuilder returns instead of a tensor tatr will not make; `crafted` ones refuse the file."""

    reason: str
    crafted: bool = False


@dataclass(frozen=True)
class NeedsTrust:
    """A tensor of a subclass the file defines: rebuilding it needs the file's own code."""

    qualname: str


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class TensorSpec:
    """A checked tensor that is not made yet: it lies inside `storage` and fits in it."""

    storage: StorageRef
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_TENSOR_TYPE = object()  # `torch.Tensor` as a marker: the real class would allocate when called
_PARAMETER_TYPE = object()


@functools.cache
def _storage_types() -> dict[str, _StorageType]:
    """Legacy storage class names (`torch.FloatStorage`, ...) → their dtype; nothing is called."""
    out = {"UntypedStorage": _StorageType(torch.uint8)}
    with warnings.catch_warnings():  # the legacy classes warn that TypedStorage is deprecated
        warnings.simplefilter("ignore")
        for name in dir(torch):
            cls = getattr(torch, name)
            if name.endswith("Storage") and isinstance(cls, type):
                dtype = getattr(cls, "dtype", None)
                if isinstance(dtype, torch.dtype):
                    out[name] = _StorageType(dtype)
    return out


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin1")


_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})
# protocol-5 buffers (allocate from a length in the file) and the extension registry (resolves
# names outside find_class's sight): torch never writes them
_FORBIDDEN_OPS = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4"})


def checked_pickle(stream: Any) -> bytes:
    """The bytes of the next pickle in `stream` (from its position to STOP), scanned first.

    Python's C unpickler sizes its memo array from the largest memo index the pickle names, so
    ten bytes saying `LONG_BINPUT 1258647924` allocate 10 GB. The scan (pure Python, reading at
    most the bytes present) refuses memo indices beyond the pickle's own length, which no
    well-formed pickle uses, and the opcodes above.
    """
    start = stream.tell()
    for op, arg, pos in pickletools.genops(stream):
        if op.name in _FORBIDDEN_OPS:
            raise pickle.UnpicklingError(f"opcode {op.name} is not used by torch checkpoints")
        if op.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg <= (pos or 0) - start):
            raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} is out of range")
    end = stream.tell()
    stream.seek(start)
    data = stream.read(end - start)
    stream.seek(end)
    return data


def _int(value: Any) -> int:
    if type(value) is not int:
        raise pickle.UnpicklingError(f"expected an integer, found {type(value).__name__}")
    return value


class TorchUnpickler(pickle.Unpickler):
    """Python's unpickler with an explicit allowlist and checked tensor rebuilders (see module doc)."""

    def __init__(self, stream: Any, record_sizes: dict[str, int] | None, strict: bool) -> None:
        super().__init__(stream, encoding="utf-8")
        self.record_sizes = record_sizes  # zip: bytes the file holds per storage key; legacy: checked later
        self.strict = strict
        self.storages: dict[str, StorageRef] = {}
        self.refusals: list[Refused] = []
        self._standins: dict[str, type] = {}
        self._allowed: dict[str, Any] = {
            "collections.OrderedDict": OrderedDict,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "torch.Tensor": _TENSOR_TYPE,
            "torch.nn.parameter.Parameter": _PARAMETER_TYPE,
            "_codecs.encode": _latin1_bytes,
            "torch.serialization._get_layout": str,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
        }
        self._storage_types = _storage_types()

    # --- globals -------------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 spells __builtin__.set
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        if qualname in self._allowed:
            return self._allowed[qualname]
        if module in ("torch", "torch.storage", "torch.cuda") and name in self._storage_types:
            return self._storage_types[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch._utils" and name.startswith("_rebuild_"):
            kind = name.removeprefix("_rebuild_").replace("_", " ")
            return lambda *args, **kwargs: Refused(f"a {kind} (tatr reads dense, strided tensors only)")
        if self.strict:
            raise PickledObjectError(qualname)
        if qualname not in self._standins:
            self._standins[qualname] = type(name, (Inert,), {"_qualname": qualname})
        return self._standins[qualname]

    # --- storages ------------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> StorageRef | None:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError("malformed persistent id")
        if pid[0] == "module" and not self.strict:
            return None  # legacy torch.save(module) records its source code; never used
        if pid[0] != "storage" or len(pid) not in (5, 6):
            raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError("malformed storage reference")
        numel = _int(numel)
        if numel < 0:
            raise pickle.UnpicklingError(f"storage '{key}' claims {numel} elements")
        ref = StorageRef(key, storage_type.dtype, numel * storage_type.dtype.itemsize)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise pickle.UnpicklingError(f"storage '{key}' is described twice, differently")
        if self.record_sizes is not None and self.record_sizes.get(f"data/{key}") != ref.nbytes:
            held = self.record_sizes.get(f"data/{key}")
            raise pickle.UnpicklingError(
                f"storage '{key}' claims {ref.nbytes:,} bytes but the file holds "
                + ("none" if held is None else f"{held:,}")
            )
        return ref

    # --- tensors -------------------------------------------------------------------------------
    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> TensorSpec | Refused:
        if not isinstance(storage, StorageRef):
            raise pickle.UnpicklingError("a tensor without a storage")
        return self._spec(storage, storage.dtype, offset, size, stride)

    def _rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorSpec | Refused:
        return self._rebuild_tensor(storage, offset, size, stride)

    def _rebuild_tensor_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any
    ) -> TensorSpec | Refused:
        if not isinstance(storage, StorageRef) or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("a tensor without a storage or dtype")
        return self._spec(storage, dtype, offset, size, stride)

    @staticmethod
    def _rebuild_parameter(data: Any, *_: Any) -> Any:
        return data

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if not callable(func) or not isinstance(args, tuple):
            raise pickle.UnpicklingError("malformed tensor subclass record")
        result = func(*args)  # our checked rebuilder (or an Inert): the geometry is checked either way
        if new_type is _TENSOR_TYPE or new_type is _PARAMETER_TYPE or isinstance(result, Refused):
            return result
        return NeedsTrust(getattr(new_type, "_qualname", type(new_type).__name__))

    def _spec(self, storage: StorageRef, dtype: torch.dtype, offset: Any, size: Any, stride: Any) -> Any:
        """Refuse (before anything is allocated) a tensor that leaves its storage or outgrows it."""
        if not isinstance(size, tuple | list) or not isinstance(stride, tuple | list):
            raise pickle.UnpicklingError("tensor size and stride must be tuples")
        offset, size, stride = _int(offset), tuple(map(_int, size)), tuple(map(_int, stride))
        shown = f"size {size}, stride {stride}, offset {offset}"
        problem = None
        if len(size) != len(stride) or len(size) > MAX_DIMS:
            problem = f"{shown}: size and stride disagree, or more than {MAX_DIMS} dimensions"
        elif min((offset, *size, *stride)) < 0:
            problem = f"{shown}: negative sizes, strides and offsets are refused"
        elif max((offset, *size, *stride)) >= 2**63:
            problem = f"{shown}: values overflow 64 bits"
        else:
            numel = math.prod(size)
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if numel else offset - 1
            if numel * dtype.itemsize > storage.nbytes:
                problem = (
                    f"{shown} claims {numel:,} elements of {dtype} but its storage holds {storage.nbytes:,} bytes "
                    "(a stride-0 or overlapping view)"
                )
            elif (last + 1) * dtype.itemsize > storage.nbytes:
                problem = f"{shown} reaches byte {(last + 1) * dtype.itemsize:,} of a {storage.nbytes:,}-byte storage"
        if problem is not None:
            refused = Refused(f"refusing a crafted or damaged tensor ({problem})", crafted=True)
            self.refusals.append(refused)
            return refused
        return TensorSpec(storage, dtype, offset, size, stride)
