"""Building the testbed: data, a tiny open_clip ViT pretrained on all domains (θ_0), frozen
zero-shot heads from class icons, and one fine-tune per task (θ_t), all from one seed.

Why it is built this way (the regime the paper studies; see the README's "Testbed" section):
* θ_0 comes from supervised multi-domain pretraining on a stream of fresh samples (never a
  validation or test image). Its per-domain classifiers are thrown away, as CLIP's contrastive
  objective is not a classifier for the downstream tasks. This makes the features rich: a
  nearest-class-mean probe on θ_0's features reaches ~92% on average.
* The frozen heads are *icon heads*: each class's row is θ_0's embedding of the class's canonical,
  clean rendering (`testbed_data.icons`) in grayscale, the analogue of encoding "a photo of a
  {class}" with CLIP's text tower: it names the class's form but not its appearance. They are
  imperfect (icons are off the data distribution and colourless), which makes the pretrained
  model weak (~57%) while its features are already rich.
* Fine-tuning moves the whole encoder towards the frozen heads in 150 small AdamW steps
  (lr 5e-4, warmup + cosine), so it mostly re-aligns features (individual ~91%).

Everything random is drawn from generators seeded from `spec.seed`, and the whole build runs on
exactly one torch thread (`BUILD_THREADS`, whatever `torch.get_num_threads()` says outside:
`tatr.suites.built_suite.pinned_build`), so the same spec gives the same bytes on the same machine,
however busy it is. Why one thread:
* The bytes depend on the thread count otherwise. Measured (torch 2.x with MKL, x86): a matrix
  product with 5–11 rows (the icon heads, per-class gradients) and layer norm's weight gradient
  round differently with 1 and 2 threads, so a build's files changed with the machine's load
  while the cache key (which has no thread count) stayed the same. `tests/test_testbed.py`
  builds the tiny preset with 1 and 2 threads set outside and compares every file's digest.
* It is never slower than one thread, the bound the issue asks for. On a quiet 2-core machine two
  threads would be ~1.5× faster (19 vs 12.9 steps/s), but with one other busy process they are
  ~1.8× slower (7.5 vs 13.2) and at load 5–6 about 10× slower (1.3), because torch's threads spin
  and wait on each other. `benchmarks/bench_build_threads.py` measures this on your machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from tatr.core.checkpoints import save_state_dict
from tatr.core.classify import cosine_logits
from tatr.suites import built_suite
from tatr.suites.testbed import data
from tatr.suites.workers import cpu_seconds, run_jobs

MEAN, STD = 0.5, 0.25  # fixed input normalisation, like CLIP's preprocess constants


@dataclass(frozen=True)
class TestbedSpec:
    """Every knob of the build; its hash names the cache folder."""

    seed: int = 0
    tasks: tuple[str, ...] = data.TASKS
    # data: samples per task and split (pretraining draws fresh samples every step)
    n_train: int = 1000
    n_val: int = 300
    n_test: int = 600
    # model (open_clip VisionTransformer)
    patch: int = 4
    width: int = 96
    layers: int = 3
    heads: int = 4
    mlp_ratio: float = 2.0
    embed_dim: int = 64
    # pretraining (θ_0)
    pretrain_steps: int = 2500
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-3
    # frozen heads: "icons" (zero-shot, from canonical renderings) or "pretrain" (θ_0's classifier)
    head: str = "icons"
    icon_style: str = "gray"  # "gray": icons keep only luminance; "color": as rendered
    logit_scale: float = 20.0
    # fine-tuning (θ_t)
    finetune_steps: int = 150
    finetune_batch: int = 64
    finetune_lr: float = 5e-4
    weight_decay: float = 0.0

    def with_options(self, options: Mapping[str, object]) -> TestbedSpec:
        return replace(self, **dict(options))

    def to_json(self) -> dict:
        return asdict(self)


def make_encoder(spec: TestbedSpec) -> VisionTransformer:
    """open_clip's own ViT, the code path of CLIP's visual tower, at toy size."""
    return VisionTransformer(
        image_size=data.SIZE,
        patch_size=spec.patch,
        width=spec.width,
        layers=spec.layers,
        heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        output_dim=spec.embed_dim,
    )


def preprocess(images: Tensor) -> Tensor:
    """uint8 [n,3,S,S] → normalised float, the only transform (no augmentation at eval)."""
    return (images.float() / 255.0 - MEAN) / STD


# --- data -------------------------------------------------------------------------------------
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3, "pretrain": 4}


def task_seed(seed: int, task: str, split: str) -> int:
    """A distinct stream per (seed, task, split), so splits never share a sample."""
    return (seed * 1_000_003 + data.TASKS.index(task) * 7919 + SPLIT_SEEDS[split] * 104_729) % (2**62)


def build_data(spec: TestbedSpec) -> dict[str, dict[str, Tensor]]:
    """uint8 images and labels per task: train/validation/test.

    Procedural tasks draw each split from its own stream. The real digits are split once by a
    seeded permutation, test and validation first; pretraining re-renders the training digits
    (`pretrain_images`), so it too is disjoint from validation and test.
    """
    out: dict[str, dict[str, Tensor]] = {}
    sizes = {"train": spec.n_train, "validation": spec.n_val, "test": spec.n_test}
    for task in spec.tasks:
        splits: dict[str, Tensor] = {}
        if task == "digits":
            images, labels = data.load_digit_images()
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(spec.seed))
            n_test, n_val = min(spec.n_test, 500), min(spec.n_val, 250)
            parts = {
                "test": perm[:n_test],
                "validation": perm[n_test : n_test + n_val],
                "train": perm[n_test + n_val :][: spec.n_train],
            }
            for split, idx in parts.items():
                gen = torch.Generator().manual_seed(task_seed(spec.seed, task, split))
                splits[f"x_{split}"] = data.to_uint8(data.digits(images[idx], gen, clean=False))
                splits[f"y_{split}"] = labels[idx].clone()
            splits["pretrain_images"], splits["pretrain_labels"] = images[parts["train"]], labels[parts["train"]]
        else:
            for split, n in sizes.items():
                x, y = data.generate(task, n, task_seed(spec.seed, task, split))
                splits[f"x_{split}"], splits[f"y_{split}"] = x, y
        out[task] = splits
    return out


# --- training ---------------------------------------------------------------------------------
# The testbed's schedules take a float32 cosine (the text suite's a float64 one): the factor rounds into
# every weight, so the built bytes depend on it.
SCHEDULE_DTYPE = torch.float32


def pretrain_batch(spec: TestbedSpec, pools: dict[str, dict[str, Tensor]], step: int, per_task: int) -> dict:
    """Fresh samples for one pretraining step: an unbounded, seeded stream per domain.

    Procedural domains draw new images from their generator (seed from `spec.seed` and `step`),
    so pretraining never sees a validation or test image; digits re-render training images with
    fresh tints and shifts.
    """
    out = {}
    for task in spec.tasks:
        seed = task_seed(spec.seed, task, "pretrain") + 1_000_003 * (step + 1)
        if task == "digits":
            gen = torch.Generator().manual_seed(seed)
            images, labels = pools[task]["pretrain_images"], pools[task]["pretrain_labels"]
            idx = torch.randint(0, len(labels), (per_task,), generator=gen)
            out[task] = (data.to_uint8(data.digits(images[idx], gen, clean=False)), labels[idx])
        else:
            out[task] = data.generate(task, per_task, seed)
    return out


def pretrain(spec: TestbedSpec, pools: dict[str, dict[str, Tensor]], progress: bool) -> dict[str, Tensor]:
    """Supervised multi-domain pretraining with one throw-away cosine classifier per domain."""
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        encoder = make_encoder(spec)
        classifiers = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(len(data.CLASSES[t]), spec.embed_dim) * 0.1) for t in spec.tasks}
        )
    params = [*encoder.parameters(), *classifiers.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.pretrain_lr, weight_decay=0.05)
    per_task = max(1, spec.pretrain_batch // len(spec.tasks))
    encoder.train()
    for step in tqdm(range(spec.pretrain_steps), desc="pretrain θ_0", disable=not progress, leave=False):
        for group in opt.param_groups:
            lr = built_suite.warmup_cosine(step, spec.pretrain_steps, spec.pretrain_steps // 20, SCHEDULE_DTYPE)
            group["lr"] = spec.pretrain_lr * lr
        batch = pretrain_batch(spec, pools, step, per_task)
        feats = encoder(preprocess(torch.cat([batch[t][0] for t in spec.tasks])))
        loss = torch.zeros(())
        for i, t in enumerate(spec.tasks):
            f = feats[i * per_task : (i + 1) * per_task]
            loss = loss + F.cross_entropy(cosine_logits(f, classifiers[t], 20.0), batch[t][1])
        opt.zero_grad(set_to_none=True)
        (loss / len(spec.tasks)).backward()
        opt.step()
    encoder.eval()
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    state.update({f"classifier.{t}": F.normalize(classifiers[t].detach(), dim=-1) for t in spec.tasks})
    return state


@torch.inference_mode()
def embed(encoder: nn.Module, images: Tensor, batch: int = 512) -> Tensor:
    encoder.eval()
    return torch.cat([encoder(preprocess(images[i : i + batch])) for i in range(0, len(images), batch)])


def make_heads(spec: TestbedSpec, encoder: nn.Module, classifiers: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Frozen heads, rows L2-normalised: θ_0's embeddings of class icons, or θ_0's classifier."""
    heads = {}
    for task in spec.tasks:
        if spec.head == "icons":
            x, y = data.icons(task)
            if spec.icon_style == "gray":
                x = x.float().mean(1, keepdim=True).round().to(torch.uint8).expand_as(x).contiguous()
            feats = F.normalize(embed(encoder, x), dim=-1)
            rows = torch.stack([feats[y == c].mean(0) for c in range(len(data.CLASSES[task]))])
        elif spec.head == "pretrain":
            rows = classifiers[task]
        else:
            raise ValueError(f"unknown head kind '{spec.head}' (icons or pretrain)")
        heads[task] = F.normalize(rows, dim=-1).contiguous()
    return heads


