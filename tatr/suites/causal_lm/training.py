"""The answer-token loss of a causal LM on multiple-choice questions: its fine-tunes and its exemplar gradients.

An example is its question's context followed by the gold choice, tokenized exactly as the scorer tokenizes a
choice (`scoring.encode_pair`, lm-eval's rule), and the loss is the mean negative log-likelihood of the answer's
tokens only: the model learns to answer, not to reproduce the texts, and the gradient statistics of the exemplar
trust region measure the same quantity the evaluation scores. Batches are right-padded without an attention mask,
as the scorer's: a causal model's real positions never see the padding after them, and no padded position is
scored. The vocabulary projection runs only at the answer positions (`scoring.logits_at`).

Fine-tuning: AdamW, a tenth of the steps of linear warmup then a float64 cosine (`built_suite.warmup_cosine`),
batches a seeded shuffle (`base.shuffled_batches`); SmolLM2 and Llama have no dropout, so a fine-tune is a pure
function of (θ_0, examples, recipe, seed) for a given thread count.

Exemplar gradients: one backward pass per exemplar (`torch.autograd.grad`), so the working set is one gradient
of the model beside the two running sums: 16 bytes per parameter in float32 (weights, gradient, |∇| sum,
∇ sum) plus the activations of one example, i.e. about 2.2 GB for 135M parameters, 16 GB for 1B and 112 GB for
7B in float32 (a 7B model needs bf16 weights and a GPU). On CPU a vmap over examples does the same FLOPs
(`benchmarks/bench_gradients.py`) at chunk × the gradient memory, so the loop is the lean choice here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tatr.core.gradients import per_example_moments
from tatr.suites.base import shuffled_batches
from tatr.suites.built_suite import warmup_cosine
from tatr.suites.causal_lm.scoring import DELIMITER, Question, answer_logits, encode_pair

Example = tuple[list[int], int]  # (context + answer tokens, number of answer tokens)


def encode_examples(tokenizer: Any, questions: Sequence[Question], max_length: int) -> list[Example]:
    """Each question with its gold answer, as the scorer would tokenize that choice, cut from the left to
    `max_length` + 1 tokens (the scorer's window)."""
    out = []
    for q in questions:
        head, tail = encode_pair(tokenizer, q.context, DELIMITER + q.choices[q.gold])
        out.append(((head + tail)[-(max_length + 1) :], len(tail)))
    return out


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as a checkpoint holds it: contiguous copies, and a tensor the model ties to an
    earlier key (the LM head to the embedding) left out, so the merge counts each coordinate once."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().clone().contiguous()
    return out


def load_into(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """`state_dict` into `model`; only keys the model ties to another (a tied LM head) may be missing."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    bad = sorted(set(missing) - _tied_keys(model)) + sorted(unexpected)
    if bad:
        raise ValueError(f"state dict does not fit the model: '{bad[0]}'")
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            tied.add(k)
        seen.setdefault(v.data_ptr(), k)
    return tied


def answer_loss(model: nn.Module, batch: Sequence[Example]) -> Tensor:
    """Mean negative log-likelihood of the answer tokens of `batch` (over all its answer tokens)."""
    logits, targets = answer_logits(model, batch, next(model.parameters()).device)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def finetune(
    model: nn.Module, theta0: Mapping[str, Tensor], examples: Sequence[Example], recipe: Any, seed: int
) -> dict[str, Tensor]:
    """Fine-tune every weight of `model` (loaded with θ_0) on `examples`; returns θ_t, the model holding it.

    `recipe` gives `finetune_steps`, `finetune_batch`, `finetune_lr` and `weight_decay`."""
    load_into(model, dict(theta0))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.finetune_lr, weight_decay=recipe.weight_decay)
    stream = shuffled_batches(len(examples), recipe.finetune_batch, torch.Generator().manual_seed(seed))
    steps = recipe.finetune_steps
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = recipe.finetune_lr * warmup_cosine(step, steps, warmup, torch.float64)
        loss = answer_loss(model, [examples[i] for i in next(stream).tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def gradient_moments(
    model: nn.Module, examples: Sequence[Example], names: Sequence[str], progress: bool = False
) -> dict[str, dict[str, Tensor]]:
    """The exemplar moments (`tatr.core.gradients.MOMENTS`: mean |∇ℓ_n|, mean ∇ℓ_n, mean ∇ℓ_n²) of the answer
    loss over `examples`, for the parameters `names`, in float32, through the shared per-example code."""
    if not examples:
        raise ValueError("no exemplars: the exemplar draw is empty")
    model = model.eval()
    losses = (functools.partial(answer_loss, model, [e]) for e in examples)  # a rank runs only its share's
    return per_example_moments(model, losses, names, progress)
