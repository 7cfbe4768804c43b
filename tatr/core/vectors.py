"""Task vectors τ_t = θ_t − θ_0, read one tensor at a time, validated once at the door.

`open_task_set` checks everything that can be checked from file headers (keys, shapes, dtypes,
counts) before any arithmetic, and that no gradient file is zero everywhere (reading it up to its
first nonzero tensor: one tensor for a real file); values (finiteness, a model identical to θ_0)
are checked by `task_vector` during the first streaming pass, which reads every tensor anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tatr.core.checkpoints import Source, as_source, describe, header, read_tensor, source_error
from tatr.core.errors import TatrError
from tatr.core.lora import LoraAdapter, is_adapter_folder
from tatr.core.outputs import same_file

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # merged
PASSED_THROUGH = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)  # copied from θ_0


@dataclass(frozen=True)
class TaskSet:
    """θ_0, the θ_t and optional per-task gradient statistics, as streaming sources."""

    pretrained: Source
    finetuned: tuple[Source, ...]
    gradients: tuple[Source, ...] | None
    signed_gradients: tuple[Source, ...] | None
    output_keys: tuple[str, ...]  # every key of θ_0, in its order: the merged file has all of them
    candidate_keys: tuple[str, ...]  # floating keys of the θ_t, sorted: the canonical coordinate order
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype]
    gradient_keys: tuple[frozenset[str], ...] | None = None
    signed_gradient_keys: tuple[frozenset[str], ...] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.finetuned)


@dataclass(frozen=True)
class ParamSpace:
    """The merged coordinates: keys some task changed, laid end to end in canonical order.

    Global coordinate i belongs to the key whose [offset, offset + numel) contains it; the
    trust-region threshold and its tie-break are defined over this order.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def build(cls, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> ParamSpace:
        offsets, total = [], 0
        for key in keys:
            offsets.append(total)
            total += _numel(shapes[key])
        return cls(tuple(keys), tuple(tuple(shapes[k]) for k in keys), tuple(offsets), total)

    def index(self, key: str) -> int:
        return self.keys.index(key)

    def view(self, arena: Tensor, i: int) -> Tensor:
        start = self.offsets[i]
        return arena[start : start + _numel(self.shapes[i])].view(self.shapes[i])

    def key_of(self, flat_index: Tensor) -> Tensor:
        """Position in `keys` of each global coordinate (for per-layer statistics)."""
        return torch.searchsorted(torch.tensor(self.offsets), flat_index, right=True) - 1


def open_task_set(
    pretrained: str | Path | Mapping[str, Tensor],
    finetuned: Sequence[str | Path | Mapping[str, Tensor]],
    gradients: Sequence[str | Path | Mapping[str, Tensor]] | None = None,
    signed_gradients: Sequence[str | Path | Mapping[str, Tensor]] | None = None,
) -> TaskSet:
    """Open and structurally validate all inputs; every failure is a one-line `TatrError`."""
    if len(finetuned) == 0:
        raise TatrError("no fine-tuned models given: need at least two")
    if len(finetuned) < 2:
        raise TatrError(f"{_src(finetuned[0])}: only one fine-tuned model given; merging needs at least two")
    _distinct(finetuned, "--finetuned")
    base = _open(pretrained)
    tasks = tuple(_open_task(f, base) for f in finetuned)
    base_header = _checked_header(base)
    first_header = _checked_header(tasks[0])
    candidates = sorted(k for k, (_, dtype) in first_header.items() if dtype in FLOATING)
    if not candidates:
        raise source_error(
            tasks[0], None, "has no floating-point tensors (only integer or bool ones): there is nothing to merge"
        )
    candidate_set = set(candidates)
    for key in candidates:
        if key not in base_header:
            raise source_error(tasks[0], key, f"not in the pretrained model {describe(base)}")
    for src in tasks:
        h = first_header if src is tasks[0] else _checked_header(src)
        _same_keys(src, h, tasks[0], first_header)
        for key in h:
            dtype = h[key][1]
            base_dtype = base_header[key][1] if key in base_header else None
            if key not in candidate_set and dtype not in FLOATING and base_dtype not in FLOATING:
                continue  # a non-floating key (buffer) is copied from θ_0
            if key not in base_header:
                raise source_error(src, key, f"not in the pretrained model {describe(base)}")
            shape, (base_shape, base_dtype) = h[key][0], base_header[key]
            if shape != base_shape:
                raise source_error(src, key, f"shape {list(shape)} differs from the pretrained {list(base_shape)}")
            if dtype != base_dtype:
                raise source_error(src, key, f"dtype {dtype} differs from the pretrained {base_dtype}")
    grads, grad_keys = _open_gradients(gradients, "gradient", tasks, candidates, base_header)
    signed, signed_keys = _open_gradients(signed_gradients, "signed-gradient", tasks, candidates, base_header)
    return TaskSet(
        pretrained=base,
        finetuned=tasks,
        gradients=grads,
        signed_gradients=signed,
        output_keys=tuple(base_header),
        candidate_keys=tuple(candidates),
        shapes={k: base_header[k][0] for k in base_header},
        dtypes={k: base_header[k][1] for k in base_header},
        gradient_keys=grad_keys,
        signed_gradient_keys=signed_keys,
    )


def task_vector(task_set: TaskSet, t: int, key: str, theta0: Tensor, out: Tensor | None = None) -> Tensor:
    """τ_t[key] in θ_0's (arena) dtype, given θ_0 already in it (into `out` if given, to reuse one
    buffer across tasks).

    Finiteness is checked per tensor on the running sums (see `all_finite`).
    """
    return torch.sub(read_tensor(task_set.finetuned[t], key).to(theta0.dtype), theta0, out=out)


def pretrained_tensor(task_set: TaskSet, key: str) -> Tensor:
    return read_tensor(task_set.pretrained, key)


def all_finite(*tensors: Tensor | None) -> bool:
    """Fast test: a sum is finite only if every element is (NaN and ±inf propagate through sums).

    A float32 overflow of the sum gives a false alarm, so callers confirm with `check_finite`
    before reporting an error.
    """
    return all(t is None or bool(torch.isfinite(t.sum())) for t in tensors)


def check_finite(task_set: TaskSet, key: str, gradients: bool = False) -> None:
    """Find which input has a NaN/inf at `key` and raise the one-line error naming it."""
    sources = [task_set.pretrained, *task_set.finetuned]
    if gradients and task_set.gradients is not None:
        sources += [g for g, keys in zip(task_set.gradients, task_set.gradient_keys or (), strict=True) if key in keys]
    for src in sources:
        if not bool(torch.isfinite(read_tensor(src, key)).all()):
            raise source_error(src, key, "contains NaN or infinite values")


def gradient_tensor(task_set: TaskSet, t: int, key: str, signed: bool = False) -> Tensor:
    """Task t's gradient statistic for `key` in fp32; a key the task vectors change must be there.

    Mean |∇ℓ| is ≥ 0 by definition, and Ω's exact selection relies on it: a negative value, −0.0
    included (its sign bit is set), means a signed statistic was given as `--gradients`.
    """
    sources = task_set.signed_gradients if signed else task_set.gradients
    keys = task_set.signed_gradient_keys if signed else task_set.gradient_keys
    if sources is None or keys is None:
        raise TatrError(f"this merge needs {'signed ' if signed else ''}gradient files, and none were given")
    if key not in keys[t]:
        kind = "signed-gradient" if signed else "gradient"
        raise source_error(sources[t], key, f"missing from the {kind} file, but the task vectors change it")
    value = read_tensor(sources[t], key).float()
    if signed and not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise source_error(sources[t], key, "contains NaN or infinite values")  # a rule may hide it (signs only)
    if not signed and bool(torch.signbit(value).any()):
        if not bool(torch.isfinite(value).all()):
            raise source_error(sources[t], key, "contains NaN or infinite values")
        raise source_error(
            sources[t],
            key,
            "has negative values (−0.0 included): --gradients takes mean |∇ℓ| ≥ 0; "
            "signed gradients go to --signed-gradients",
        )
    return value


def _open(src: str | Path | Mapping[str, Tensor]) -> Source:
    if isinstance(src, Mapping):
        if not src:
            raise TatrError("an in-memory state dict is empty")
        return src
    return as_source(src)


def _open_task(src: str | Path | Mapping[str, Tensor], base: Source) -> Source:
    """A fine-tuned checkpoint, or a PEFT LoRA adapter folder read as θ_0 + its update (`tatr.core.lora`)."""
    if not isinstance(src, Mapping) and is_adapter_folder(Path(src)):
        return LoraAdapter(Path(src), base)
    return _open(src)


def _checked_header(src: Source, kind: str = "checkpoint") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The header, refusing an empty file and dtypes tatr cannot merge or copy (fp8, uint16, complex…)."""
    h = header(src)
    if not h:
        raise source_error(src, None, f"the {kind} file is empty (it holds no tensors)")
    for key, (_, dtype) in h.items():
        if dtype not in FLOATING and dtype not in PASSED_THROUGH:
            raise source_error(
                src, key, f"unsupported dtype {dtype} (tatr merges float16, bfloat16, float32 and float64)"
            )
    return h


def _distinct(sources: Sequence[str | Path | Mapping[str, Tensor]], flag: str) -> None:
    """The same file twice would silently count a task twice: refuse it (by inode/resolved path)."""
    paths = [(i, Path(s)) for i, s in enumerate(sources) if not isinstance(s, Mapping)]
    for n, (i, a) in enumerate(paths):
        for j, b in paths[n + 1 :]:
            if same_file(a, b):
                raise TatrError(f"{b}: given twice as {flag} (positions {i + 1} and {j + 1}); give each task once")


def _src(src: object) -> str:
    return describe(src) if isinstance(src, Path | Mapping) else str(src)


def _same_keys(src: Source, h: Mapping[str, object], ref: Source, ref_h: Mapping[str, object]) -> None:
    missing = sorted(set(ref_h) - set(h))
    extra = sorted(set(h) - set(ref_h))
    if missing:
        raise source_error(src, missing[0], f"missing, but present in {describe(ref)}")
    if extra:
        raise source_error(src, extra[0], f"not in {describe(ref)} (the fine-tuned models must share their keys)")


def _open_gradients(
    sources: Sequence[str | Path | Mapping[str, Tensor]] | None,
    kind: str,
    tasks: tuple[Source, ...],
    candidates: list[str],
    base_header: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> tuple[tuple[Source, ...] | None, tuple[frozenset[str], ...] | None]:
    if sources is None:
        return None, None
    if len(sources) != len(tasks):
        raise TatrError(f"{len(sources)} {kind} files for {len(tasks)} fine-tuned models: give one per task, in order")
    _distinct(sources, f"--{kind}s")
    opened = tuple(_open(s) for s in sources)
    allowed = set(candidates)
    keys = []
    for src in opened:
        h = _checked_header(src, kind)
        keys.append(frozenset(h))
        unknown = sorted(set(h) - allowed)
        if unknown:
            raise source_error(
                src, unknown[0], f"not a floating-point key of the fine-tuned files ({kind} keys must match)"
            )
        for key, (shape, dtype) in h.items():
            if shape != base_header[key][0]:
                raise source_error(
                    src, key, f"shape {list(shape)} differs from the model's {list(base_header[key][0])}"
                )
            if dtype not in FLOATING:
                raise source_error(src, key, f"{kind} values must be floating point, got {dtype}")
        _check_not_all_zero(src, h, kind)
    return opened, tuple(keys)


def _check_not_all_zero(src: Source, keys: Iterable[str], kind: str) -> None:
    """Refuse a gradient file that is zero at every key: that task's s_i (or ḡ_i) would be 0
    everywhere, and Ω (or G₋ⱼ) would lose its sensitivity without a word.

    One zero key is fine (a frozen layer has no gradient); all of them is a file computed at the
    wrong point or without a loss. Reads keys until the first nonzero one, so a real file costs one
    tensor read; NaN counts as nonzero here and is refused by the finiteness checks later."""
    for key in keys:
        if bool(read_tensor(src, key).any()):
            return
    need = "exemplar sensitivity" if kind == "gradient" else "the component split"
    hint = f"{need} needs a nonzero gradient; was it computed at θ_0 with a loss?"
    raise source_error(src, None, f"every {kind.replace('-', ' ')} is zero ({hint})")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
