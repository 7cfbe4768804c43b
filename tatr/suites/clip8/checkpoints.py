"""clip8's checkpoint files: where θ_t come from, and their normalisation into `visual.*` safetensors.

Why a module of its own: turning a user's fine-tuned file (any format `load_any` reads, any key
layout) into a safetensors file with exactly θ_0's keys, shapes and dtypes is file handling, apart
from the suite's model, heads and data. A file already in that layout is used in place; any other
is normalised once into the cache, content-addressed by the source file's identity and θ_0's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from tatr.core.cache import cached_dir, content_hash
from tatr.core.checkpoints import header, read_tensor, save_state_dict
from tatr.core.errors import TatrError
from tatr.suites.clip8 import heads as ch
from tatr.suites.clip8.convert import FROM_PRETRAINED, check_architecture, load_any

CACHE_FORMAT = 1  # part of every clip8 cache key: bump when a cached file's layout changes


def expand_path(path: str) -> Path:
    """`~` and `$VAR`/`${VAR}` expanded; an unset variable is an error, not a literal folder name."""
    expanded = os.path.expandvars(path)
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise TatrError(f"clip8: environment variable {unset.group(1)} in '{path}' is not set")
    return Path(expanded).expanduser()


def finetuned_source(spec: str | Mapping[str, str], task: str) -> Path:
    """The user's file for θ_t: `suite.finetuned` is a "{task}" pattern or a task → path mapping."""
    if isinstance(spec, Mapping):
        if task not in spec:
            raise TatrError(f"clip8: suite.finetuned has no entry for task '{task}' (it has: {', '.join(spec)})")
        path = expand_path(spec[task])
    else:
        if "{task}" not in spec:
            raise TatrError(f"clip8: suite.finetuned '{spec}' must contain '{{task}}' or be a task -> path mapping")
        path = expand_path(spec.replace("{task}", task))
    if not path.exists():
        raise TatrError(f"clip8: fine-tuned checkpoint for {task} not found: {path}")
    return path


def normalised_finetuned(
    src: Path, pretrained: Path, task: str, model: str, source_identity: object, cache_root: Path
) -> Path:
    """θ_t from `src` as `visual.*` safetensors matching θ_0 (`pretrained`): `src` itself when it
    already is one, else the cached normalised copy (built here on first use)."""
    expected = header(pretrained)
    if src.suffix == ".safetensors" and _usable_in_place(src, expected):
        return src
    key = content_hash("clip8-finetuned", CACHE_FORMAT, ch.fingerprint(src), source_identity)

    def build(folder: Path) -> None:
        converted = load_any(src, allow_pickle=False)
        shapes = {k: shape for k, (shape, _) in expected.items()}
        check_architecture(converted.state_dict, shapes, str(src), model, tuple(converted.from_pretrained))
        visual = {k: v.to(expected[k][1]) for k, v in converted.state_dict.items()}
        if converted.from_pretrained:
            visual.update({k: read_tensor(pretrained, k) for k in converted.from_pretrained})
        meta = {"task": task, "source": str(src), "source_format": converted.source_format}
        save_state_dict(visual, folder / "visual.safetensors", metadata=meta)

    return cached_dir(cache_root / "clip8" / "finetuned", key, build) / "visual.safetensors"


def _usable_in_place(path: Path, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> bool:
    """A safetensors file with exactly θ_0's keys, shapes and dtypes and nothing to fill in."""
    try:
        with safe_open(str(path), "numpy") as fh:  # the header only: no mapping of the whole file
            if (fh.metadata() or {}).get(FROM_PRETRAINED):
                return False
        found = header(path)
    except Exception:  # unreadable here means "normalise it", which reports the problem properly
        return False
    return found == dict(expected)
