"""Building the text suite: tokenised splits, zero-shot heads from label prompts, one fine-tune per task.

The recipe follows task_vectors' for CLIP, with a sentence encoder in place of the image tower:
* θ_0 is the pretrained encoder as shipped (for `model: minilm`, sentence-transformers'
  all-MiniLM-L6-v2).
* Each task's frozen head is the encoder's zero-shot classifier: per class, the normalised
  embeddings of the class description in a few templates ("This text is about {label}."),
  averaged and normalised again, as CLIP's heads average over prompt templates.
* θ_t fine-tunes the whole encoder on the task with its head frozen (`built_suite.finetune`, the
  testbed's loop: AdamW, warmup + a float64 cosine, the cosine rule's logits times `logit_scale` into
  cross-entropy), so task vectors cover the encoder only and every θ_t is a safetensors file
  `tatr merge` reads directly.

Everything random is drawn from generators seeded from `spec.seed` (the split draw, the batch
order, dropout), and the build runs on one torch thread, as the testbed's does
(`tatr.suites.built_suite.pinned_build`: the bytes of a matrix product depend on the thread
count), so the same spec and files give the same bytes. Timings go to `build_log.json`, apart from
the reproducible files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tatr.core.checkpoints import save_state_dict
from tatr.core.classify import cosine_logits
from tatr.suites import built_suite
from tatr.suites.text.model import TextEncoder, load_tokenizer, load_transformer, pack, read_pooling, trim
from tatr.suites.text_tasks import TextTask, draw_splits
from tatr.suites.workers import cpu_seconds, run_jobs

SPLIT_NAMES = ("train", "validation", "test")


def make_encoder(source: Path, trust_pickle: bool = False) -> TextEncoder:
    return TextEncoder(load_transformer(source, trust_pickle), read_pooling(source))


def encoder_state(encoder: nn.Module) -> dict[str, Tensor]:
    """The encoder's state dict as saved: parameters and persistent buffers, contiguous copies."""
    return {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}