def finetune(
    spec: TestbedSpec, theta0: Mapping[str, Tensor], head: Tensor, x: Tensor, y: Tensor, seed: int
) -> dict[str, Tensor]:
    """Fine-tune every encoder weight against a frozen head: the shared loop (`built_suite.finetune`) on the
    whole split preprocessed once, with the testbed's float32 schedule."""
    encoder = make_encoder(spec)
    return built_suite.finetune(encoder, theta0, head, preprocess(x), y, spec, seed, schedule_dtype=SCHEDULE_DTYPE)


@torch.inference_mode()
def accuracy_of(spec: TestbedSpec, state: Mapping[str, Tensor], head: Tensor, x: Tensor, y: Tensor) -> float:
    encoder = make_encoder(spec)
    encoder.load_state_dict(dict(state))
    pred = cosine_logits(embed(encoder, x), head, unit_head=True).argmax(-1)  # the saved head's rows as they are
    return 100.0 * float((pred == y).float().mean())


def _finetune_task(job: dict) -> dict[str, dict[str, float]]:
    """One task's fine-tune and its build-time accuracies, from the files the build wrote before it (θ_0, the
    heads, the task's data): the same inputs, seed and thread count in any process, so the same bytes."""
    spec, folder, task = job["spec"], Path(job["folder"]), job["task"]
    state = load_file(str(folder / "pretrained.safetensors"))
    head = load_file(str(folder / "heads.safetensors"))[task]
    split = load_file(str(folder / f"data_{task}.safetensors"))
    theta_t = finetune(spec, state, head, split["x_train"], split["y_train"], job["seed"])
    save_state_dict(theta_t, folder / "finetuned" / f"{task}.safetensors")
    out: dict[str, dict[str, float]] = {"pretrained": {}, "individual": {}}
    for name, sd in (("pretrained", state), ("individual", theta_t)):
        for s in ("validation", "test"):
            out[name][s] = accuracy_of(spec, sd, head, split[f"x_{s}"], split[f"y_{s}"])
    return out


