"""Where `tatr merge` writes (shared by its flag path and its `--config` path, `tatr.cli.merge_config`).

Refused before any work, in one line each: an output that is (inside) an input, a non-empty folder that
is not an earlier tatr merge, a checkpoint-like suffix other than .safetensors, too little disk space.

The merge never hands the CLI a merged model in memory (`merge_target`): it writes a .safetensors file, a
model folder's shards (streamed, `tatr.io.model_folder_writer.ShardedFolder`), or, for a LoRA adapter, a
scratch file beside the output that the adapter's SVDs then read one tensor at a time.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tatr.cli.model_card import MARKER
from tatr.core.errors import TatrError
from tatr.core.outputs import check_output, make_tmp_dir, same_file
from tatr.io.model_folder_writer import ShardedFolder, streamed_model_folder

if TYPE_CHECKING:
    import torch

# file names --out refuses (a folder is any other name: model folders like `Llama-3.1-8B` have "suffixes")
FILE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".yaml", ".yml", ".npz", ".h5", ".msgpack")


def check_folder_output(
    out: Path, pretrained: Path, tokenizer_from: Path | None, inputs: list[Path], need_bytes: int
) -> Path:
    """Refuse a folder output tatr cannot write safely, before any work (one line each); returns the
    tokenizer's folder. A non-empty folder is replaced only when it is an earlier tatr merge (its card)."""
    if not (pretrained.is_dir() and (pretrained / "config.json").is_file()):
        raise TatrError(f"--out {out} is a folder, so -p must be a Hugging Face model folder with config.json")
    source = tokenizer_from if tokenizer_from is not None else pretrained
    if not source.is_dir():
        raise TatrError(f"{source}: --tokenizer-from must be a model folder")
    for item in inputs:
        if same_file(out, item) or (item.is_dir() and item.resolve() in out.resolve().parents):
            raise TatrError(f"{out}: --out is (inside) an input ({item}); choose another folder")
    if out.exists() and not out.is_dir():
        raise TatrError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        card = out / "README.md"
        if not (card.is_file() and MARKER in card.read_text(errors="replace")):
            raise TatrError(f"{out}: a folder that is not empty and not an earlier tatr merge; choose a new folder")
    where = out if out.is_dir() else out.parent  # the folder is built beside `out`, then moved in place
    check_output(where / "model.safetensors", [], need_bytes=need_bytes)
    return source


@contextlib.contextmanager
def merge_target(
    out: Path,
    kind: str,
    base: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    pretrained: Path,
    tokenizer_from: Path | None,
    shard_bytes: int,
    metadata: Mapping[str, str],
) -> Iterator[Path | ShardedFolder]:
    """Where `merge_once` writes `out` of `kind` "file" (`out` itself), "model" (a `ShardedFolder` over θ_0's
    header `base`: the caller sets its card, and the folder replaces `out` when the block ends) or "lora" (a
    scratch .safetensors in a temporary folder beside `out`, removed when the block ends, as on a failure)."""
    if kind == "file":
        yield out
    elif kind == "model":
        assert tokenizer_from is not None
        with streamed_model_folder(out, base, pretrained, tokenizer_from, shard_bytes, metadata) as folder:
            yield folder
    else:
        scratch = make_tmp_dir(out)
        try:
            yield scratch / "merged.safetensors"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def output_bytes(base: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The merged file's size, from θ_0's header: it has every key of θ_0 in its dtype."""
    total = sum(numel(shape) * dtype.itemsize for shape, dtype in base.values())
    return total + (1 << 20)  # the safetensors header and some slack


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
