"""A merged model written as a Hugging Face model folder that `from_pretrained` loads.

Why tatr writes the folder itself rather than through transformers: the merge streams tensors and keeps θ_0's
dtypes and keys exactly, and the core stays free of model libraries; what transformers needs beside the
weights is copied from the inputs. The folder gets: `config.json` and `generation_config.json` from the base,
the tokenizer files from the base (or `tokenizer_from`), the weights as `model.safetensors` or as shards of at
most `shard_bytes` with `model.safetensors.index.json` (cut and named by huggingface_hub, as `save_pretrained`
does; `{"format": "pt"}` metadata), and a `README.md` model card. A tied output embedding stays tied: a folder saved
with tied weights has no separate head tensor, so the merge has none either and the config's
`tie_word_embeddings` ties it on load. The folder appears whole or not at all (`atomic_dir`).

Streamed: the shard split depends only on the names, shapes and dtypes (θ_0's header), so it is planned before
the merge, every shard's header is written up front, and each merged tensor goes into its shard as soon as it
is computed (`streamed_model_folder`, a sink for the out-of-core merge, `tatr.core.out_of_core`): no merged
model is ever held. The in-memory merge writes through the same sink (`write_model_folder`), so both give the
same files byte for byte. The card is set last, since it reports the trust region's cut.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Container, Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from tatr.core.errors import TatrError
from tatr.core.outputs import atomic_dir
from tatr.core.streamed_safetensors import Layout, SafetensorsStream

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD = "5GB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' → bytes (transformers' decimal units, binary with 'iB')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if match is None or float(match.group(1)) <= 0:
        raise TatrError(f"--out-shard-size must be a size such as 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or "B"])


def shard_plan(layout: Layout, shard_bytes: int) -> dict[str, list[str]]:
    """File name → keys, by huggingface_hub's split (`split_state_dict_into_shards_factory`, the rule behind
    `split_torch_state_dict_into_shards`, which transformers' `save_pretrained` shards with): the same names,
    the same cut, the same single `model.safetensors`. Planned from names, shapes and dtypes alone, so that a
    streamed merge knows it before any tensor exists; a tensor's size is its own bytes (every key is written
    by itself, as `save_pretrained` writes tensors that own their storage)."""
    try:
        from huggingface_hub import constants, split_state_dict_into_shards_factory
    except ImportError:
        raise TatrError("--out FOLDER needs huggingface_hub (pip install huggingface_hub)") from None
    return split_state_dict_into_shards_factory(
        dict(layout),
        get_storage_size=lambda entry: _numel(entry[0]) * entry[1].itemsize,
        filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=shard_bytes,
    ).filename_to_tensors


class ShardedFolder:
    """A sink for merged tensors (`put`, `patch`: `tatr.core.out_of_core.Sink`) writing each into its shard of
    a folder being built: one `SafetensorsStream` per shard, its header written up front, its file opened
    only for each write. `card` (the README's text) is set by the caller once the merge has reported."""

    def __init__(self, folder: Path, layout: Layout, shard_bytes: int, metadata: Mapping[str, str]) -> None:
        self.layout = dict(layout)
        self.shards = shard_plan(self.layout, shard_bytes)
        self.file_of = {key: name for name, keys in self.shards.items() for key in keys}
        meta = {"format": "pt", **metadata}
        self.streams = {
            name: SafetensorsStream(folder / name, {k: self.layout[k] for k in keys}, meta)
            for name, keys in self.shards.items()
        }
        self.card: str | None = None

    def put(self, key: str, tensor: Tensor) -> None:
        self.streams[self.file_of[key]].put(key, tensor)

    def patch(self, key: str, flat_index: Tensor, values: Tensor) -> None:
        self.streams[self.file_of[key]].patch(key, flat_index, values)

    def finish(self, folder: Path) -> None:
        """Every shard complete (a tensor left unwritten is a bug: `RuntimeError`), then the index."""
        for stream in self.streams.values():
            stream.finish()
        if len(self.shards) > 1:
            total = sum(_numel(shape) * dtype.itemsize for shape, dtype in self.layout.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(self.file_of)}
            (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def streamed_model_folder(
    out: Path, layout: Layout, base: Path, tokenizer_from: Path, shard_bytes: int, metadata: Mapping[str, str]
) -> Iterator[ShardedFolder]:
    """Yield a `ShardedFolder` for θ_0's `layout` (key → (shape, dtype), in θ_0's order) in a temporary folder
    beside `out`; when the block ends with every tensor put and `card` set, the index, config, tokenizer and
    card are added and the folder replaces `out`. A failure anywhere leaves no folder and no temporary."""
    if not (base / "config.json").is_file():
        raise TatrError(f"{base}: has no config.json, so the merged folder could not be loaded; give a model folder")
    with atomic_dir(out) as tmp:
        folder = ShardedFolder(tmp, layout, shard_bytes, metadata)
        yield folder
        if folder.card is None:
            raise RuntimeError("streamed_model_folder: the model card was not set before the folder was committed")
        folder.finish(tmp)
        for name in CONFIG_FILES:
            _copy(base / name, tmp / name)
        for name in TOKENIZER_FILES:
            _copy(tokenizer_from / name, tmp / name)
        (tmp / "README.md").write_text(folder.card)


def write_model_folder(
    out: Path,
    state: Mapping[str, Tensor],
    base: Path,
    tokenizer_from: Path,
    shard_bytes: int,
    card: str,
    metadata: Mapping[str, str],
) -> list[str]:
    """Write the folder of an in-memory merge (see the module docstring); returns the weight files written."""
    layout = {key: (tuple(value.shape), value.dtype) for key, value in state.items()}
    with streamed_model_folder(out, layout, base, tokenizer_from, shard_bytes, metadata) as folder:
        for key, value in state.items():
            folder.put(key, value)
        folder.card = card
    return list(folder.shards)


def _copy(src: Path, dst: Path) -> None:
    """A regular file of the input folder (a link out of it is not followed), if present."""
    if src.is_file() and not src.is_symlink():
        shutil.copyfile(src, dst)


def lora_targets(state: Container[str], base_header: Mapping[str, tuple[tuple[int, ...], Any]]) -> list[str]:
    """The modules a LoRA output can carry: 2-D `<module>.weight` keys, embeddings left out (PEFT gives them
    their own factor names)."""
    return [
        key.removesuffix(".weight")
        for key, (shape, _) in base_header.items()
        if key.endswith(".weight") and len(shape) == 2 and "embed" not in key and key in state
    ]


def write_lora_folder(
    out: Path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    base: Path,
    rank: int,
    card: str,
    metadata: Mapping[str, str],
) -> None:
    """A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`, `README.md`) holding each
    module's (A, B); `lora_alpha = r`, so PEFT's scaling is 1 and B·A is the update itself."""
    tensors: dict[str, Tensor] = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt", **metadata})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= int(size)
    return n
