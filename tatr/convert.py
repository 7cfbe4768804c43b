"""Checkpoint conversions into open_clip's visual-tower layout (`visual.*` keys), as safetensors.

Three sources of fine-tuned CLIP image encoders exist in the wild:

* plain state dicts (`.safetensors`, `.pt`) in open_clip's layout, whole model or visual tower;
* the task_vectors release, which `torch.save`s whole `src.modeling.ImageEncoder` modules (a
  pickle that names classes of a repository that is not installed, and of an old open_clip);
* Hugging Face `CLIPVisionModel` checkpoints, as FusionBench publishes them
  (`tanganke/clip-vit-base-patch32_<task>`), whose keys and attention layout differ.

`load_any` reads all three and returns the visual tower under open_clip's names; `tatr convert`
writes it once to safetensors so that every later read is memory-mapped and free of pickle.

Pickles are read with `SafeUnpickler`: it resolves only the globals that
`torch.load(weights_only=True)` allows (tensor rebuilders, storages, dtypes, OrderedDict, set)
and replaces every other class or function the file names with an inert stand-in that records
its arguments and state. No code of the file's classes runs (no `__init__`, no `__setstate__`,
no `__reduce__` callable), and `nn.Module` parameters are collected from the recorded
`_parameters`/`_buffers`/`_modules` dictionaries. Residual risk: the bytes still go through
Python's unpickler and torch's tensor rebuilders (the same surface as `weights_only=True`), and a
file that stores its tensors through its own reduce functions cannot be read this way; only then
is `trust_pickle=True` (`--trust-pickle`) needed, which runs `torch.load(weights_only=False)`, i.e.
arbitrary code from the file, and needs the file's classes importable.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import pickle
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tatr.checkpoints import load_state_dict, save_state_dict
from tatr.errors import PickledObjectError, TatrError

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
# safe unpickling of whole-module checkpoints


class _Inert:
    """Stand-in for a class or function named by a pickle: records, never executes."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_state", None)
        object.__setattr__(obj, "_items", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(*args)

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


def _allowed_globals() -> dict[str, Any]:
    """The globals torch's own weights-only unpickler resolves (tensors, storages, dtypes, ...)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
    except Exception:  # pragma: no cover - private API moved; fall back to the essentials
        import collections

        import torch._utils

        allowed = {
            "collections.OrderedDict": collections.OrderedDict,
            "builtins.set": set,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
            "torch.Tensor": torch.Tensor,
            "torch.nn.parameter.Parameter": torch.nn.Parameter,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
        }
    allowed["builtins.frozenset"] = frozenset
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Resolve only allowlisted globals; everything else becomes an `_Inert` subclass."""

    _allowed: dict[str, Any] | None = None
    _standins: dict[str, type] = {}  # noqa: RUF012 - shared cache of generated stand-in types

    def find_class(self, module: str, name: str) -> Any:
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()
        # protocol-2 pickles spell Python 3 names the Python 2 way (__builtin__.set); undo that
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        obj = SafeUnpickler._allowed.get(qualname)
        if obj is not None:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if qualname not in SafeUnpickler._standins:
            SafeUnpickler._standins[qualname] = type(name, (_Inert,), {"_qualname": qualname})
        return SafeUnpickler._standins[qualname]


def _safe_pickle_module() -> types.ModuleType:
    """A `pickle_module` for `torch.load` whose Unpickler is `SafeUnpickler`."""
    module = types.ModuleType("tatr_safe_pickle")
    module.Unpickler = SafeUnpickler  # type: ignore[attr-defined]
    module.load = lambda fh, **kw: SafeUnpickler(fh, **kw).load()  # type: ignore[attr-defined]
    module.loads = lambda data, **kw: SafeUnpickler(io.BytesIO(data), **kw).load()  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


class PickleNeedsTrust(TatrError):
    """The file's tensors cannot be recovered without running its pickled code."""


def _state_of(obj: _Inert) -> dict[str, Any] | None:
    state = obj._state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
        state = state[0]  # (dict state, slot state)
    return state if isinstance(state, dict) else None


def _is_module(obj: Any) -> bool:
    state = _state_of(obj) if isinstance(obj, _Inert) else None
    return state is not None and "_parameters" in state and "_modules" in state


def module_state_dict(obj: Any, path: Path, prefix: str = "") -> dict[str, Tensor]:
    """`nn.Module.state_dict()` of a pickled module, rebuilt from its recorded attributes."""
    state = _state_of(obj)
    assert state is not None
    out: dict[str, Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    entries = list((state.get("_parameters") or {}).items())
    entries += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in skip]
    for name, value in entries:
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise PickleNeedsTrust(
                f"{path}: '{prefix}{name}' is stored as {value!r}, which cannot be rebuilt without running "
                "code from the file; if you trust it, rerun with --trust-pickle (see README, 'Checkpoint formats')"
            )
        out[prefix + name] = value.detach()  # a plain tensor sharing the storage: no copy of the model
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not _is_module(child):
            raise PickleNeedsTrust(
                f"{path}: submodule '{prefix}{name}' ({child!r}) is not stored as a plain module; "
                "if you trust the file, rerun with --trust-pickle"
            )
        out.update(module_state_dict(child, path, f"{prefix}{name}."))
    return out


def load_pickled_module(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """State dict of a `torch.save`d whole module (or a pickled mapping of tensors)."""
    path = Path(path)
    if trust_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise TatrError(
                f"{path}: --trust-pickle needs the classes the file names to be importable ({exc}); "
                "e.g. put the task_vectors repository on PYTHONPATH"
            ) from None
        if isinstance(obj, torch.nn.Module):
            return dict(obj.state_dict())
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_safe_pickle_module())
        except (pickle.UnpicklingError, TypeError, AttributeError, ValueError, EOFError, RuntimeError) as exc:
            raise PickleNeedsTrust(
                f"{path}: cannot read this pickle without running its code ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:100]}); if you trust the file, rerun with --trust-pickle"
            ) from None
        if _is_module(obj):
            return module_state_dict(obj, path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    kind = getattr(obj, "_qualname", type(obj).__name__)
    raise TatrError(f"{path}: the pickle holds a {kind}, neither a module nor a mapping of tensors")


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


def read_hf_dir(folder: Path) -> dict[str, Tensor]:
    """Weights of a `save_pretrained` folder: model.safetensors, shards, or pytorch_model.bin."""
    config = folder / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type", "")
        if model_type not in ("clip_vision_model", "clip"):
            raise TatrError(f"{config}: model_type '{model_type}' is not a CLIP vision model")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return load_state_dict(folder / name)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_state_dict(folder / shard))
        return out
    raise TatrError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


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
    import open_clip
    from open_clip.model import _build_vision_tower

    config = open_clip.get_model_config(model_name)
    if config is None:
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise TatrError(f"unknown open_clip model '{model_name}'{hint}")
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
    save_state_dict(converted.state_dict, out, metadata=converted.metadata(src))
    return converted
