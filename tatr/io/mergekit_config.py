"""A mergekit YAML (what `mergekit-yaml config.yml out/` reads) as a tatr merge, with mergekit 0.1.5's meaning.

Why tatr reads it: it is what LLM users already write. Each method is a configuration of tatr's one merge
(`tatr.core.methods`), so a `trust_region:` block adds the trust region to any of them:

| mergekit            | tatr method                 | normalize default | rescale default |
|---------------------|-----------------------------|-------------------|-----------------|
| `task_arithmetic`   | `ta`, weighted              | false             | (none)          |
| `ties`              | `mergekit-ties`             | true              | false           |
| `dare_linear`       | `mergekit-dare-linear`      | false             | true            |
| `dare_ties`         | `mergekit-dare-ties`        | false             | true            |
| `breadcrumbs`       | `mergekit-breadcrumbs`      | false             | false           |
| `breadcrumbs_ties`  | `mergekit-breadcrumbs-ties` | false             | false           |
| `linear`            | `ta` with weights w_t / Σw  | true              | (none)          |

Keys, as mergekit resolves them (`parameter_resolver.py`): a model's own `parameters:` first, then the
top-level `parameters:`. Per model: `weight` (required, any finite number; it multiplies the model's
sparsified delta), `density` (in (0, 1], default 1: the fraction of each tensor kept), `gamma` (breadcrumbs:
the largest fraction dropped first, default 0.01). Merge-wide (top level only, as mergekit reads them):
`normalize` (divide by the weights' sum; with a sign election per coordinate by the kept models' weights),
`rescale` (L1 rescaling after sparsification), `lambda` (scales the merged delta, default 1), `int8_mask`
(the dtype of mergekit's mask: no effect on the values, noted and ignored). `base_model` is θ_0 (required
except for linear); `dtype` is the dtype mergekit computes in, `out_dtype` that of the output (default:
`dtype`, else the inputs'); `tokenizer_source` is `base` or a model (default: the base's tokenizer).

`linear` (Σ_i w_i θ_i / Σ_i w_i over its inputs, the base among them when listed or named) is
θ_0 + Σ_t (w_t/Σw) τ_t, the same value in different arithmetic: it equals mergekit's output to the last
bit of the output dtype, not bit for bit (the other six are bit for bit with `dtype: float32`).

Refused in one line each: a key tatr does not read (`slices`, `modules`, `tokenizer`, `chat_template`,
`tokenizer_source: union`, a parameter the method does not take), a value given per tensor (a list or a
`filter:`), a number that is not finite or out of range, a model that is not a local folder or file
(`org/name`, `model+lora`: tatr downloads nothing; give the folder, or a PEFT adapter folder, which tatr
reads as a task vector of the base). Model paths resolve against the YAML's folder, then as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tatr.core.errors import TatrError
from tatr.core.merge_inputs import check_numbers
from tatr.core.methods import MergeMethod, get_method
from tatr.core.options import check_options
from tatr.core.trust_region import check_mode
from tatr.io.safe_yaml import as_flag, read_yaml_mapping


@dataclass(frozen=True)
class Kind:
    """One mergekit method: its tatr configuration, defaults and the parameters its spec declares."""

    method: str
    normalize: bool
    per_model: tuple[str, ...]  # NON_BASE / INPUT parameters
    shared: tuple[str, ...]  # merge-wide parameters
    rescale_option: str | None = None
    unused: tuple[str, ...] = ()  # declared by mergekit's spec but without effect for this method


_GTA_SHARED = ("normalize", "rescale", "lambda", "int8_mask")
KINDS = {
    "task_arithmetic": Kind("ta", False, ("weight", "density"), _GTA_SHARED, None, ("density", "rescale")),
    "ties": Kind("mergekit-ties", True, ("weight", "density"), _GTA_SHARED, "mergekit_rescale"),
    "dare_linear": Kind("mergekit-dare-linear", False, ("weight", "density"), _GTA_SHARED, "mergekit_dare_rescale"),
    "dare_ties": Kind("mergekit-dare-ties", False, ("weight", "density"), _GTA_SHARED, "mergekit_dare_rescale"),
    "breadcrumbs": Kind("mergekit-breadcrumbs", False, ("weight", "density", "gamma"), _GTA_SHARED, "mergekit_rescale"),
    "breadcrumbs_ties": Kind(
        "mergekit-breadcrumbs-ties", False, ("weight", "density", "gamma"), _GTA_SHARED, "mergekit_rescale"
    ),
    "linear": Kind("ta", True, ("weight",), ("normalize",)),
}
DTYPES = ("float32", "float64", "bfloat16", "float16")
PER_MODEL_OPTION = {"density": "mergekit_density", "gamma": "mergekit_gamma"}
DEFAULTS = {"density": 1.0, "gamma": 0.01, "lambda": 1.0}
NOT_READ = {  # top-level mergekit keys tatr refuses, with why
    "slices": "layer slices (frankenmerges) are not a merge of task vectors",
    "modules": "per-module definitions are not supported; use models:",
    "tokenizer": "tokenizer: blocks build new vocabularies; use tokenizer_source: base or a model",
    "chat_template": "tatr copies the tokenizer's files as they are",
}


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: dict[str, Any] | None = None


class _TrustRegion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: str = "zero-shot"
    q: float = 0.99
    gradients: list[str] | None = None
    signed_gradients: list[str] | None = None


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str
    models: list[_ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    trust_region: _TrustRegion | None = None


@dataclass(frozen=True)
class MergeRequest:
    """What `tatr merge --config` runs: the inputs, the configuration of the one merge and its numbers."""

    source: Path
    mergekit_method: str
    method: MergeMethod
    pretrained: Path
    finetuned: tuple[Path, ...]
    lam: float
    options: dict[str, object]
    trust_region: str = "off"
    q: float = 1.0
    gradients: tuple[Path, ...] | None = None
    signed_gradients: tuple[Path, ...] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_from: Path | None = None
    notes: tuple[str, ...] = field(default=())

    def settings(self) -> dict[str, object]:
        """The resolved configuration, for the model card and the output's metadata."""
        weights = self.method.weights or (1.0,) * len(self.finetuned)
        shown: dict[str, object] = {"config": self.source.name, "merge_method": self.mergekit_method}
        shown.update({"method": self.method.name, "weights": list(weights), "normalize": self.method.reduce == "mean"})
        shown.update({"lambda": self.lam, **self.options, "dtype": self.dtype, "out_dtype": self.out_dtype})
        shown.update({"trust_region": self.trust_region, "q": self.q})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in shown.items()}


