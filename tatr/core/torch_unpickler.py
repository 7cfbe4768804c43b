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


class CraftedPickle(pickle.UnpicklingError):
    """A pickle that tries to rewrite what tatr checked: refused as crafted, not merely damaged."""


class Sealed:
    """Refuses BUILD: a pickle may not rewrite an object tatr made for it (see the module doc)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise CraftedPickle(f"its pickle rewrites a {type(self).__name__.lstrip('_')} after tatr checked it")


class _Allowed(Sealed):
    """An allowlisted callable, sealed: a bare function's `__dict__` would take a BUILD."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


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
class Refused(Sealed):
    """What a rebuilder returns instead of a tensor tatr will not make; `crafted` ones refuse the file."""

    reason: str
    crafted: bool = False


@dataclass(frozen=True)
class NeedsTrust(Sealed):
    """A tensor of a subclass the file defines: rebuilding it needs the file's own code."""

    qualname: str


@dataclass(frozen=True)
class StorageRef(Sealed):
    key: str
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class TensorSpec(Sealed):
    """A checked tensor that is not made yet: it lies inside `storage` and fits in it."""

    storage: StorageRef
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType(Sealed):
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
        self.checked: dict[str, tuple[torch.dtype, int]] = {}  # storage key → (dtype, bytes), out of the pickle's reach
        self.refusals: list[Refused] = []
        self._standins: dict[str, type] = {}
        callables: dict[str, Any] = {
            "_codecs.encode": _latin1_bytes,
            "torch.serialization._get_layout": str,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
        }
        self._allowed: dict[str, Any] = {
            "collections.OrderedDict": OrderedDict,  # classes take no BUILD (their __dict__ is read-only)
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "torch.Tensor": _TENSOR_TYPE,
            "torch.nn.parameter.Parameter": _PARAMETER_TYPE,
            **{name: _Allowed(fn) for name, fn in callables.items()},
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
            return _Allowed(lambda *args, **kwargs: Refused(f"a {kind} (tatr reads dense, strided tensors only)"))
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
        claim = (storage_type.dtype, numel * storage_type.dtype.itemsize)
        if self.checked.setdefault(key, claim) != claim:
            raise pickle.UnpicklingError(f"storage '{key}' is described twice, differently")
        if self.record_sizes is not None and self.record_sizes.get(f"data/{key}") != claim[1]:
            held = self.record_sizes.get(f"data/{key}")
            raise pickle.UnpicklingError(
                f"storage '{key}' claims {claim[1]:,} bytes but the file holds "
                + ("none" if held is None else f"{held:,}")
            )
        return StorageRef(key, *claim)

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
        problem = geometry_problem(self.checked[storage.key][1], dtype, offset, size, stride)
        if problem is not None:
            refused = Refused(f"refusing a crafted or damaged tensor ({problem})", crafted=True)
            self.refusals.append(refused)
            return refused
        return TensorSpec(storage, dtype, offset, size, stride)


def geometry_problem(
    nbytes: int, dtype: torch.dtype, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> str | None:
    """Why a view (offset, size, stride) of `dtype` cannot be made over `nbytes` bytes, or None.

    The arithmetic is on Python integers, so counts that would overflow 64 bits are seen."""
    shown = f"size {size}, stride {stride}, offset {offset}"
    if len(size) != len(stride) or len(size) > MAX_DIMS:
        return f"{shown}: size and stride disagree, or more than {MAX_DIMS} dimensions"
    if min((offset, *size, *stride)) < 0:
        return f"{shown}: negative sizes, strides and offsets are refused"
    if max((offset, *size, *stride)) >= 2**63:
        return f"{shown}: values overflow 64 bits"
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if numel else offset - 1
    if numel * dtype.itemsize > nbytes:
        return (
            f"{shown} claims {numel:,} elements of {dtype} but its storage holds {nbytes:,} bytes "
            "(a stride-0 or overlapping view)"
        )
    if (last + 1) * dtype.itemsize > nbytes:
        return f"{shown} reaches byte {(last + 1) * dtype.itemsize:,} of a {nbytes:,}-byte storage"
    if _overlaps(size, stride):
        return (
            f"{shown}: two indices reach one element (a stride-0 or overlapping view; tatr writes into what it "
            "reads, so save x.contiguous())"
        )
    return None


def _overlaps(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True unless every element has one index: with the dims of size > 1 sorted by stride, each
    stride must pass the farthest offset the smaller dims reach (torch's own non-overlap test).

    Size-1 dims are free, so `arange(n).expand(1, -1)` (Hugging Face's `position_ids`) passes;
    transposes and strided slices pass; `expand` to a size > 1 and overlapping `as_strided` do not."""
    reach = 0
    for n, s in sorted((pair for pair in zip(size, stride, strict=True) if pair[0] > 1), key=lambda p: p[1]):
        if s <= reach:
            return True
        reach += (n - 1) * s
    return False


def recheck(spec: Any, checked: dict[str, tuple[torch.dtype, int]]) -> str | None:
    """The checks of `_spec` again, where the tensor is made: why `spec` may not be made, or None.

    `checked` is the unpickler's own record of each storage, so nothing the pickle touched is trusted."""
    if type(spec) is not TensorSpec or type(spec.storage) is not StorageRef:
        return f"a {type(spec).__name__} where a checked tensor was expected"
    claim = checked.get(spec.storage.key)
    if claim is None or (spec.storage.dtype, spec.storage.nbytes) != claim:
        return f"storage '{spec.storage.key}' differs from the one that was checked"
    fields = (spec.offset, *spec.size, *spec.stride)
    if type(spec.size) is not tuple or type(spec.stride) is not tuple or any(type(v) is not int for v in fields):
        return "a tensor geometry that is not made of integers"
    if not isinstance(spec.dtype, torch.dtype):
        return "a tensor without a dtype"
    return geometry_problem(claim[1], spec.dtype, spec.offset, spec.size, spec.stride)
