"""Checkpoint conversions into open_clip's visual-tower layout (`visual.*` keys), as safetensors.

Three sources of fine-tuned CLIP image encoders exist in the wild:

* plain state dicts (`.safetensors`, `.pt`) in open_clip's layout, whole model or visual tower;
* the task_vectors release, which `torch.save`s whole `src.modeling.ImageEncoder` modules (a
  pickle that names classes of a repository that is not installed, and of an old open_clip);
* Hugging Face `CLIPVisionModel` checkpoints, as FusionBench publishes them
  (`tanganke/clip-vit-base-patch32_<task>`), whose keys and attention layout differ.

`load_any` reads all three and returns the visual tower under open_clip's names; `tatr convert`
writes it once to safetensors so that every later read is key by key and free of pickle.

Pickles are read by `tatr.core.pickled_modules` over `tatr.core.torchfile`, never by `torch.load`: it
resolves only an explicit
allowlist (tensor rebuilders, which it checks, storages, dtypes, OrderedDict, set) and replaces
every other class or function the file names with an inert stand-in that records its arguments
and state. No code of the file's classes runs (no `__init__`, no `__setstate__`, no `__reduce__`
callable), and `nn.Module` parameters are collected from the recorded
`_parameters`/`_buffers`/`_modules` dictionaries. TorchScript archives, legacy tar files and
damaged files are refused by their bytes, and crafted tensors before anything is allocated.
Residual risk: the bytes still go through Python's unpickler. A file that stores its tensors
through its own reduce functions cannot be read this way; only then is `--trust-pickle`
suggested, which runs `torch.load(weights_only=False)`, i.e. arbitrary code from the file
(after the same checks), and needs the file's classes importable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tatr.core.checkpoints import load_state_dict, save_state_dict
from tatr.core.errors import PickledObjectError, PickleNeedsTrust, TatrError
from tatr.core.outputs import check_output
from tatr.core.pickled_modules import load_pickled_module, module_state_dict
from tatr.suites.clip8.hf_folder import read_hf_dir

__all__ = [  # re-exported: the pickle and folder readers live in their own modules
    "PickleNeedsTrust",
    "convert",
    "load_any",
    "load_pickled_module",
    "module_state_dict",
    "read_hf_dir",
]

VISUAL = "visual."
FORMATS = ("auto", "state-dict", "task-vectors", "hf")
# Metadata key listing visual keys the source lacks because they were frozen during fine-tuning
# (HF CLIPVisionModel has no projection): consumers take them from θ_0, and only these.
FROM_PRETRAINED = "tatr.from_pretrained"


@dataclass
class Converted:
    """A visual tower in open_clip's layout plus what the conversion did, for the user."""

    state_dict: dict[str, Tensor]
    source_format: str
    dropped: list[str] = field(default_factory=list)  # non-visual keys left out (text tower, ...)
    from_pretrained: list[str] = field(default_factory=list)  # frozen keys the source lacks

    def metadata(self, source: Path) -> dict[str, str]:
        return {
            "tatr.format": "open_clip-visual",
            "tatr.source_format": self.source_format,
            "tatr.source": source.name,
            FROM_PRETRAINED: ",".join(self.from_pretrained),
        }


# ---------------------------------------------------------------------------------------------
# key layouts


_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_MAP = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_TOP_MAP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}


def is_hf_vision(keys: Any) -> bool:
    return any(k.endswith("embeddings.patch_embedding.weight") for k in keys)