def read_mergekit_config(path: str | Path) -> MergeRequest:
    """The merge a mergekit YAML asks for (module docstring); every problem is one line naming the file."""
    path = Path(path)
    raw = read_yaml_mapping(path, "mergekit configuration")
    for key, why in NOT_READ.items():
        if key in raw:
            raise TatrError(f"{path}: '{key}' is not supported by tatr ({why})")
    try:
        config = _Config.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the file"
        known = ", ".join(_Config.model_fields)
        extra = f" (tatr reads {known})" if error["type"] == "extra_forbidden" else ""
        raise TatrError(f"{path}: {where}: {error['msg']}{extra}") from None
    return _request(path, config)


def _request(path: Path, config: _Config) -> MergeRequest:
    name = config.merge_method
    if name not in KINDS:
        raise TatrError(f"{path}: merge_method '{name}' is not one tatr reads (it reads {', '.join(KINDS)})")
    kind, notes = KINDS[name], []
    top = _parameters(path, "parameters", config.parameters, (*kind.per_model, *kind.shared), name)
    base = None if config.base_model is None else _model_path(path, config.base_model, "base_model")
    entries = [(_model_path(path, e.model, f"models[{i}]"), e) for i, e in enumerate(config.models)]
    for i, (model, _) in enumerate(entries):
        if any(_same(model, other) for other, _ in entries[:i]):
            raise TatrError(f"{path}: models[{i}]: {model} is listed twice (mergekit refuses duplicate inputs too)")
    for i, (_, entry) in enumerate(entries):
        given = _parameters(path, f"models[{i}].parameters", entry.parameters, kind.per_model + kind.shared, name)
        wide = sorted(set(given) & set(kind.shared))
        if wide:
            raise TatrError(
                f"{path}: models[{i}]: {', '.join(wide)} is merge-wide in mergekit; give it under parameters:"
            )
    if name != "linear" and base is None:
        raise TatrError(f"{path}: {name} needs a base_model (θ_0, which the task vectors are taken from)")
    if name == "linear" and base is None:
        base = entries[0][0]
    inputs = [(p, e.parameters or {}) for p, e in entries]
    if name == "linear" and not any(_same(p, base) for p, _ in inputs):
        inputs.append((base, {}))  # mergekit adds a named base to linear's inputs
    tasks = [(p, params) for p, params in inputs if not _same(p, base)]
    if not tasks:
        raise TatrError(f"{path}: models lists no model other than the base: nothing to merge")

    def value(params: dict[str, Any], key: str, model: Path) -> Any:
        got = params.get(key, top.get(key, DEFAULTS.get(key)))
        if got is None:
            raise TatrError(f"{path}: model {model} has no {key} (give one per model, or under parameters:)")
        return _number(path, key, got)

    weights = [value(params, "weight", p) for p, params in tasks]
    normalize = as_flag(top.get("normalize", kind.normalize), f"{path}: normalize")
    lam = _number(path, "lambda", top.get("lambda", 1.0))
    check_numbers(lam=lam)
    if name == "linear":
        everyone = [value(params, "weight", p) for p, params in inputs]
        total = math.fsum(everyone)
        if normalize and total == 0:
            raise TatrError(f"{path}: linear's weights sum to 0, so normalize would divide by 0")
        if not normalize and abs(total - 1) > 1e-6:
            raise TatrError(f"{path}: linear with normalize: false scales θ_0 by Σw = {total:g}; tatr needs Σw = 1")
        weights, normalize = ([w / total for w in weights] if normalize else weights), False
    options: dict[str, object] = {}
    for key, option in PER_MODEL_OPTION.items():
        if key in kind.per_model and key not in kind.unused:
            per_task = tuple(value(params, key, p) for p, params in tasks)
            options[option] = per_task if len(set(per_task)) > 1 else per_task[0]
    if kind.rescale_option is not None and "rescale" in top:
        options[kind.rescale_option] = int(as_flag(top["rescale"], f"{path}: rescale"))
    for key in kind.unused:
        if key in top or any(key in params for _, params in tasks):
            notes.append(f"{key} has no effect on {name} (mergekit ignores it too)")
    if "int8_mask" in top:
        as_flag(top["int8_mask"], f"{path}: int8_mask")
        notes.append("int8_mask only sets the dtype of mergekit's sign mask (no effect on the values): ignored")
    try:
        checked = check_options(options)
    except TatrError as exc:
        raise TatrError(f"{path}: {exc}") from None
    unit = all(w == 1.0 for w in weights) and not normalize
    method = get_method(kind.method).weighted(None if unit else weights, normalize)
    dtype, out_dtype = (_dtype(path, key, getattr(config, key)) for key in ("dtype", "out_dtype"))
    region = config.trust_region
    mode, q = ("off", 1.0) if region is None else (region.mode, region.q)
    check_mode(mode)
    check_numbers(q=q)
    grads = None if region is None else _files(path, region.gradients, "gradients", len(tasks))
    signed = None if region is None else _files(path, region.signed_gradients, "signed_gradients", len(tasks))
    source = config.tokenizer_source
    if source == "union":
        raise TatrError(f"{path}: tokenizer_source: union builds a new vocabulary; tatr copies one (base or a model)")
    tokenizer = base if source in (None, "base") else _model_path(path, source, "tokenizer_source")
    return MergeRequest(
        source=path,
        mergekit_method=name,
        method=method,
        pretrained=base,
        finetuned=tuple(p for p, _ in tasks),
        lam=lam,
        options={k: checked[k] for k in options},
        trust_region=mode,
        q=q,
        gradients=grads,
        signed_gradients=signed,
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_from=tokenizer,
        notes=tuple(notes),
    )


