"""A PEFT LoRA adapter folder as a fine-tuned checkpoint: θ_t = θ_0 + scaling · B·A per target module.

Why read adapters directly: most LLM fine-tunes are shipped as adapters, and a task vector is exactly the
update PEFT's `merge_and_unload()` adds to each targeted weight. The update follows PEFT 0.21's `LoraLayer`
(`tuners/lora/layer.py::Linear.get_delta_weight` and `merge`): Δ = transpose(B @ A, fan_in_fan_out) · scaling,
scaling = alpha / r, or alpha / √r with `use_rslora`; r from the saved A (`rank_pattern` is how PEFT gave it
that shape), alpha from `alpha_pattern` by PEFT's `get_pattern_key`, else `lora_alpha`; fp16/bf16 factors are
multiplied in float32 and the product cast back, and θ_0's weight gets `+= Δ.to(its dtype)`, as PEFT does on the
CPU. Keys not targeted are θ_0's. Refused with one line: DoRA, LoRA biases, modules saved whole
(`modules_to_save`), embedding or convolution LoRA, and anything but a LoRA adapter (`peft_type`).

The adapter's config is untrusted JSON (read by `tatr.core.model_folders.json_object`); its weights are
`adapter_model.safetensors`, read per key as any safetensors file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tatr.core.checkpoints import Source, header, read_tensor
from tatr.core.errors import TatrError
from tatr.core.model_folders import contained, json_object, roots

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's saved keys: <prefix><module path>.lora_A.weight


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def get_pattern_key(pattern_keys: Any, key_to_match: str) -> str:
    """peft/utils/other.py::get_pattern_key (0.21), literally."""
    for key in pattern_keys:
        match = re.match(rf"(.*\.)?({key})$", key_to_match)
        if not match:
            continue
        return key
    return key_to_match


class LoraAdapter:
    """θ_t of an adapter over `base`: the same keys and dtypes as θ_0, each targeted weight moved by its Δ."""

    def __init__(self, folder: Path, base: Source) -> None:
        self.folder, self.base = folder, base
        where = roots(folder)
        config = json_object(contained(folder, CONFIG, where, CONFIG))
        self.weights = contained(folder, WEIGHTS, where, WEIGHTS)
        self._config = _checked(config, folder)
        self._modules = self._factors()

    def __str__(self) -> str:
        return str(self.folder)

    def header(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return header(self.base)

    def tensor(self, key: str) -> Tensor:
        theta0 = read_tensor(self.base, key)
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module not in self._modules:
            return theta0
        return theta0.clone().add_(self.delta(module, theta0).to(theta0.dtype))

    def delta(self, module: str, theta0: Tensor) -> Tensor:
        a_key, b_key = self._modules[module]
        a, b = read_tensor(self.weights, a_key), read_tensor(self.weights, b_key)
        cfg = self._config
        r = a.shape[0]
        alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), module), cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        cast = a.dtype in (torch.float16, torch.bfloat16)
        product = (b.float() @ a.float()) if cast else b @ a
        out = (product.T if cfg["fan_in_fan_out"] else product) * scaling
        out = out.to(a.dtype) if cast else out
        if tuple(out.shape) != tuple(theta0.shape):
            raise TatrError(
                f"{self.folder}: module '{module}': B·A is {list(out.shape)}, the base weight is {list(theta0.shape)}"
            )
        return out

    def _factors(self) -> dict[str, tuple[str, str]]:
        keys = set(header(self.weights))
        base_keys = set(header(self.base))
        modules: dict[str, tuple[str, str]] = {}
        for key in sorted(keys):
            if not key.startswith(PREFIX):
                raise TatrError(f"{self.weights}: key '{key}' is not a PEFT adapter key ({PREFIX}…)")
            if ".lora_embedding_" in key or ".lora_magnitude_vector" in key:
                raise TatrError(f"{self.weights}: key '{key}': only LoRA on linear weights is supported")
            if key.endswith(".lora_A.weight"):
                module = key[len(PREFIX) : -len(".lora_A.weight")]
                b_key = f"{PREFIX}{module}.lora_B.weight"
                if b_key not in keys:
                    raise TatrError(f"{self.weights}: key '{key}' has no lora_B beside it")
                if f"{module}.weight" not in base_keys:
                    raise TatrError(f"{self.folder}: targets '{module}', which the base model has no weight for")
                modules[module] = (key, b_key)
            elif not key.endswith(".lora_B.weight"):
                raise TatrError(f"{self.weights}: key '{key}' is not a LoRA factor (lora_A or lora_B weight)")
        if not modules:
            raise TatrError(f"{self.weights}: holds no LoRA factors")
        return modules


def _checked(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config keys the update reads, refusing what tatr does not compute (see the module docstring)."""
    where = folder / CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise TatrError(f"{where}: peft_type {config.get('peft_type')!r} is not a LoRA adapter")
    if config.get("use_dora"):
        raise TatrError(f"{where}: DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise TatrError(f"{where}: LoRA biases (bias={config.get('bias')!r}) are not supported")
    if config.get("modules_to_save"):
        raise TatrError(f"{where}: modules_to_save {config['modules_to_save']!r} are not supported")
    alpha = config.get("lora_alpha", 8)
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not isinstance(patterns, dict):
        raise TatrError(f"{where}: lora_alpha must be a number and alpha_pattern an object")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in patterns.values()):
        raise TatrError(f"{where}: alpha_pattern values must be numbers")
    return {
        "lora_alpha": alpha,
        "alpha_pattern": patterns,
        "use_rslora": bool(config.get("use_rslora", False)),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
    }


def lora_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) with B·A the best rank-`rank` approximation of `delta`, as PEFT's `add_weighted_adapter` SVD
    combinations cut it (`_svd_generalized_task_arithmetic_weighted_adapter`, no clamp): B = U_r·diag(S_r),
    A = Vhᵣ, so the adapter's scaling is 1 (lora_alpha = r). Computed in float32, returned in `delta`'s dtype."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    return vh[:r, :].to(delta.dtype).contiguous(), (u[:, :r] @ torch.diag(s[:r])).to(delta.dtype).contiguous()