@torch.inference_mode()
def embed(encoder: nn.Module, x: Tensor, batch: int = 128) -> Tensor:
    encoder.eval()
    out = [encoder(trim(x[i : i + batch])) for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def make_head(encoder: nn.Module, tokenizer: Any, task: TextTask, max_length: int) -> Tensor:
    """Rows L2-normalised: per class, the mean of the normalised template embeddings."""
    rows = []
    for description in task.descriptions:
        prompts = [t.replace("{label}", description) for t in task.templates]
        feats = F.normalize(embed(encoder, pack(tokenizer, prompts, max_length)), dim=-1)
        rows.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(rows).contiguous()


def finetune(
    encoder: nn.Module, theta0: Mapping[str, Tensor], head: Tensor, x: Tensor, y: Tensor, spec: Any, seed: int
) -> dict[str, Tensor]:
    """Fine-tune every encoder weight against the frozen head (the shared loop, each batch cut to its longest
    text, the float64 schedule); returns θ_t (θ_0 is not changed), the encoder holding it."""
    return built_suite.finetune(encoder, theta0, head, x, y, spec, seed, prepare=trim, schedule_dtype=torch.float64)


def accuracy_of(encoder: nn.Module, head: Tensor, x: Tensor, y: Tensor) -> float:
    pred = cosine_logits(embed(encoder, x), head, unit_head=True).argmax(-1)  # the head's rows as they are
    return 100.0 * float((pred == y).float().mean())


def tokenize_splits(
    tokenizer: Any, task: TextTask, seed: int, sizes: Sequence[int], max_length: int
) -> dict[str, Tensor]:
    """`x_<split>` [N, 2, L] token ids and masks and `y_<split>` labels of the seeded splits."""
    n_train, n_val, n_test = sizes
    splits = draw_splits(task, seed, n_train, n_val, n_test)
    out: dict[str, Tensor] = {}
    for split, idx in splits.items():
        out[f"x_{split}"] = pack(tokenizer, [task.texts[i] for i in idx], max_length).contiguous()
        out[f"y_{split}"] = torch.tensor([task.labels[i] for i in idx], dtype=torch.long)
    return out


def _finetune_task(job: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One task's fine-tune and its build-time accuracies, from the files the build wrote before it (θ_0,
    the heads, the task's data): the same inputs, seed and thread count in any process, so the same bytes."""
    folder, name = Path(job["folder"]), job["task"]
    spec = job["spec"]
    encoder = make_encoder(Path(job["source"]), spec.trust_pickle)
    theta0 = load_file(str(folder / "pretrained.safetensors"))
    head = load_file(str(folder / "heads.safetensors"))[name]
    split = load_file(str(folder / f"data_{name}.safetensors"))
    encoder.load_state_dict(theta0)
    out: dict[str, dict[str, float]] = {"pretrained": {}, "individual": {}}
    for s in ("validation", "test"):
        out["pretrained"][s] = accuracy_of(encoder, head, split[f"x_{s}"], split[f"y_{s}"])
    theta_t = finetune(encoder, theta0, head, split["x_train"], split["y_train"], spec, job["seed"])
    save_state_dict(theta_t, folder / "finetuned" / f"{name}.safetensors")
    for s in ("validation", "test"):
        out["individual"][s] = accuracy_of(encoder, head, split[f"x_{s}"], split[f"y_{s}"])
    return out


@built_suite.pinned_build
def build(
    spec: Any,
    source: Path,
    tasks: Sequence[TextTask],
    folder: Path,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> None:
    """Write data, θ_0, heads, θ_t and their accuracies into `folder` (a temporary cache dir), on
    `BUILD_THREADS` torch threads whatever the caller's setting; the fine-tunes in `workers` processes
    (`tatr.suites.workers`: the same bytes for any count)."""
    timings: dict[str, float] = {"threads": torch.get_num_threads(), "workers": workers}
    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokenizer = load_tokenizer(source)
    sizes = (spec.n_train, spec.n_val, spec.n_test)
    data = {t.name: tokenize_splits(tokenizer, t, spec.seed, sizes, spec.max_length) for t in tasks}
    for name, tensors in data.items():
        save_file(tensors, str(folder / f"data_{name}.safetensors"))
    encoder = make_encoder(source, spec.trust_pickle)
    theta0 = encoder_state(encoder)
    save_state_dict(theta0, folder / "pretrained.safetensors")
    heads = {t.name: make_head(encoder, tokenizer, t, spec.max_length) for t in tasks}
    save_file(heads, str(folder / "heads.safetensors"))
    timings["data_heads_s"] = time.perf_counter() - start

    t0 = time.perf_counter()
    accuracy: dict[str, dict[str, dict[str, float]]] = {"pretrained": {}, "individual": {}}
    (folder / "finetuned").mkdir()
    jobs = [
        {"spec": spec, "source": str(source), "folder": str(folder), "task": task.name, "seed": spec.seed * 100 + i}
        for i, task in enumerate(tasks)
    ]
    results = run_jobs(_finetune_task, jobs, workers)
    for task, result in zip(tasks, results, strict=True):
        for which in ("pretrained", "individual"):
            for s, acc in result[which].items():
                accuracy[which].setdefault(s, {})[task.name] = acc
        if log is not None:
            log(
                f"{task.name}: pretrained {accuracy['pretrained']['test'][task.name]:.1f}, "
                f"fine-tuned {accuracy['individual']['test'][task.name]:.1f} (test)"
            )
    timings["finetune_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    timings["total_cpu_s"] = cpu_seconds() - cpu_start  # the workers' included
    meta = {
        "spec": spec.model_dump(mode="json", exclude={"build_workers"}),
        "tasks": [t.name for t in tasks],
        "classes": {t.name: list(t.classes) for t in tasks},
        "descriptions": {t.name: list(t.descriptions) for t in tasks},
        "pooling": encoder.pooling,
        "sizes": {t.name: {s: len(data[t.name][f"y_{s}"]) for s in SPLIT_NAMES} for t in tasks},
        "accuracy": accuracy,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    (folder / "build_log.json").write_text(json.dumps(timings, indent=1, sort_keys=True))
