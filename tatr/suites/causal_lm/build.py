"""Building the causal-LM suite: the questions of each split, θ_0, and one fine-tune per task, in parallel.

Layout of the build folder (`BuiltSuite`'s, without heads: a causal LM answers with its own vocabulary):

    pretrained.safetensors        θ_0, Hugging Face key names, a tied LM head left out (it is the embedding)
    finetuned/<task>.safetensors  θ_t, the same keys
    questions_<task>.json         {split: [{"context", "choices", "gold"}, …]} in the fixed order of every score
    meta.json, build_log.json     classes, build-time accuracies; timings and the thread and worker counts

Why parallel processes: a build pins one torch thread so that its bytes do not depend on the machine's load
(`built_suite.pinned_build`), which left all but one core idle. The fine-tunes of different tasks are
independent, so each runs in a process of its own, on one thread, with the same inputs and seed as it would
have in a serial build: the bytes are the same for any number of workers (tests/test_lm_suite.py compares
them), and `build_workers` is not part of the cache key. A worker also scores θ_0 and its θ_t on its task's
validation and test questions (the build-time accuracies).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tatr.core.checkpoints import load_state_dict, save_state_dict
from tatr.suites.causal_lm import prompts
from tatr.suites.causal_lm.scoring import Question, Scores, score
from tatr.suites.causal_lm.training import encode_examples, finetune, load_into, model_state
from tatr.suites.text_tasks import TextTask, draw_splits
from tatr.suites.workers import cpu_seconds, run_jobs

SPLIT_NAMES = ("train", "validation", "test")


def question_splits(task: TextTask, spec: Any, question: str) -> dict[str, list[Question]]:
    """The seeded, class-stratified splits of `task` (`draw_splits`), as multiple-choice questions."""
    splits = draw_splits(task, spec.seed, spec.n_train, spec.n_val, spec.n_test)
    return {s: prompts.questions(task, idx, question, spec.max_chars) for s, idx in splits.items()}


def finetune_seed(build_seed: int, task_index: int) -> int:
    """The seed of task `task_index`'s fine-tune in the build of `build_seed`: distinct across tasks and builds."""
    return 100 * build_seed + task_index


def chosen(scores: Scores, metric: str) -> tuple[list[int], list[bool]]:
    """(predicted class, correct) by the suite's metric: lm-eval's `acc` or `acc_norm`."""
    if metric == "acc":
        return scores.predicted, scores.correct
    return scores.predicted_norm, scores.correct_norm


def accuracy(model: nn.Module, tokenizer: Any, questions: Sequence[Question], spec: Any) -> float:
    scores = score(model, tokenizer, questions, spec.score_batch, spec.max_length, share_context=True)
    _, correct = chosen(scores, spec.metric)
    return 100.0 * sum(correct) / max(len(correct), 1)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True))


def _finetune_task(job: dict[str, Any]) -> dict[str, Any]:
    """One task's fine-tune and its build-time accuracies, in a worker process (or in the caller's)."""
    from tatr.suites.causal_lm.model import load_causal_lm  # transformers, imported where it is used

    start, cpu = time.perf_counter(), time.process_time()
    spec = job["spec"]
    model, tokenizer = load_causal_lm(Path(job["source"]))
    theta0 = load_state_dict(Path(job["pretrained"]))
    splits = {s: prompts.from_rows(rows) for s, rows in job["questions"].items()}
    load_into(model, theta0)
    out: dict[str, Any] = {"pretrained": {}, "individual": {}}
    for s in ("validation", "test"):
        out["pretrained"][s] = accuracy(model, tokenizer, splits[s], spec)
    examples = encode_examples(tokenizer, splits["train"], spec.max_length)
    theta_t = finetune(model, model_state(model), examples, spec, job["seed"])
    theta_t = {k: theta_t[k] for k in theta0}  # the checkpoint's keys (a tied head stays out)
    save_state_dict(theta_t, Path(job["out"]))
    for s in ("validation", "test"):
        out["individual"][s] = accuracy(model, tokenizer, splits[s], spec)
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = time.process_time() - cpu
    return out


def build(
    spec: Any,
    source: Path,
    splits: Mapping[str, Mapping[str, list[Question]]],
    info: Mapping[str, Any],
    folder: Path,
    workers: int,
    log: Callable[[str], None] | None = None,
) -> None:
    """Write the questions (`splits`: task → split → questions, in task order), θ_0, each θ_t and their
    accuracies into `folder` (a temporary cache dir), with `info` (classes, questions asked) in its meta; the
    fine-tunes in `workers` processes of one torch thread each (in this process when `workers` is 1)."""
    from tatr.suites.causal_lm.model import load_causal_lm

    timings: dict[str, float] = {"threads": torch.get_num_threads(), "workers": workers}
    start, cpu_start = time.perf_counter(), cpu_seconds()
    model, _ = load_causal_lm(source)
    save_state_dict(model_state(model), folder / "pretrained.safetensors")
    del model
    jobs = []
    (folder / "finetuned").mkdir()
    tasks = list(splits)
    for i, task in enumerate(tasks):
        plain = {s: prompts.as_rows(qs) for s, qs in splits[task].items()}
        _write_json(folder / f"questions_{task}.json", plain)
        jobs.append(
            {
                "spec": spec,
                "source": str(source),
                "pretrained": str(folder / "pretrained.safetensors"),
                "questions": plain,
                "seed": finetune_seed(spec.seed, i),
                "out": str(folder / "finetuned" / f"{task}.safetensors"),
            }
        )
    results = run_jobs(_finetune_task, jobs, workers)
    accuracy_table: dict[str, dict[str, dict[str, float]]] = {"pretrained": {}, "individual": {}}
    for task, result in zip(tasks, results, strict=True):
        for which in ("pretrained", "individual"):
            for s in ("validation", "test"):
                accuracy_table[which].setdefault(s, {})[task] = result[which][s]
        timings[f"finetune_{task}_s"] = result["seconds"]
        timings[f"finetune_{task}_cpu_s"] = result["cpu_seconds"]
        if log is not None:
            log(
                f"{task}: pretrained {result['pretrained']['test']:.1f}, fine-tuned "
                f"{result['individual']['test']:.1f} (test, {spec.metric}; {result['seconds']:.0f} s)"
            )
    timings["total_s"] = time.perf_counter() - start
    timings["total_cpu_s"] = cpu_seconds() - cpu_start  # the workers' included
    meta = {
        "spec": spec.model_dump(mode="json", exclude={"build_workers", "score_batch"}),
        "tasks": tasks,
        **info,
        "sizes": {t: {s: len(splits[t][s]) for s in SPLIT_NAMES} for t in tasks},
        "accuracy": accuracy_table,
    }
    _write_json(folder / "meta.json", meta)
    _write_json(folder / "build_log.json", timings)
