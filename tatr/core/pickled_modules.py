"""State dicts of `torch.save`d whole modules (the task_vectors release), without running their code.

The file is parsed by `tatr.core.torchfile` (no code runs, crafted tensors are refused before anything
is allocated); every class the file names is an inert stand-in recording its arguments and
state, so an `nn.Module`'s parameters are collected from its recorded
`_parameters`/`_buffers`/`_modules` dictionaries. Only a parameter slot holding a stand-in, i.e.
a tensor the file stores through its own reduce function, leads to the `--trust-pickle`
suggestion; damaged files never do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tatr.core import torchfile
from tatr.core.checkpoints import check_dtype, describe_value, state_dict_specs, tensor_spec
from tatr.core.errors import PickleNeedsTrust, TatrError, UnreadableCheckpoint
from tatr.core.torchfile import Inert, TensorSpec


def _state_of(obj: Inert) -> dict[str, Any] | None:
    state = obj._state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
        state = state[0]  # (dict state, slot state)
    return state if isinstance(state, dict) else None


def _is_module(obj: Any) -> bool:
    state = _state_of(obj) if isinstance(obj, Inert) else None
    return state is not None and "_parameters" in state and "_modules" in state


def module_state_dict(obj: Any, path: Path, prefix: str = "", depth: int = 0) -> dict[str, TensorSpec]:
    """`nn.Module.state_dict()` of a pickled module, rebuilt from its recorded attributes.

    A parameter or buffer slot that holds an inert stand-in is a tensor the file stores through
    its own reduce function: only then is `--trust-pickle` suggested.
    """
    if depth > _MAX_DEPTH:
        raise UnreadableCheckpoint(f"{path}: cannot read this file: modules nested more than {_MAX_DEPTH} deep")
    state = _state_of(obj)
    assert state is not None
    out: dict[str, TensorSpec] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    entries = list(_items(state.get("_parameters"), path, prefix))
    entries += [(k, v) for k, v in _items(state.get("_buffers"), path, prefix) if k not in skip]
    for name, value in entries:
        if value is None:
            continue
        if isinstance(value, Inert):
            raise PickleNeedsTrust(
                f"{path}: '{prefix}{name}' is stored as {value!r}, which cannot be rebuilt without running "
                "code from the file; if you trust it, rerun with --trust-pickle (see README, 'Checkpoint formats')"
            )
        out[prefix + name] = tensor_spec(value, path, prefix + name)
    for name, child in _items(state.get("_modules"), path, prefix):
        if child is None:
            continue
        if not _is_module(child):
            raise PickleNeedsTrust(
                f"{path}: submodule '{prefix}{name}' ({child!r}) is not stored as a plain module; "
                "if you trust the file, rerun with --trust-pickle"
            )
        out.update(module_state_dict(child, path, f"{prefix}{name}.", depth + 1))
    return out


_MAX_DEPTH = 200


def _items(table: Any, path: Path, prefix: str) -> list[tuple[str, Any]]:
    if table is None:
        return []
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise UnreadableCheckpoint(f"{path}: cannot read this file: module '{prefix}' has a malformed attribute table")
    return list(table.items())


def load_pickled_module(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """State dict of a `torch.save`d whole module (or a pickled mapping of tensors).

    The file is always parsed first by `tatr.core.torchfile` (no code runs): TorchScript archives,
    legacy tar files, damaged files and crafted tensors are refused there, with or without
    `trust_pickle`. Without it, the module's parameters are collected from the recorded
    attributes (see the module docstring). With it, `torch.load(weights_only=False)` runs the
    file's code and needs its classes importable; TorchScript stays refused even then, because
    it is a program rather than a checkpoint: `torch.jit.load` it yourself and save `state_dict()`.
    """
    path = Path(path)
    loaded = torchfile.read(path, strict=False)
    loaded.check()
    if trust_pickle:
        return _trusted_load(path)
    obj = loaded.obj
    if _is_module(obj):
        specs = module_state_dict(obj, path)
    elif isinstance(obj, dict):
        specs = state_dict_specs(obj, path)
    else:
        raise TatrError(f"{path}: expected a state dict or a pickled module, found {describe_value(obj)}")
    made: dict[str, torch.UntypedStorage] = {}  # one per storage: tied weights stay tied
    return {key: loaded.tensor(spec, made) for key, spec in specs.items()}


def _trusted_load(path: Path) -> dict[str, Tensor]:
    """`torch.load(weights_only=False)`: runs the file's code. Called only after `torchfile.read`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise TatrError(
            f"{path}: --trust-pickle needs the classes the file names to be importable ({exc}); "
            "e.g. put the task_vectors repository on PYTHONPATH"
        ) from None
    except Exception as exc:  # the file's own code failed: its error, in one line
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise TatrError(f"{path}: loading with --trust-pickle failed ({type(exc).__name__}: {detail})") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise TatrError(f"{path}: expected a state dict or a pickled module, found {describe_value(obj)}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TatrError(f"{path}: key {key!r} is not a string; a state dict maps names to tensors")
        if not isinstance(value, Tensor):
            raise TatrError(f"{path}: key '{key}': holds {describe_value(value)}, not a tensor")
        if value.layout != torch.strided:
            raise TatrError(f"{path}: key '{key}': a {value.layout} tensor (tatr reads dense, strided tensors only)")
        check_dtype(value.dtype, path, key)
    return {key: value.detach() for key, value in obj.items()}
