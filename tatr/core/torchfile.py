"""Reading `torch.save` files without `torch.load`: no code from the file runs, nothing is allocated
before it is checked.

Why not `torch.load`, even with `weights_only=True` or a restricted `pickle_module`:

* it routes files down other paths before any unpickler sees them: a zip holding `constants.pkl`
  goes to `torch.jit.load` (which runs the archive's TorchScript) whenever `weights_only=False`,
  custom `pickle_module` included; a legacy tar file goes to an extractor that allocates storages
  from sizes written in the file;
* it allocates every storage from the element count the pickle claims before any tensor is
  rebuilt, and `set_` then accepts a stride-0 view claiming TiBs over a one-element storage;
* checking the pickle with one parser and loading it with another invites a crafted file that
  the two read differently.

So one parser does both. `read` recognises the container (a `torch.save` zip, or the legacy
pre-1.6 stream of pickles) and refuses everything else (TorchScript, legacy tar, empty, garbage)
by its bytes. It unpickles with `tatr.core.torch_unpickler.TorchUnpickler`, which resolves only an
explicit allowlist (no
callable that allocates from its arguments: not `torch.Tensor`, not `bytearray`) and replaces
torch's tensor rebuilders with checked ones that return a `TensorSpec` (storage, dtype, offset,
size, stride) instead of a tensor. Every storage's byte count must equal the bytes the file holds
for it, and every spec must lie inside its storage with no more elements than the storage holds.
Only `Loaded.tensor(spec)` makes a tensor, reading just its storage's bytes, so a file can be
read key by key; specs sharing a storage (tied weights) can become views of one storage, as
`torch.load` makes them.

Names the allowlist does not know raise `PickledObjectError` in strict mode (a state dict needs
none) and become inert `Inert` stand-ins otherwise (`tatr convert` reads whole pickled modules
that way; see `tatr.suites.clip8.convert`).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import torch
from torch import Tensor

from tatr.core.errors import TatrError, UnreadableCheckpoint
from tatr.core.torch_unpickler import (
    CraftedPickle,
    Inert,
    NeedsTrust,
    Refused,
    StorageRef,
    TensorSpec,
    TorchUnpickler,
    checked_pickle,
    recheck,
)

__all__ = ["Inert", "Loaded", "NeedsTrust", "Refused", "StorageRef", "TensorSpec", "read"]

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001
_PARSE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RuntimeError,  # torch.device("no such device") and friends
    RecursionError,
    MemoryError,
    struct.error,
)
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    ValueError,
    EOFError,
    NotImplementedError,
    KeyError,
    OverflowError,
    RuntimeError,
    struct.error,
)


@dataclass
class Loaded:
    """An unpickled file whose tensors are `TensorSpec`s, plus where each storage's bytes lie."""

    path: Path
    obj: Any
    offsets: dict[str, int]
    refusals: list[Refused]
    checked: dict[str, tuple[torch.dtype, int]]  # storage key → (dtype, bytes), as checked against the file

    def check(self) -> None:
        """Refuse the file if any tensor anywhere in it was crafted, even one tatr does not use."""
        if self.refusals:
            raise TatrError(f"{self.path}: {self.refusals[0].reason}")

    def tensor(self, spec: TensorSpec, made: dict[str, torch.UntypedStorage] | None = None) -> Tensor:
        """`spec` made real: its storage's bytes (and only those) read into memory the tensor owns.

        Pass one `made` dict for a whole state dict, so that specs of one storage (tied weights)
        become views of one storage as `torch.load` makes them; separate calls share nothing.
        No memory map: a private writable mapping of a file larger than memory is refused by the
        kernel, and a read-only one would crash on the first in-place write.
        """
        self.check()
        problem = recheck(spec, self.checked)  # a pickle cannot rewrite a spec (Sealed); checked again anyway
        if problem is not None:
            raise TatrError(f"{self.path}: refusing a crafted or damaged tensor ({problem})")
        made = {} if made is None else made
        key = spec.storage.key
        if key not in made:
            data = allocate(self.path, f"storage '{key}'", spec.storage.nbytes)
            with open(self.path, "rb") as fh:
                fh.seek(self.offsets[key])
                if fh.readinto(data) != len(data):
                    raise UnreadableCheckpoint(f"{self.path}: cannot read this file: storage '{key}' is truncated")
            made[key] = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        return torch.empty(0, dtype=spec.dtype).set_(made[key], spec.offset, spec.size, spec.stride)


