"""The embedded testbed: an 8-task merging benchmark that builds itself on a CPU in minutes.

`Testbed` implements the `Suite` protocol of `tatr.suites.base` over a build from
`tatr.suites.testbed.build` (data, θ_0, frozen icon heads, θ_t), cached in a content-addressed
folder `<cache>/testbed/<hash of the spec and build version>`: built on first use, verified on
every open (a manifest of file digests), rebuilt when missing or corrupted.

Suite options (the `suite:` section of an experiment, or `tatr evaluate ... suite.width=96`) are
the fields of `TestbedSpec`, plus `preset: tiny` for the reduced build the tests use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from tatr.core.cache import content_hash, default_cache_root
from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError
from tatr.core.registry import did_you_mean, unknown_name
from tatr.io.safe_yaml import as_flag
from tatr.suites import evaluation as ev
from tatr.suites.base import SUITES, exemplar_indices
from tatr.suites.built_suite import BuiltSuite
from tatr.suites.testbed import build as tb
from tatr.suites.workers import default_workers

# Bump whenever the build code changes its output, so stale cache folders are not reused.
# 3: the build always runs on one torch thread; a version-2 folder may hold a multi-thread build.
BUILD_VERSION = 3

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The reduced build of the test suite: same code path, seconds instead of minutes.
    "tiny": {
        "tasks": ("digits", "shapes", "counts", "flags"),
        "n_train": 128,
        "n_val": 64,
        "n_test": 64,
        "width": 32,
        "layers": 1,
        "heads": 2,
        "embed_dim": 16,
        "pretrain_steps": 30,
        "pretrain_batch": 32,
        "finetune_steps": 8,
        "finetune_batch": 32,
    },
}


def spec_from_options(options: Mapping[str, Any]) -> tb.TestbedSpec:
    """`TestbedSpec` from suite options; unknown keys and tasks get a one-line, did-you-mean error."""
    options = dict(options)
    preset = options.pop("preset", "default")
    if preset not in PRESETS:
        raise TatrError(unknown_name("testbed preset", preset, PRESETS))
    known = {f.name for f in fields(tb.TestbedSpec)}
    for key in options:
        if key not in known:
            raise TatrError(f"unknown testbed option 'suite.{key}'{did_you_mean(key, sorted(known), prefix='suite.')}")
    merged = {**PRESETS[preset], **options}
    if "tasks" in merged:
        tasks = merged["tasks"]
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        bad = [t for t in tasks if t not in tb.data.TASKS]
        if bad or not tasks or len(set(tasks)) != len(tasks):
            raise TatrError(f"suite.tasks must be distinct names among {', '.join(tb.data.TASKS)}; got {list(tasks)}")
        merged["tasks"] = tasks
    try:
        spec = replace(tb.TestbedSpec(), **merged)
    except TypeError as exc:
        raise TatrError(f"bad testbed options: {exc}") from None
    if spec.head not in ("icons", "pretrain"):
        raise TatrError(f"suite.head must be 'icons' or 'pretrain', got '{spec.head}'")
    check_numbers(spec)
    return spec


def check_numbers(spec: tb.TestbedSpec) -> None:
    """Sizes, steps and batches positive integers, rates positive and finite: one line before a build."""
    defaults = tb.TestbedSpec()
    for f in fields(spec):
        value, default = getattr(spec, f.name), getattr(defaults, f.name)
        if isinstance(default, bool) or not isinstance(default, int | float):
            continue
        integer = isinstance(default, int)
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            raise TatrError(f"suite.{f.name} must be {'an integer' if integer else 'a number'}, got {value!r}")
        least_zero = f.name in ("seed", "weight_decay")
        if not math.isfinite(value) or value < 0 or (value == 0 and not least_zero):
            raise TatrError(f"suite.{f.name} must be {'≥ 0' if least_zero else 'positive'} and finite, got {value!r}")


def spec_key(spec: tb.TestbedSpec) -> str:
    return content_hash("testbed", BUILD_VERSION, spec.to_json())


class Testbed(BuiltSuite):
    """The testbed as a `Suite`; everything is loaded lazily from the verified cache folder. `BuiltSuite`
    gives the reads, `unlabeled_loader` (through `prepare`) and `exemplar_gradients`."""

    name = "testbed"
    # fixed (not auto) so that regenerated gradients match the committed results bit for bit
    gradient_chunk = 16

    def __init__(
        self, spec: tb.TestbedSpec, cache_root: Path | None = None, progress: bool = True, workers: int | None = None
    ) -> None:
        self.spec = spec
        self.tasks: tuple[str, ...] = tuple(spec.tasks)
        self.workers = workers or default_workers(len(self.tasks))  # the build's fine-tunes; not in the key
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.progress = progress

    @property
    def model_name(self) -> str:
        """The store's `model`: the tiny open_clip ViT of this build, by width × layers."""
        return f"testbed-vit-{self.spec.width}x{self.spec.layers}"

    # --- the build ------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        """The verified build folder, built (minutes at full size) if missing or corrupted."""
        return self.built_folder(
            spec_key(self.spec), lambda tmp: tb.build(self.spec, tmp, self.progress, workers=self.workers)
        )

    # --- Suite protocol --------------------------------------------------------------------------
    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        model = tb.make_encoder(self.spec)
        sd = dict(state_dict) if state_dict is not None else load_state_dict(self.checkpoints().pretrained)
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            detail = str(exc).splitlines()[1].strip()
            raise TatrError(f"state dict does not fit the testbed encoder: {detail}") from None
        return model.eval()

    def loader(self, task: str, split: str, batch_size: int = 256) -> DataLoader:
        ev.check_split(split)
        x, y = self._split(task, split)
        return _tensor_loader(tb.preprocess(x), y, batch_size)

    def exemplar_loader(self, task: str, n: int, seed: int, selection: str = "random") -> DataLoader:
        """`n` training images of `task` drawn without replacement by `selection` with `seed`
        (`exemplar_indices`; "random": a seeded permutation)."""
        x, y = self._split(task, "train")
        if not 1 <= n <= len(y):
            raise TatrError(f"exemplars.n must be between 1 and {len(y)} for testbed task '{task}', got {n}")
        idx = exemplar_indices(y, n, seed, selection)
        return _tensor_loader(tb.preprocess(x[idx]), y[idx], 64)

    def prepare(self, x: Tensor) -> Tensor:
        """Stored uint8 images → the encoder's normalised float inputs (elementwise, so per batch or per split
        alike)."""
        return tb.preprocess(x)


def _tensor_loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    """A deterministic DataLoader that slices whole batches (no per-sample collation)."""
    sampler = BatchSampler(SequentialSampler(range(len(y))), batch_size=batch_size, drop_last=False)
    return DataLoader(TensorDataset(x, y), sampler=sampler, batch_size=None)


@SUITES.register("testbed")
def make_testbed(options: dict[str, Any], cache_dir: Path | None) -> Testbed:
    """Suite factory: `options` are `TestbedSpec` fields (plus `preset`), `cache_dir` the cache root."""
    options = dict(options)
    progress = as_flag(options.pop("progress", True), "suite.progress")
    workers = options.pop("build_workers", None)  # fine-tunes in parallel (None: one per core): the same bytes
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise TatrError(f"suite.build_workers must be a whole number ≥ 1, got {workers!r}")
    return Testbed(spec_from_options(options), cache_dir, progress=progress, workers=workers)
