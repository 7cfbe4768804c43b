"""Generic evaluation and exemplar gradients over the `Suite` protocol (testbed and CLIP alike).

Suites implement `Suite.evaluate` and `Suite.exemplar_gradients` by delegating here, so both
benchmarks classify with the same rule and cache gradients the same way:

* `task_predictions` / `predictions`: which examples were right and the predicted class, per task,
  in the loader's fixed order (`tatr.store.predictions.TaskPredictions`), with the one cosine rule of
  every suite (`tatr.core.classify.cosine_logits`, argmax of normalize(f) @ normalize(head).T: the
  logit scale does not change the argmax, so it is left at 1); `accuracy` gives their top-1
  accuracies in percent (for plugin suites that write `evaluate` alone). A suite exposes them as
  `evaluate_predictions` (same arguments as `Suite.evaluate`, optional: `suite_predictions` falls
  back to `evaluate` without it).
* `normalized_accuracy`: merged accuracy ÷ the task's individual fine-tuned accuracy, in percent,
  the paper's headline metric.
* `evaluate_merged`: both at once, as an `Evaluation` with averages and a printable table. A merged
  model with a NaN or infinite parameter (λ = 1e30 overflows float32) is refused first: its
  accuracies would look like numbers and reach the store.
* `exemplar_gradients`: per-task mean |∇ℓ| and mean ∇ℓ at θ_0 (`tatr.core.gradients`), cached per task
  in a content-addressed folder whose key hashes θ_0's file, the head, the logit scale and the
  exemplar tensors themselves, so a changed loader or checkpoint can never reuse stale gradients (nor a
  changed exemplar selection: its exemplars are other bytes). The mean squared gradient, asked for with
  `squared=True`, has a folder of its own beside it (the same inputs, its own key), so every folder
  written before it existed stays valid; a draw missing either computes all three moments in one pass.
  Under torchrun the exemplars are shared out among the ranks (`tatr.core.gradients`), and rank 0 alone
  writes the folders; the others wait for it and return the same paths (`tatr.core.distributed`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tatr.core.cache import content_hash, default_cache_root, file_digest
from tatr.core.checkpoints import header, load_state_dict, save_state_dict
from tatr.core.classify import cosine_logits, unit_rows
from tatr.core.distributed import shared_cached_dir, world
from tatr.core.errors import TatrError
from tatr.core.gradients import gradient_moments
from tatr.store.predictions import TaskPredictions
from tatr.store.schema import check_split  # the one check of a split name (suites call ev.check_split)
from tatr.suites.base import ExemplarGradients, Suite

# Bump when the gradient computation changes meaning, so old cache entries are not reused.
GRADIENT_FORMAT = 1


@torch.inference_mode()
def task_predictions(encoder: nn.Module, head: Tensor, batches: Iterable[tuple[Tensor, Tensor]]) -> TaskPredictions:
    """Per-example outcome of `encoder` with the frozen cosine `head` over `batches`, in batch order:
    which examples were right and the predicted class (`.accuracy`: top-1 accuracy in percent)."""
    encoder.eval()
    head = unit_rows(head.float())  # once, not per batch
    correct: list[np.ndarray] = []
    predicted: list[np.ndarray] = []
    for x, y in batches:
        logits = cosine_logits(encoder(x).float(), head, unit_head=True)
        pred = logits.argmax(-1)
        correct.append((pred == y.to(pred.device)).cpu().numpy())
        predicted.append(pred.cpu().numpy())
    if not correct or sum(len(c) for c in correct) == 0:
        raise TatrError("cannot compute accuracy: the loader is empty")
    return TaskPredictions(np.concatenate(correct), np.concatenate(predicted))


def check_tasks(suite: Suite, tasks: Iterable[str] | None) -> tuple[str, ...]:
    """The requested tasks in the order given, or all of the suite's; unknown names are an error."""
    if tasks is None:
        return tuple(suite.tasks)
    chosen = tuple(tasks)
    unknown = [t for t in chosen if t not in suite.tasks]
    if unknown:
        known = ", ".join(suite.tasks)
        raise TatrError(f"unknown task(s) {', '.join(unknown)} for {suite.name} (known: {known})")
    return chosen


def predictions(
    suite: Suite,
    state_dict: Mapping[str, Tensor] | None,
    split: str,
    tasks: Iterable[str] | None = None,
    on_task: Callable[[str, float], None] | None = None,
) -> dict[str, TaskPredictions]:
    """Per-example predictions per task of one state dict (θ_0 when None) on `split`, in the order of
    the suite's loader; builds the encoder once. `on_task(task, accuracy)` as each task finishes."""
    check_split(split)
    encoder = suite.encoder(state_dict)
    out: dict[str, TaskPredictions] = {}
    for task in check_tasks(suite, tasks):
        out[task] = task_predictions(encoder, suite.head(task), suite.loader(task, split))
        if on_task is not None:
            on_task(task, out[task].accuracy)
    return out


