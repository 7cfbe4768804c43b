"""The paper benchmark: open_clip CLIP image encoders fine-tuned on eight tasks (task_vectors setup).

`Clip8` implements the `Suite` protocol, so sweeps, ablations and reports run on it unchanged:

* θ_0 is the image tower of the pretrained open_clip model (`suite.model` + `suite.pretrained`,
  a tag or a file). Only the image tower is merged: θ_0 and every θ_t are written as `visual.*`
  safetensors, so the text tower, the logit scale and the token embeddings never enter the task
  vectors, Ω or the threshold (they serve only to build the frozen zero-shot heads).
* θ_t come from `suite.finetuned` (a pattern with `{task}` or a task → path mapping), in any format
  `tatr.suites.clip8.convert.load_any` reads except pickled whole modules, which `tatr convert` turns into
  safetensors once. Files already in the right layout are used in place; others are normalised
  into the cache (content-addressed by the source file's identity and θ_0's): see
  `tatr.suites.clip8.checkpoints`.
* heads: zero-shot classifiers from the pretrained text tower, the templates of
  `tatr.suites.clip8.templates` and the class names found in the data; cached by content hash.
* data: `tatr.suites.clip8.data` (task_vectors / torchvision layouts, task_vectors' validation split).

Evaluation runs in batches on the GPU when there is one (`suite.device`), with a progress bar;
exemplar gradients use `tatr.suites.evaluation.exemplar_gradients` (the vectorised per-sample estimator)
in `suite.gradient_precision` (fp32 or bf16), and so do Fisher merging's and RegMean's statistics at each θ_t
(`tatr.suites.task_statistics`, through the views of `tatr.suites.clip8.views`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from tatr.core.cache import cached_dir, content_hash, default_cache_root
from tatr.core.checkpoints import load_state_dict, save_state_dict
from tatr.core.errors import TatrError
from tatr.store.predictions import TaskPredictions
from tatr.suites import evaluation as ev
from tatr.suites.base import SUITES, Checkpoints, ExemplarGradients, exemplar_indices, input_seed, seeded_batches
from tatr.suites.clip8 import heads as ch
from tatr.suites.clip8.checkpoints import CACHE_FORMAT, expand_path, finetuned_source, normalised_finetuned
from tatr.suites.clip8.convert import VISUAL
from tatr.suites.clip8.data import TASKS, TaskData, load_task, unknown_task
from tatr.suites.clip8.splits import labels_of
from tatr.suites.clip8.templates import TEMPLATES
from tatr.suites.clip8.views import GradientView as _GradientView
from tatr.suites.clip8.views import StatisticsView
from tatr.suites.task_statistics import task_statistics

# Bump when a cached artefact changes meaning (θ_0 extraction, head recipe, normalisation).
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Clip8Options(BaseModel):
    """The `suite:` section of a CLIP experiment; unknown keys are an error (typos)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str = "ViT-B-32"
    pretrained: str = "openai"  # an open_clip pretrained tag, or a path to a full open_clip checkpoint
    quick_gelu: bool | None = None  # None: from the model config / pretrained tag (True for openai)
    finetuned: str | dict[str, str]  # "{task}" pattern, or task -> path
    data_root: str
    tasks: tuple[str, ...] = TASKS
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(4, ge=0)
    device: str = "auto"  # auto: cuda when available
    precision: Literal["fp32", "bf16"] = "fp32"  # evaluation
    gradient_precision: Literal["fp32", "bf16"] = "fp32"
    gradient_chunk: int = Field(8, ge=1)  # exemplars differentiated at once (memory ∝ chunk × params)
    progress: bool = True
    hf_cache_dir: str | None = None  # where open_clip/HF weights are cached (default: HF's own)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for task in value:
            if task not in TASKS:
                raise ValueError(unknown_task(task))
        if not value or len(set(value)) != len(value):
            raise ValueError("tasks must be a non-empty list without repeats")
        return value


def parse_options(options: Mapping[str, Any]) -> Clip8Options:
    try:
        return Clip8Options.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "suite"
        message = str(err["msg"]).removeprefix("Value error, ")
        raise TatrError(f"clip8 suite option suite.{where}: {message}") from None