def allocate(path: Path, what: str, nbytes: int) -> bytearray:
    """A zeroed buffer for `nbytes` of the file, or one line if the machine cannot hold them."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        total = 0
    if total and nbytes > total:
        raise TatrError(
            f"{path}: {what} holds {nbytes / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} GiB of memory here"
        )
    try:
        return bytearray(nbytes)
    except MemoryError:
        raise TatrError(f"{path}: {what} holds {nbytes / 2**30:,.1f} GiB, more than the memory free now") from None


def read(path: Path, strict: bool) -> Loaded:
    """Parse a torch file and check every tensor in it; refuse anything `torch.load` would route elsewhere."""
    stat = path.stat()
    if not S_ISREG(stat.st_mode):
        raise UnreadableCheckpoint(f"{path}: cannot read this file: not a regular file")
    size = stat.st_size
    if size == 0:
        raise UnreadableCheckpoint(f"{path}: cannot read this file: it is empty")
    with open(path, "rb") as fh:
        head = fh.read(4)
    try:
        if head == ZIP_MAGIC:
            return _read_zip(path, size, strict)
        if _is_tar(path):
            raise UnreadableCheckpoint(
                f"{path}: a legacy tar-format torch checkpoint (torch < 0.4); tatr does not read this format"
            )
        return _read_legacy(path, size, strict)
    except OSError as exc:
        raise UnreadableCheckpoint(f"{path}: cannot read this file ({exc.strerror or type(exc).__name__})") from None
    except CraftedPickle as exc:
        raise UnreadableCheckpoint(f"{path}: refusing a crafted file ({exc})") from None
    except _PARSE_ERRORS as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise UnreadableCheckpoint(
            f"{path}: cannot read this file: it is damaged, truncated or not a torch checkpoint "
            f"({type(exc).__name__}{': ' + detail if detail else ''})"
        ) from None


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, ValueError, EOFError):
        return False


def _read_zip(path: Path, size: int, strict: bool) -> Loaded:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except _ZIP_ERRORS as exc:
        raise UnreadableCheckpoint(f"{path}: cannot read this file: a damaged zip archive ({exc})") from None
    prefixes = {info.filename.partition("/")[0] for info in infos}
    if len(prefixes) != 1 or any("/" not in info.filename for info in infos):
        raise UnreadableCheckpoint(f"{path}: cannot read this file: a zip archive, but not one torch.save wrote")
    records = {info.filename.partition("/")[2]: info for info in infos}
    if len(records) != len(infos):
        raise UnreadableCheckpoint(f"{path}: cannot read this file: the zip archive names one entry twice")
    if "constants.pkl" in records or any(name.startswith(("code/", "extra/")) for name in records):
        raise TatrError(
            f"{path}: a TorchScript archive; tatr never loads TorchScript, even with --trust-pickle, because "
            "loading it runs the archive's code (if you trust it, torch.jit.load it yourself and save its state_dict())"
        )
    if "data.pkl" not in records:
        raise UnreadableCheckpoint(f"{path}: cannot read this file: a zip without data.pkl, not a torch.save file")
    offsets: dict[str, int] = {}
    with open(path, "rb") as fh:
        for name, info in records.items():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise UnreadableCheckpoint(f"{path}: cannot read this file: entry '{name}' is compressed")
            if not 0 <= info.header_offset < size:
                raise UnreadableCheckpoint(f"{path}: cannot read this file: entry '{name}' lies outside the file")
            fh.seek(info.header_offset)
            local = fh.read(30)
            if len(local) != 30 or local[:4] != ZIP_MAGIC:
                raise UnreadableCheckpoint(f"{path}: cannot read this file: entry '{name}' has a damaged header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offsets[name] = info.header_offset + 30 + name_len + extra_len
            if offsets[name] + info.file_size > size:
                raise UnreadableCheckpoint(f"{path}: cannot read this file: entry '{name}' runs past the end")
        order = records.get("byteorder")
        if order is not None:
            fh.seek(offsets["byteorder"])
            if fh.read(order.file_size) != b"little":
                raise UnreadableCheckpoint(f"{path}: cannot read this file: not a little-endian checkpoint")
        fh.seek(offsets["data.pkl"])
        data = fh.read(records["data.pkl"].file_size)
    sizes = {name: info.file_size for name, info in records.items() if name.startswith("data/")}
    unpickler = TorchUnpickler(io.BytesIO(checked_pickle(io.BytesIO(data))), sizes, strict)
    obj = unpickler.load()
    storage_offsets = {key: offsets[f"data/{key}"] for key in unpickler.checked}
    return Loaded(path, obj, storage_offsets, unpickler.refusals, unpickler.checked)


def _read_legacy(path: Path, size: int, strict: bool) -> Loaded:
    """torch.save(..., _use_new_zipfile_serialization=False): magic, protocol, sys info, the
    pickle, the storage keys, then each storage as an int64 element count and its bytes.

    The file is mapped read-only (never accounted against memory) and each pickle is cut out of
    it by `checked_pickle` before an unpickler sees it.
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for expected in (LEGACY_MAGIC, LEGACY_PROTOCOL):
            if _load_plain(checked_pickle(mm)) != expected:
                raise UnreadableCheckpoint(
                    f"{path}: cannot read this file: not a torch checkpoint "
                    "(neither a torch.save zip archive nor a legacy torch pickle)"
                )
        info = _load_plain(checked_pickle(mm))
        if not (isinstance(info, dict) and info.get("little_endian") is True):
            raise UnreadableCheckpoint(f"{path}: cannot read this file: not a little-endian checkpoint")
        unpickler = TorchUnpickler(io.BytesIO(checked_pickle(mm)), None, strict)
        obj = unpickler.load()
        keys = _load_plain(checked_pickle(mm))
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise pickle.UnpicklingError("the storage list is not a list of names")
        if len(set(keys)) != len(keys) or set(keys) != set(unpickler.checked):
            raise pickle.UnpicklingError("the storage list does not match the storages the pickle uses")
        offsets: dict[str, int] = {}
        pos = mm.tell()
        for key in keys:
            dtype, nbytes = unpickler.checked[key]
            count = mm[pos : pos + 8]
            if len(count) != 8 or struct.unpack("<q", count)[0] * dtype.itemsize != nbytes:
                raise pickle.UnpicklingError(f"storage '{key}' does not hold the {nbytes:,} bytes it claims")
            offsets[key] = pos + 8
            pos += 8 + nbytes
            if pos > size:
                raise pickle.UnpicklingError(f"storage '{key}' runs past the end of the file")
    return Loaded(path, obj, offsets, unpickler.refusals, unpickler.checked)


def _load_plain(data: bytes) -> Any:
    """One pickle of plain values (the legacy header and key list): no globals at all."""

    class _Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    return _Plain(io.BytesIO(data), encoding="utf-8").load()