# --- the whole build --------------------------------------------------------------------------
@built_suite.pinned_build
def build(
    spec: TestbedSpec,
    folder: Path,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> None:
    """Write data, θ_0, heads, θ_t and their accuracies into `folder` (a temporary cache dir), on
    `BUILD_THREADS` torch threads whatever the caller's setting (the bytes depend on it); the fine-tunes in
    `workers` processes (`tatr.suites.workers`: the same bytes for any count)."""
    timings: dict[str, float] = {"threads": torch.get_num_threads(), "workers": workers}
    start, cpu_start = time.perf_counter(), cpu_seconds()
    pools = build_data(spec)
    timings["data_s"] = time.perf_counter() - start
    for task, tensors in pools.items():
        save_file(
            {k: v.contiguous() for k, v in tensors.items() if not k.startswith("pretrain")},
            str(folder / f"data_{task}.safetensors"),
        )

    t0 = time.perf_counter()
    state = pretrain(spec, pools, progress)
    timings["pretrain_s"] = time.perf_counter() - t0
    classifiers = {t: state.pop(f"classifier.{t}") for t in spec.tasks}
    save_state_dict(state, folder / "pretrained.safetensors")
    encoder = make_encoder(spec)
    encoder.load_state_dict(state)
    heads = make_heads(spec, encoder, classifiers)
    save_file(heads, str(folder / "heads.safetensors"))

    t0 = time.perf_counter()
    accuracy: dict[str, dict[str, dict[str, float]]] = {"pretrained": {}, "individual": {}}
    (folder / "finetuned").mkdir()
    jobs = [
        {"spec": spec, "folder": str(folder), "task": task, "seed": spec.seed * 100 + i}
        for i, task in enumerate(spec.tasks)
    ]
    for task, result in zip(spec.tasks, run_jobs(_finetune_task, jobs, workers), strict=True):
        for name in ("pretrained", "individual"):
            for s, acc in result[name].items():
                accuracy[name].setdefault(s, {})[task] = acc
        if log is not None:
            log(
                f"{task}: pretrained {accuracy['pretrained']['test'][task]:.1f}, "
                f"fine-tuned {accuracy['individual']['test'][task]:.1f} (test)"
            )
    timings["finetune_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    timings["total_cpu_s"] = cpu_seconds() - cpu_start  # all threads and the workers' processes
    meta = {"spec": spec.to_json(), "classes": {t: list(data.CLASSES[t]) for t in spec.tasks}, "accuracy": accuracy}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    # timings differ run to run; kept apart so every other file is byte-for-byte reproducible
    (folder / "build_log.json").write_text(json.dumps(timings, indent=1, sort_keys=True))


def load_split(folder: Path, task: str) -> dict[str, Tensor]:
    return load_file(str(folder / f"data_{task}.safetensors"))


DEFAULT_SPEC = TestbedSpec()
__all__ = ["DEFAULT_SPEC", "TestbedSpec", "build", "make_encoder", "preprocess"]