class ImageEncoder(nn.Module):
    """open_clip's image tower behind a CPU-in, CPU-out interface.

    Inputs are moved to the tower's device and dtype and features come back as fp32 on the input's
    device, so the generic accuracy and gradient code (CPU heads and labels) needs no device logic.
    Parameter names are `visual.*`, the keys of the checkpoints.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        param = self.visual.conv1.weight if hasattr(self.visual, "conv1") else next(self.visual.parameters())
        features = self.visual(images.to(device=param.device, dtype=param.dtype, non_blocking=True))
        return features.float().to(images.device)


class Clip8:
    """The CLIP eight-task benchmark as a `Suite`; see the module docstring."""

    name = "clip8"

    def __init__(self, options: Clip8Options, cache_root: Path | None = None) -> None:
        self.options = options
        self.tasks: tuple[str, ...] = tuple(options.tasks)
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.data_root = expand_path(options.data_root)
        self._data: dict[str, TaskData] = {}
        self._heads: dict[str, Tensor] = {}
        self._full_model: nn.Module | None = None
        self._finetuned: dict[str, Path] = {}

    @property
    def model_name(self) -> str:
        """The store's `model`: the open_clip architecture (`suite.model`, e.g. "ViT-B-32")."""
        return self.options.model

    # --- setup ----------------------------------------------------------------------------------
    @cached_property
    def device(self) -> torch.device:
        if self.options.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.options.device)
        except RuntimeError:
            raise TatrError(f"clip8: suite.device '{self.options.device}' is not a torch device") from None

    @cached_property
    def source(self) -> ch.PretrainedSource:
        return ch.resolve_pretrained(
            self.options.model, self.options.pretrained, self.options.quick_gelu, self.options.hf_cache_dir
        )

    @cached_property
    def preprocess(self) -> dict[str, Any]:
        return ch.preprocess_config(self.source)

    @cached_property
    def transform(self) -> Callable:
        return ch.eval_transform(self.preprocess)

    @cached_property
    def _pretrained_dir(self) -> Path:
        """Cache entry with θ_0's image tower (visual.safetensors) and meta.json (logit scale)."""
        key = content_hash("clip8-pretrained", CACHE_FORMAT, self.source.identity())

        def build(folder: Path) -> None:
            model = self._load_full_model()
            visual = {VISUAL + k: v.detach().float().cpu() for k, v in model.visual.state_dict().items()}
            meta = {"model": self.options.model, "pretrained": self.options.pretrained}
            save_state_dict(visual, folder / "visual.safetensors", metadata=meta)
            scale = float(model.logit_scale.detach().float().exp().cpu())
            (folder / "meta.json").write_text(json.dumps({**meta, "logit_scale": scale}, indent=1))

        return cached_dir(self.cache_root / "clip8" / "pretrained", key, build)

    def _load_full_model(self) -> nn.Module:
        if self._full_model is None:
            self._full_model = ch.load_full_model(self.source, self.device)
        return self._full_model

    def task_data(self, task: str) -> TaskData:
        self._check_task(task)
        if task not in self._data:
            self._data[task] = load_task(task, self.data_root, self.transform)
        return self._data[task]

    def classes(self, task: str) -> tuple[str, ...]:
        return self.task_data(task).classnames

    # --- Suite protocol: checkpoints -------------------------------------------------------------
    def checkpoints(self) -> Checkpoints:
        pretrained = self._pretrained_dir / "visual.safetensors"
        return Checkpoints(pretrained, {t: self.finetuned_file(t) for t in self.tasks})

    def finetuned_source(self, task: str) -> Path:
        return finetuned_source(self.options.finetuned, task)

    def finetuned_file(self, task: str) -> Path:
        """θ_t as `visual.*` safetensors matching θ_0: the source itself when it already is one."""
        if task not in self._finetuned:
            self._finetuned[task] = normalised_finetuned(
                self.finetuned_source(task),
                self._pretrained_dir / "visual.safetensors",
                task,
                self.options.model,
                self.source.identity(),
                self.cache_root,
            )
        return self._finetuned[task]

    # --- Suite protocol: model and heads ---------------------------------------------------------
    def encoder(self, state_dict: Mapping[str, Tensor] | None = None, precision: str | None = None) -> nn.Module:
        """θ_0's image tower with `state_dict` (visual.* keys) loaded over it, on `self.device`."""
        dtype = _DTYPES[precision or self.options.precision]
        tower = ch.build_vision_tower(self.options.model, self.source.quick_gelu)
        theta0 = load_state_dict(self._pretrained_dir / "visual.safetensors")
        if state_dict is not None:
            unknown = sorted(set(state_dict) - set(theta0))
            if unknown:
                raise TatrError(f"clip8: key '{unknown[0]}' is not a key of {self.options.model}'s image encoder")
            theta0.update(state_dict)
        weights = {k.removeprefix(VISUAL): v for k, v in theta0.items()}
        try:
            tower.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as exc:
            problem = str(exc).splitlines()[-1].strip()
            raise TatrError(f"clip8: state dict does not fit {self.options.model}: {problem}") from None
        return ImageEncoder(tower).to(device=self.device, dtype=dtype).eval()

    def head(self, task: str) -> Tensor:
        """Zero-shot head [classes, dim] of `task`, from the cache or built with the text tower."""
        if task not in self._heads:
            data = self.task_data(task)
            templates = TEMPLATES[task]
            key = content_hash(
                "clip8-head", CACHE_FORMAT, self.source.identity(), list(data.classnames), list(templates)
            )

            def build(folder: Path) -> None:
                model = self._load_full_model()
                head = ch.zero_shot_head(model, self.options.model, data.classnames, templates, self.device)
                meta = {"task": task, "classes": str(len(data.classnames))}
                save_state_dict({"head": head}, folder / "head.safetensors", metadata=meta)

            folder = cached_dir(self.cache_root / "clip8" / "heads", key, build)
            self._heads[task] = load_state_dict(folder / "head.safetensors")["head"]
            if len(self._heads) == len(self.tasks):
                self.release_text_tower()  # every head is cached: the text tower is not needed again
        return self._heads[task]

    def logit_scale(self) -> float:
        return float(json.loads((self._pretrained_dir / "meta.json").read_text())["logit_scale"])

    def release_text_tower(self) -> None:
        """Free the full pretrained model once θ_0 and the heads are cached."""
        self._full_model = None

    # --- Suite protocol: data --------------------------------------------------------------------
    def loader(self, task: str, split: str, batch_size: int | None = None) -> DataLoader:
        ev.check_split(split)
        return self._loader(self.task_data(task).split(split), batch_size or self.options.batch_size)

    def exemplar_loader(self, task: str, n: int, seed: int, selection: str = "random") -> DataLoader:
        """`n` images from the train part (never validation), drawn by `selection` with `seed`
        (`tatr.suites.base.exemplar_indices`; "random": a seeded permutation)."""
        train = self.task_data(task).split("train")
        if not 1 <= n <= len(train):
            raise TatrError(f"exemplars.n must be between 1 and {len(train)} for clip8 task '{task}', got {n}")
        labels = labels_of(train) if selection != "random" else torch.empty(len(train))  # random reads no label
        idx = exemplar_indices(labels, n, seed, selection).tolist()
        return self._loader(Subset(train, idx), min(n, self.options.batch_size))

    def unlabeled_loader(self, task: str, split: str, batch_size: int = 16, seed: int = 0) -> Iterator[Tensor]:
        """Endless seeded batches of `task`'s images of `split` (eval transform), labels left behind.

        One DataLoader over an endless batch sampler, so the workers live for the whole run."""
        ev.check_split(split)
        data = self.task_data(task).split(split)
        batches = seeded_batches(len(data), batch_size, input_seed(seed, task))
        loader = DataLoader(
            data,
            batch_sampler=(idx.tolist() for idx in batches),
            num_workers=self.options.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        return (x for x, _ in loader)

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        workers = self.options.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    # --- Suite protocol: evaluation and gradients ------------------------------------------------
    def evaluate(
        self,
        state_dict: Mapping[str, Tensor] | None,
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, float]:
        """Top-1 accuracy (%) per task; one encoder, batched, on the suite's device."""
        return {t: p.accuracy for t, p in self.evaluate_predictions(state_dict, split, tasks, on_task).items()}

    def evaluate_predictions(
        self,
        state_dict: Mapping[str, Tensor] | None,
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, TaskPredictions]:
        """`evaluate` with each task's per-example predictions, in the loader's fixed order (unshuffled)."""
        ev.check_split(split)
        chosen = ev.check_tasks(self, tasks)
        heads = {t: self.head(t) for t in chosen}  # before the encoder: may need the text tower
        self.release_text_tower()
        encoder = self.encoder(state_dict)
        out: dict[str, TaskPredictions] = {}
        for task in chosen:
            batches = self._progress(self.loader(task, split), f"{task} ({split})")
            out[task] = ev.task_predictions(encoder, heads[task], batches)
            if on_task is not None:
                on_task(task, out[task].accuracy)
        return out

    def _progress(self, loader: DataLoader, desc: str) -> Iterable[tuple[Tensor, Tensor]]:
        return tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if self.options.progress else True)

    def individual_accuracy(self, split: str) -> dict[str, float]:
        """Each fine-tuned model on its own task (the normaliser), cached per (model, task, split)."""
        return {t: self._cached_accuracy("individual", t, split, self.finetuned_file(t)) for t in self.tasks}

    def pretrained_accuracy(self, split: str) -> dict[str, float]:
        return {t: self._cached_accuracy("pretrained", t, split, None) for t in self.tasks}

    def _cached_accuracy(self, which: str, task: str, split: str, weights: Path | None) -> float:
        ev.check_split(split)
        head = self.head(task)
        data = self.task_data(task)
        ident = ch.fingerprint(weights) if weights is not None else None
        key = content_hash(
            "clip8-accuracy",
            CACHE_FORMAT,
            which,
            task,
            split,
            self.source.identity(),
            ident,
            data.identity,
            ev.tensor_digest(head),
            self.preprocess,
            self.options.precision,
        )

        def build(folder: Path) -> None:
            sd = load_state_dict(weights) if weights is not None else None
            acc = self.evaluate(sd, split, (task,))[task]
            (folder / "accuracy.json").write_text(json.dumps({"task": task, "split": split, "accuracy": acc}))

        folder = cached_dir(self.cache_root / "clip8" / "accuracy", key, build)
        return float(json.loads((folder / "accuracy.json").read_text())["accuracy"])

    def exemplar_gradients(
        self, n: int, seed: int, *, selection: str = "random", squared: bool = False
    ) -> ExemplarGradients:
        """Per-task mean |∇ℓ| and mean ∇ℓ (and mean (∇ℓ)² with `squared`) at θ_0 over `n` train exemplars
        drawn by `selection` (cached)."""
        view, o = _GradientView(self, self.options.gradient_precision), self.options
        options = {"chunk": o.gradient_chunk, "progress": o.progress, "selection": selection, "squared": squared}
        return ev.exemplar_gradients(view, n, seed, cache_root=self.cache_root, **options)

    def task_statistics(
        self, kind: str, n: int, seed: int, *, estimator: str = "fusionbench", batch_size: int = 32
    ) -> dict[str, Path]:
        """Fisher merging's or RegMean's statistics at each θ_t over `n` train examples, in the gradient
        precision, cached (`tatr.suites.task_statistics`; the per-sample Fishers in `gradient_chunk`s)."""
        view, o = StatisticsView(self, self.options.gradient_precision), self.options
        options = {"cache_root": self.cache_root, "chunk": o.gradient_chunk, "progress": o.progress}
        return task_statistics(view, kind, n, seed, estimator=estimator, batch_size=batch_size, **options)

    def _check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise TatrError(f"unknown clip8 task '{task}' (this suite has: {', '.join(self.tasks)})")
        return task


@SUITES.register("clip8")
def make_clip8(options: dict[str, Any], cache_dir: Path | None) -> Clip8:
    """Suite factory: `options` are `Clip8Options` fields, `cache_dir` the cache root."""
    suite = Clip8(parse_options(options), cache_dir)
    if not suite.data_root.is_dir():
        raise TatrError(f"clip8: suite.data_root {suite.data_root} does not exist or is not a folder")
    return suite