def _parameters(path: Path, where: str, given: dict[str, Any] | None, known: tuple[str, ...], name: str) -> dict:
    """A parameters mapping: names the method takes, one number (or flag) each; else one line."""
    given = given or {}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TatrError(
            f"{path}: {where}: {', '.join(unknown)}: not a parameter of {name} (it takes {', '.join(known)})"
        )
    for key, value in given.items():
        if isinstance(value, list | dict):
            raise TatrError(f"{path}: {where}.{key}: per-tensor values (a list or filter:) are not supported; give one")
    return given


def _number(path: Path, key: str, value: Any) -> float:
    """A finite number (mergekit's pydantic float: a numeric string such as '1e-3' too); else one line."""
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise TatrError(f"{path}: {key} must be a finite number, got {value!r}")
    return number


def _dtype(path: Path, key: str, name: str | None) -> str | None:
    if name is None:
        return None
    plain = name.removeprefix("torch.")
    if plain not in DTYPES:
        raise TatrError(f"{path}: {key} must be one of {', '.join(DTYPES)}, got {name!r}")
    return plain


def _model_path(path: Path, name: str, where: str) -> Path:
    """A model folder or file, against the YAML's folder first, then as given (tatr downloads nothing)."""
    given = Path(name).expanduser()
    for candidate in [given] if given.is_absolute() else [path.parent / given, given]:
        if candidate.exists():
            return candidate
    hint = " (model+lora: give the PEFT adapter folder itself)" if "+" in name else ""
    raise TatrError(f"{path}: {where}: {name!r} is not a local folder or file{hint}; tatr downloads nothing")


def _files(path: Path, names: list[str] | None, key: str, tasks: int) -> tuple[Path, ...] | None:
    if names is None:
        return None
    if len(names) != tasks:
        raise TatrError(f"{path}: trust_region.{key}: {len(names)} files for {tasks} models; give one per model")
    return tuple(_model_path(path, n, f"trust_region.{key}") for n in names)


def _same(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()
