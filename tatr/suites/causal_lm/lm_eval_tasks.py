"""Named lm-evaluation-harness tasks as the causal-LM suite's tasks: `suite.tasks=lm-eval:NAME,…`.

Why: GPU users already have lm-eval task configs (MMLU, ARC, HellaSwag, or their own YAML files). A multiple-choice
lm-eval task becomes a suite task here: its training documents are the fine-tune's and the exemplars' questions,
and its evaluation documents (`task.eval_docs`: the test split, else the validation split) the test split, scored
by `lm_eval.evaluator.evaluate` itself around the live model (`evaluate_with_lm_eval`: one `HFLM` per merged
model, the task dict built once, never lm-eval's request cache, which would return one merged model's answers
for the next). The validation split (for tuning λ and q) is the task's validation documents where it also has
test documents, else a seeded held-out part of its training documents; it is scored by tatr's scorer, which
equals lm-eval per example (tests/test_lm_scoring.py). Documents are read in lm-eval's order; the split sizes
are `n_train`, `n_val`, `n_test` times the number of choices of the task's first document (so "per class" means
the same as for the text tasks), and the test split is lm-eval's first `limit` evaluation documents.

Local task folders (`suite.lm_eval_include: DIR`) are read with `TaskManager(include_path=DIR,
include_defaults=False)`; lm-eval's own task names need its defaults and, offline, their datasets in the local
Hugging Face cache. `HF_DATASETS_OFFLINE` and `HF_HUB_OFFLINE` are set unless the user set them: lm-eval
otherwise makes DNS lookups. A task that is not multiple choice, asks for few-shot examples or uses another
target delimiter than " " is refused in one line (the scorer and the fine-tunes ask zero-shot, after " ").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tatr.core.errors import TatrError
from tatr.suites.causal_lm.scoring import DELIMITER, Question

PREFIX = "lm-eval:"


def is_lm_eval(tasks: object) -> bool:
    return isinstance(tasks, str) and tasks.startswith(PREFIX)


def task_names(tasks: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in tasks[len(PREFIX) :].split(",") if n.strip())
    if not names:
        raise TatrError(f"suite.tasks={tasks!r}: name at least one lm-eval task after '{PREFIX}'")
    return names


def load_task_dict(names: Sequence[str], include: str | None) -> dict[str, Any]:
    """lm-eval's task dict for `names`, built once (what `evaluate` takes), from `include` only when given."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TatrError("lm-eval tasks need lm-evaluation-harness: pip install -e '.[lm]'") from None
    if include is not None and not Path(include).is_dir():
        raise TatrError(f"suite.lm_eval_include: {include} is not a folder of lm-eval task files")
    manager = TaskManager(include_path=include, include_defaults=include is None)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TatrError(f"lm-eval knows no task '{unknown[0]}'" + (f" in {include}" if include else ""))
    task_dict = manager.load(list(names))
    for name in names:
        check_task(name, task_dict["tasks"][name])
    return task_dict


def check_task(name: str, task: Any) -> None:
    config = task.config
    if config.output_type != "multiple_choice":
        raise TatrError(f"lm-eval task '{name}' is {config.output_type}, not multiple_choice")
    if config.num_fewshot:
        raise TatrError(f"lm-eval task '{name}' asks for {config.num_fewshot} few-shot examples; tatr asks zero-shot")
    if config.target_delimiter != DELIMITER:
        raise TatrError(f"lm-eval task '{name}' uses target_delimiter {config.target_delimiter!r}, not ' '")
    if not task.has_training_docs():
        raise TatrError(f"lm-eval task '{name}' has no training documents to fine-tune on")


def as_question(task: Any, doc: Any) -> Question:
    choices = tuple(str(c) for c in task.doc_to_choice(doc))
    target = task.doc_to_target(doc)
    gold = choices.index(target) if isinstance(target, str) else int(target)
    return Question(str(task.doc_to_text(doc)), choices, gold)


def question_splits(task: Any, spec: Any) -> dict[str, list[Question]]:
    """train / validation / test questions of an lm-eval task (see the module docstring)."""
    train = [as_question(task, d) for d in task.training_docs()]
    evaluation = [as_question(task, d) for d in task.eval_docs]
    if not train or not evaluation:
        raise TatrError(f"lm-eval task '{task.config.task}' has no training or no evaluation documents")
    per = len(evaluation[0].choices)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    if task.has_test_docs() and task.has_validation_docs():
        validation = [as_question(task, d) for d in task.validation_docs()][: spec.n_val * per]
    else:
        held, order = order[: spec.n_val * per], order[spec.n_val * per :]
        validation = [train[i] for i in held]
    if not order:
        raise TatrError(f"lm-eval task '{task.config.task}' has too few training documents for n_val={spec.n_val}")
    return {
        "train": [train[i] for i in sorted(order[: spec.n_train * per])],
        "validation": validation,
        "test": evaluation[: spec.n_test * per],
    }


def evaluate_with_lm_eval(
    model: Any, tokenizer: Any, task_dict: dict[str, Any], name: str, limit: int, metric: str
) -> tuple[list[int], list[bool]]:
    """(predicted choice, correct) per evaluation document of `name`, in lm-eval's order, from
    `lm_eval.evaluator.evaluate` on the live model (its first `limit` documents, no request cache)."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, device=str(next(model.parameters()).device))
    one = {"tasks": {name: task_dict["tasks"][name]}, "groups": {}, "group_map": {}}
    results = evaluator.evaluate(lm=lm, task_dict=one, limit=limit, log_samples=True, bootstrap_iters=0)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    predicted, correct = [], []
    for s in samples:
        values = [float(r[0]) for r in s["filtered_resps"]]
        if metric == "acc_norm":
            lengths = [len(arg[1]) - len(DELIMITER) for arg in s["arguments"]]  # the choice, as lm-eval divides
            values = [v / n for v, n in zip(values, lengths, strict=True)]
        best = max(range(len(values)), key=lambda i: (values[i], -i))
        predicted.append(best)
        correct.append(bool(s[metric]))
    return predicted, correct
