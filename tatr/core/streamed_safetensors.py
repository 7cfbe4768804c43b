"""A safetensors file written tensor by tensor, so a merge never holds the whole merged model.

Why not `safetensors.torch.save_file`: it takes every tensor at once. Here every key's shape and dtype
are known before the merge (they are θ_0's), so the header, with each tensor's byte range, is written
first and each tensor goes to its range as soon as it is computed; a range may be rewritten in place
before the file is committed (`patch`: TIES' zero-sum coordinates, whose sign is known only at the end).
The file is built under a temporary name and renamed into place (`tatr.core.outputs.atomic_write`), so it
appears complete or not at all; `finish` refuses to commit a file with a tensor left unwritten.

The layout is safetensors' own: an 8-byte little-endian header length, the JSON header padded with spaces
to a multiple of 8, then the tensors' bytes back to back (little-endian, row-major), ordered by dtype
size, largest first, then by name, so that every tensor starts aligned to its element size; `safe_open`
and `load_file` read it as any other safetensors file. The header is UTF-8 JSON without spaces, as
safetensors' own (serde_json) writes it; only the order of the `__metadata__` entries can differ (safetensors
writes them in a hash map's order, which changes from one process to the next), so a file written here is
byte-reproducible where `save_file`'s is not.

A stream may hold its file open (`fh`), or hold its path and open it for each write: a model folder written
as many shards at once (`tatr.io.model_folder_writer`) then keeps no file open between writes.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from tatr.core.errors import TatrError
from tatr.core.outputs import atomic_write

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # key -> (shape, dtype), as a checkpoint header


class SafetensorsStream:
    """Tensors written into their byte ranges of a file (open, or reopened per write) whose header `layout`
    fixed up front."""

    def __init__(self, fh: BinaryIO | Path, layout: Layout, metadata: Mapping[str, str] | None = None) -> None:
        """`fh`: an open file (written at its start), or the path of a file to create and reopen per write."""
        self.fh = fh
        self.layout = dict(layout)
        self.ranges: dict[str, tuple[int, int]] = {}
        entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        order = sorted(self.layout, key=lambda k: (-self.layout[k][1].itemsize, k))  # each range aligned
        for key in order:
            shape, dtype = self.layout[key]
            if dtype not in DTYPES:
                raise ValueError(f"safetensors cannot hold {dtype} ({key})")
            size = _numel(shape) * dtype.itemsize
            entries[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.ranges[key] = (offset, offset + size)
            offset += size
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self.start = 8 + len(text)
        self.total = self.start + offset
        with self._file(create=True) as out:
            out.write(struct.pack("<Q", len(text)) + text)
        self.written: set[str] = set()

    @contextlib.contextmanager
    def _file(self, create: bool = False) -> Iterator[BinaryIO]:
        """The open file, or the path opened for this one write (created the first time)."""
        if not isinstance(self.fh, Path):
            yield self.fh
            return
        with open(self.fh, "wb" if create else "r+b") as fh:
            yield fh

    def put(self, key: str, tensor: Tensor) -> None:
        """Write `key`'s tensor (its shape and dtype must be the layout's) into its range."""
        shape, dtype = self.layout[key]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{key}: {tuple(tensor.shape)} {tensor.dtype} is not the layout's {tuple(shape)} {dtype}")
        with self._file() as fh:
            fh.seek(self.start + self.ranges[key][0])
            fh.write(_bytes(tensor))
        self.written.add(key)

    def patch(self, key: str, flat_index: Tensor, values: Tensor) -> None:
        """Overwrite some coordinates of a written tensor (one tensor's bytes in memory, not the model)."""
        begin, end = self.ranges[key]
        dtype = self.layout[key][1]
        with self._file() as fh:
            fh.seek(self.start + begin)
            data = torch.frombuffer(bytearray(fh.read(end - begin)), dtype=dtype)
            data[flat_index] = values.to(dtype)
            fh.seek(self.start + begin)
            fh.write(_bytes(data))

    def finish(self) -> None:
        missing = sorted(set(self.layout) - self.written)
        if missing:
            raise RuntimeError(f"streamed safetensors: {len(missing)} tensors were not written (e.g. {missing[0]})")
        with self._file() as fh:
            fh.truncate(self.total)
            fh.flush()


@contextlib.contextmanager
def streamed_safetensors(
    path: str | Path, layout: Layout, metadata: Mapping[str, str] | None = None
) -> Iterator[SafetensorsStream]:
    """Yield a `SafetensorsStream` into a temporary file beside `path`; it becomes `path` only if the block
    succeeds and every tensor was written (a failure, a full disk included, leaves no file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TatrError(f"{path}: output must be a .safetensors file")
    with atomic_write(path, suffix=".safetensors") as tmp, open(tmp, "r+b") as fh:
        stream = SafetensorsStream(fh, layout, metadata)
        yield stream
        stream.finish()


def _bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes, row-major, without a copy when it is contiguous (numpy has no bfloat16)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