def accuracy(
    suite: Suite,
    state_dict: Mapping[str, Tensor] | None,
    split: str,
    tasks: Iterable[str] | None = None,
    on_task: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Accuracy per task of one state dict (θ_0 when None) on `split`; builds the encoder once."""
    return {t: p.accuracy for t, p in predictions(suite, state_dict, split, tasks, on_task).items()}


def suite_predictions(
    suite: Suite,
    state_dict: Mapping[str, Tensor],
    split: str,
    tasks: tuple[str, ...],
    on_task: Callable[[str, float], None] | None = None,
) -> tuple[dict[str, float], dict[str, TaskPredictions] | None]:
    """(accuracy per task, predictions per task) of a merged state dict, through the suite's own
    `evaluate_predictions` where it has one (the built-in suites); a suite without it (a plugin
    written against `Suite.evaluate` alone) gives its accuracies and None."""
    method = getattr(suite, "evaluate_predictions", None)
    if method is None:
        return dict(suite.evaluate(state_dict, split, tasks, on_task)), None
    preds = dict(method(state_dict, split, tasks, on_task))
    return {t: p.accuracy for t, p in preds.items()}, preds


def individual_predictions(suite: Suite, split: str) -> dict[str, TaskPredictions] | None:
    """Each θ_t's predictions on its own task (the Individual row's), one task's evaluation per θ_t; None for a
    suite without per-example predictions (a plugin written against `Suite.evaluate` alone)."""
    if getattr(suite, "evaluate_predictions", None) is None:
        return None
    ckpts = suite.checkpoints()
    out: dict[str, TaskPredictions] = {}
    for t in suite.tasks:
        _, preds = suite_predictions(suite, load_state_dict(ckpts.finetuned[t]), split, (t,))
        assert preds is not None
        out[t] = preds[t]
    return out


def recorded_accuracy(suite: Suite, recorded: Mapping[str, Mapping], which: str, split: str) -> dict[str, float]:
    """Accuracies of θ_0 ("pretrained") or of each θ_t on its own task ("individual") that the build recorded
    per split (`recorded[which][split]`); a split the build did not record is measured now."""
    check_split(split)
    stored = recorded[which].get(split)
    if stored is not None:
        return {t: stored[t] for t in suite.tasks}
    if which == "pretrained":
        return accuracy(suite, None, split)
    ckpts = suite.checkpoints()
    return {t: accuracy(suite, load_state_dict(ckpts.finetuned[t]), split, (t,))[t] for t in suite.tasks}


def normalized_accuracy(acc: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """Merged accuracy ÷ individual fine-tuned accuracy, in percent (100 = no loss from merging)."""
    missing = [t for t in acc if t not in individual]
    if missing:
        raise TatrError(f"no individual accuracy for task(s) {', '.join(missing)}")
    return {t: 100.0 * a / individual[t] if individual[t] > 0 else float("nan") for t, a in acc.items()}


@dataclass(frozen=True)
class Evaluation:
    """Per-task accuracy of one model on one split, with the normaliser used."""

    split: str
    accuracy: dict[str, float]
    individual: dict[str, float]
    normalized: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, TaskPredictions] | None = None  # per task; None where the suite gives none

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def mean_normalized(self) -> float:
        return sum(self.normalized.values()) / len(self.normalized)

    def table(self, title: str | None = None) -> str:
        """A fixed-width per-task table with an average row, for the terminal."""
        width = max(len("average"), *(len(t) for t in self.accuracy))
        lines = [title] if title else []
        lines.append(f"{'task':<{width}}  {'acc %':>7}  {'indiv %':>7}  {'norm %':>7}")
        lines.append("-" * (width + 27))
        rows = [(t, a, self.individual[t], self.normalized[t]) for t, a in self.accuracy.items()]
        for task, acc, ind, norm in rows:
            lines.append(f"{task:<{width}}  {acc:7.2f}  {ind:7.2f}  {norm:7.2f}")
        lines.append("-" * (width + 27))
        mean_ind = sum(r[2] for r in rows) / len(rows)
        mean_acc, mean_norm = self.mean_accuracy, self.mean_normalized
        lines.append(f"{'average':<{width}}  {mean_acc:7.2f}  {mean_ind:7.2f}  {mean_norm:7.2f}")
        return "\n".join(lines)


def evaluate_merged(
    suite: Suite,
    state_dict: Mapping[str, Tensor] | None,
    split: str,
    tasks: Iterable[str] | None = None,
    on_task: Callable[[str, float], None] | None = None,
) -> Evaluation:
    """Accuracy and normalized accuracy of a (merged) state dict; uses `suite.evaluate`."""
    chosen = check_tasks(suite, tasks)
    if state_dict is not None:
        check_finite(state_dict)
    if state_dict is None and getattr(suite, "evaluate_predictions", None) is None:
        # a plugin suite written against `Suite.evaluate` alone: θ_0 through its encoder and heads
        preds: dict[str, TaskPredictions] | None = predictions(suite, None, split, chosen, on_task)
        acc = {t: p.accuracy for t, p in preds.items()}  # type: ignore[union-attr]
    else:  # the suite's own evaluation (θ_0 when None), e.g. the causal LM's, which has no heads
        acc, preds = suite_predictions(suite, state_dict, split, chosen, on_task)
    individual = suite.individual_accuracy(split)
    chosen_individual = {t: individual[t] for t in chosen}
    return Evaluation(split, dict(acc), chosen_individual, normalized_accuracy(acc, individual), preds)


def check_finite(state_dict: Mapping[str, Tensor]) -> None:
    """One line if a floating parameter of a merged model is NaN or ±inf (nothing is evaluated)."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TatrError(
                f"the merged model has NaN or infinite values in '{key}' (is λ too large?); "
                "it is not evaluated and nothing is stored"
            )


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 over dtype, shape and bytes of tensors: a content key for in-memory data."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def exemplar_gradients(
    suite: Suite,
    n: int,
    seed: int,
    cache_root: Path | None = None,
    chunk: int | None = None,
    progress: bool = False,
    selection: str = "random",
    squared: bool = False,
) -> ExemplarGradients:
    """Per-task gradient statistics at θ_0 with each task's frozen head, cached per task.

    The cache key covers θ_0's file digest, the parameter names, the head, the logit scale and the
    bytes of the exemplars, so it is a pure function of the inputs. The files are keyed by the
    encoder's parameter names, which must be keys of θ_0's checkpoint (checked here, once). `selection`
    goes to the suite's `exemplar_loader` (only where it is not "random"); `squared` adds `sq_mean`.
    """
    if n < 1:
        raise TatrError(f"exemplars.n must be at least 1, got {n}")
    world()  # under torchrun: the process group, and this rank's GPU as "cuda", before the encoder is built
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    pretrained = suite.checkpoints().pretrained
    encoder = suite.encoder(None)
    names = [k for k, p in encoder.named_parameters() if p.dtype.is_floating_point]
    missing = sorted(set(names) - set(header(pretrained)))
    if missing:
        raise TatrError(f"{pretrained}: encoder parameter '{missing[0]}' is not a key of the checkpoint")
    scale = float(suite.logit_scale())
    pretrained_digest = file_digest(pretrained)  # once per call, not per task (1.2 GB for ViT-L/14)
    drawn = {} if selection == "random" else {"selection": selection}
    paths: dict[str, dict[str, Path]] = {"abs_mean": {}, "signed_mean": {}, "sq_mean": {}}
    for task in suite.tasks:
        batches = [(x, y) for x, y in suite.exemplar_loader(task, n, seed, **drawn)]
        if not batches:
            raise TatrError(f"{suite.name}: the exemplar loader of task '{task}' is empty")
        head = suite.head(task)
        inputs = (
            suite.name,
            task,
            pretrained_digest,
            names,
            scale,
            tensor_digest(head),
            tensor_digest(*(t for batch in batches for t in batch)),
        )
        meta = {"suite": suite.name, "task": task, "n": str(n), "seed": str(seed), **drawn}
        moments: dict[str, dict[str, Tensor]] = {}

        def computed(batches=batches, head=head, moments=moments) -> dict[str, dict[str, Tensor]]:
            if not moments:  # one pass gives all three, whichever folder asked first
                moments.update(gradient_moments(encoder, head, scale, batches, names, chunk=chunk, progress=progress))
            return moments

        def write(folder: Path, moments: dict[str, dict[str, Tensor]], meta=meta) -> None:
            for name in ("abs_mean", "signed_mean"):
                save_state_dict(moments[name], folder / f"{name}.safetensors", metadata=meta)

        def write_squared(folder: Path, moments: dict[str, dict[str, Tensor]], meta=meta) -> None:
            save_state_dict(moments["sq_mean"], folder / "sq_mean.safetensors", metadata=meta)

        # under torchrun every rank computes its share, rank 0 alone writes (`tatr.core.distributed`)
        key = content_hash("exemplar-gradients", GRADIENT_FORMAT, *inputs)
        folder = shared_cached_dir(root / "gradients", key, computed, write)
        for name in ("abs_mean", "signed_mean"):
            paths[name][task] = folder / f"{name}.safetensors"
        if squared:
            key = content_hash("exemplar-gradients-squared", GRADIENT_FORMAT, *inputs)
            paths["sq_mean"][task] = (
                shared_cached_dir(root / "gradients", key, computed, write_squared) / "sq_mean.safetensors"
            )
    return ExemplarGradients(paths["abs_mean"], paths["signed_mean"], paths["sq_mean"] if squared else None)


def load_gradients(grads: ExemplarGradients, tasks: Iterable[str]) -> tuple[list[dict], list[dict]]:
    """The (abs, signed) gradient state dicts in task order, for code that wants them in memory."""
    tasks = list(tasks)
    abs_mean = [load_state_dict(grads.abs_mean[t]) for t in tasks]
    return abs_mean, [load_state_dict(grads.signed_mean[t]) for t in tasks]
