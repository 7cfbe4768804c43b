"""A merged model written as a Hugging Face model folder that `from_pretrained` loads.

Why tatr writes the folder itself rather than through transformers: the merge streams tensors and keeps θ_0's
dtypes and keys exactly, and the core stays free of model libraries; what transformers needs beside the
weights is copied from the inputs. The folder gets: `config.json` and `generation_config.json` from the base,
the tokenizer files from the base (or `tokenizer_from`), the weights as `model.safetensors` or as shards of at
most `shard_bytes` with `model.safetensors.index.json` (cut and named by huggingface_hub, as `save_pretrained`
does; `{"format": "pt"}` metadata), and a `README.md` model card. A tied output embedding stays tied: a folder saved
with tied weights has no separate head tensor, so the merge has none either and the config's
`tie_word_embeddings` ties it on load. The folder appears whole or not at all (`atomic_dir`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from tatr.core.checkpoints import untie
from tatr.core.errors import TatrError
from tatr.core.outputs import atomic_dir

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


def shard_plan(state: Mapping[str, Tensor], shard_bytes: int) -> dict[str, list[str]]:
    """File name → keys, by huggingface_hub's `split_torch_state_dict_into_shards`, the function transformers'
    `save_pretrained` shards with: the same names, the same cut, the same single `model.safetensors`."""
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
    except ImportError:
        raise TatrError("--out FOLDER needs huggingface_hub (pip install huggingface_hub)") from None
    return split_torch_state_dict_into_shards(dict(state), max_shard_size=shard_bytes).filename_to_tensors


def write_model_folder(
    out: Path,
    state: Mapping[str, Tensor],
    base: Path,
    tokenizer_from: Path,
    shard_bytes: int,
    card: str,
    metadata: Mapping[str, str],
) -> list[str]:
    """Write the folder (see the module docstring); returns the weight files written."""
    if not (base / "config.json").is_file():
        raise TatrError(f"{base}: has no config.json, so the merged folder could not be loaded; give a model folder")
    tensors = untie({k: v.contiguous() for k, v in state.items()})
    shards = shard_plan(tensors, shard_bytes)
    meta = {"format": "pt", **metadata}
    with atomic_dir(out) as tmp:
        for name, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(tmp / name), metadata=meta)
        if len(shards) > 1:
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            weight_map = {k: name for name, keys in shards.items() for k in keys}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for name in CONFIG_FILES:
            _copy(base / name, tmp / name)
        for name in TOKENIZER_FILES:
            _copy(tokenizer_from / name, tmp / name)
        (tmp / "README.md").write_text(card)
    return list(shards)


def _copy(src: Path, dst: Path) -> None:
    """A regular file of the input folder (a link out of it is not followed), if present."""
    if src.is_file() and not src.is_symlink():
        shutil.copyfile(src, dst)


def lora_targets(state: Mapping[str, Tensor], base_header: Mapping[str, tuple[tuple[int, ...], Any]]) -> list[str]:
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