def hf_vision_to_open_clip(sd: Mapping[str, Tensor], source: str = "<state dict>") -> Converted:
    """Map a HF `CLIPVisionModel` (or `CLIPModel`) state dict to open_clip's `visual.*` keys.

    HF keeps q, k and v as three Linear layers; open_clip's `nn.MultiheadAttention` keeps one
    `in_proj` stacked in the order q, k, v, which is what `torch.cat` reproduces. The projection
    is `visual_projection.weight` transposed; `CLIPVisionModel` has none (FusionBench froze it),
    so it is listed in `from_pretrained`. Every other key must be consumed: nothing is skipped
    silently.
    """
    vision: dict[str, Tensor] = {}
    dropped: list[str] = []
    proj = None
    for key, value in sd.items():
        if key == "visual_projection.weight":
            proj = value
        elif key.startswith("vision_model."):
            vision[key[len("vision_model.") :]] = value
        elif key.startswith(("text_model.", "text_projection.", "logit_scale")):
            dropped.append(key)
        else:
            vision[key] = value
    out: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for key, value in vision.items():
        if key == "embeddings.position_ids":
            continue  # a buffer of arange indices, not a parameter
        if key in _HF_TOP_MAP:
            out[VISUAL + _HF_TOP_MAP[key]] = value
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            raise TatrError(f"{source}: key '{key}' is not part of a HF CLIP vision model")
        layer, rest = int(match.group(1)), match.group(2)
        qkv_match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv_match:
            qkv.setdefault(layer, {})[f"{qkv_match.group(1)}.{qkv_match.group(2)}"] = value
            continue
        module, _, leaf = rest.rpartition(".")
        if module not in _HF_LAYER_MAP:
            raise TatrError(f"{source}: key '{key}' is not part of a HF CLIP vision model")
        out[f"{VISUAL}transformer.resblocks.{layer}.{_HF_LAYER_MAP[module]}.{leaf}"] = value
    for layer, parts in qkv.items():
        for leaf in ("weight", "bias"):
            missing = [p for p in "qkv" if f"{p}.{leaf}" not in parts]
            if missing:
                raise TatrError(f"{source}: layer {layer} lacks self_attn.{missing[0]}_proj.{leaf}")
            stacked = torch.cat([parts[f"{p}.{leaf}"] for p in "qkv"], dim=0)
            out[f"{VISUAL}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = stacked
    from_pretrained: list[str] = []
    if proj is not None:
        out[VISUAL + "proj"] = proj.T.contiguous()
    else:
        from_pretrained.append(VISUAL + "proj")
    return Converted(out, "hf-clip-vision", sorted(dropped), from_pretrained)


def open_clip_visual(sd: Mapping[str, Tensor], source: str = "<state dict>") -> Converted:
    """Pick the visual tower out of an open_clip-like state dict, whatever wraps it.

    Accepts open_clip's full model (`visual.*` plus the text tower), task_vectors' `ImageEncoder`
    (`model.visual.*`), a bare `model.visual.state_dict()` (`conv1.weight`, ...), each possibly
    under DistributedDataParallel's `module.` prefix, and HF CLIP vision keys.
    """
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
        keys = list(sd)
    if is_hf_vision(keys):
        return hf_vision_to_open_clip(sd, source)
    if any(k.startswith("model." + VISUAL) for k in keys):
        prefix, fmt = "model." + VISUAL, "task-vectors"
    elif any(k.startswith(VISUAL) for k in keys):
        prefix, fmt = VISUAL, "open_clip"
    elif "conv1.weight" in sd and "class_embedding" in sd:
        prefix, fmt = "", "open_clip-visual-bare"
    else:
        shown = ", ".join(keys[:4])
        raise TatrError(
            f"{source}: not a CLIP image encoder in a known layout (keys start: {shown}); expected open_clip "
            "('visual.*'), task_vectors ('model.visual.*') or HF CLIPVisionModel ('vision_model.*') keys"
        )
    out = {VISUAL + k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = sorted(k for k in sd if not k.startswith(prefix))
    return Converted(out, fmt, dropped)


def load_any(path: str | Path, fmt: str = "auto", trust_pickle: bool = False, allow_pickle: bool = True) -> Converted:
    """Read a fine-tuned image encoder in any supported format as open_clip `visual.*` tensors.

    `allow_pickle=False` (the benchmark's loader) refuses whole-module pickles with a pointer to
    `tatr convert`, so that reading a pickle is always an explicit, one-time step.
    """
    path = Path(path).expanduser()
    if fmt not in FORMATS:
        raise TatrError(f"unknown checkpoint format '{fmt}' (known: {', '.join(FORMATS)})")
    if not path.exists():
        raise TatrError(f"{path}: no such file or folder")
    if path.is_dir():
        if fmt not in ("auto", "hf"):
            raise TatrError(f"{path}: a folder can only be a Hugging Face checkpoint (--from hf)")
        return hf_vision_to_open_clip(read_hf_dir(path), str(path))
    if fmt == "task-vectors" and allow_pickle:
        sd = load_pickled_module(path, trust_pickle)
    else:
        try:
            sd = load_state_dict(path)
        except PickledObjectError:
            if fmt == "state-dict":
                raise
            if not allow_pickle:
                raise TatrError(
                    f"{path}: a pickled whole-module checkpoint (the task_vectors format); convert it once with "
                    f"`tatr convert {path} <name>.safetensors --model <open_clip model>` and point the config at "
                    "the .safetensors file"
                ) from None
            sd = load_pickled_module(path, trust_pickle)
    converted = open_clip_visual(sd, str(path))
    if fmt == "hf" and converted.source_format != "hf-clip-vision":
        raise TatrError(f"{path}: --from hf given, but the keys are in the {converted.source_format} layout")
    return converted


# ---------------------------------------------------------------------------------------------
# architecture checks


def visual_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of open_clip's visual tower for `model_name`, built on the meta device (free)."""
    from open_clip.model import _build_vision_tower

    from tatr.suites.clip8.heads import model_config

    config = model_config(model_name)
    with torch.device("meta"):
        tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"])
    return {VISUAL + k: tuple(v.shape) for k, v in tower.state_dict().items()}


def check_architecture(
    sd: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    model_name: str,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Same keys and shapes as the model's visual tower, or one line naming the first mismatch."""
    for key, shape in expected.items():
        if key not in sd:
            if key in allow_missing:
                continue
            raise TatrError(f"{source}: key '{key}' is missing; not a {model_name} image encoder?")
        if tuple(sd[key].shape) != tuple(shape):
            raise TatrError(
                f"{source}: key '{key}' has shape {tuple(sd[key].shape)} but {model_name} expects {tuple(shape)}; "
                "is the checkpoint from a different architecture?"
            )
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise TatrError(f"{source}: key '{extra[0]}' does not exist in {model_name}'s image encoder")


def convert(
    src: str | Path,
    out: str | Path,
    fmt: str = "auto",
    model: str | None = None,
    trust_pickle: bool = False,
) -> Converted:
    """`tatr convert`: read `src`, check it against `model` when given, write safetensors."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise TatrError(f"{out}: the output must be a .safetensors file")
    if not src.exists():
        raise TatrError(f"{src}: no such file or folder")
    # before any reading: OUT must not be SRC (by inode, so `./x`, symlinks and hard links count)
    # nor inside a SRC folder, and must not be a folder, read-only or without a parent folder
    if src.is_dir() and src.resolve() in out.resolve().parents:
        raise TatrError(f"{out}: OUT is inside the folder being converted ({src}); choose a file outside it")
    inputs = [src]
    check_output(out, inputs, suffix=".safetensors", flag="OUT")
    converted = load_any(src, fmt, trust_pickle)
    if not converted.state_dict:
        raise TatrError(f"{src}: no image-encoder tensors found")
    for key, value in converted.state_dict.items():
        if not value.is_floating_point():
            raise TatrError(f"{src}: key '{key}' has dtype {value.dtype}; expected floating point weights")
    if model is not None:
        check_architecture(
            converted.state_dict, visual_shapes(model), str(src), model, tuple(converted.from_pretrained)
        )
    need = sum(v.numel() * v.element_size() for v in converted.state_dict.values())
    check_output(out, inputs, suffix=".safetensors", need_bytes=need + 2**20, flag="OUT")
    save_state_dict(converted.state_dict, out, metadata=converted.metadata(src))
    return converted
