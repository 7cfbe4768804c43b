"""The GPU path on random weights: exemplar gradients, both merges, evaluation, bf16 vs fp32.

    python benchmarks/gpu_check.py                            # ViT-B/32 on cuda (cpu without one)
    python benchmarks/gpu_check.py --large --json gpu.json    # and ViT-L/14
    python benchmarks/gpu_check.py --device cpu --model tiny --exemplars 4 --tasks 2   # the test's size

Why random weights: the timings and the bf16 error do not depend on what the weights learned, and a
lent GPU machine has no checkpoints or datasets. Shapes are the real ones (open_clip's image tower
for the named model, 224×224 inputs, 10-class heads), and every number comes from the project's own
code: `tatr.core.gradients.gradient_stats` (the exemplar gradients, as `tatr.suites.clip8` runs them,
through its `ImageEncoder`) and `tatr.core.merging.plan_merge` (the merges).

Per model it reports:
* exemplar gradients: seconds for `--exemplars` exemplars × `--tasks` tasks, in fp32 and bf16;
* merges: seconds for a zero-shot and an exemplar TATR merge (plan + merged(q=0.99, λ=0.3)) of
  `--tasks` task vectors θ_0 + N(0, 1e-3²) perturbations, on the CPU as `tatr merge` runs them;
* evaluation: images/s of encoder + head + argmax, fp32 and bf16;
* bf16 check: the relative L2 error ‖s_bf16 − s_fp32‖ / ‖s_fp32‖ of the mean |per-sample gradient|
  (TATR's sensitivity) over all parameters, on the same exemplars. Tolerance `BF16_TOLERANCE`
  (5%): bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per operation) and the
  error grows through the tower's layers; the mask only needs the sensitivities' ranking, which
  a few percent of noise moves little. The run fails (exit 1) when the error is above it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatr.core.gradients import gradient_stats
from tatr.core.merging import plan_merge
from tatr.suites.clip8 import ImageEncoder

BF16_TOLERANCE = 0.05
CLASSES = 10
TINY = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0, "output_dim": 16}


def build_encoder(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, int, int]:
    """A randomly initialised image tower (seed 0) → (encoder, image size, embedding dim).

    `name` is an open_clip model (ViT-B-32, ViT-L-14, ...) or "tiny" (the test's size).
    """
    torch.manual_seed(0)
    if name == "tiny":
        from open_clip.transformer import VisionTransformer

        tower: nn.Module = VisionTransformer(**TINY)
        size, dim = TINY["image_size"], TINY["output_dim"]
    else:
        import open_clip
        from open_clip.model import _build_vision_tower

        config = open_clip.get_model_config(name)
        if config is None:
            raise SystemExit(f"gpu_check: unknown open_clip model '{name}'")
        tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=True)
        size, dim = int(config["vision_cfg"]["image_size"]), int(config["embed_dim"])
    return ImageEncoder(tower).to(device=device, dtype=dtype).eval(), size, dim


def relative_error(approx: Mapping[str, Tensor], exact: Mapping[str, Tensor]) -> float:
    """‖approx − exact‖₂ / ‖exact‖₂ over all tensors together, in float64."""
    if approx.keys() != exact.keys():
        raise ValueError("the two gradient sets have different keys")
    num = sum(float((approx[k].double() - exact[k].double()).square().sum()) for k in exact)
    den = sum(float(exact[k].double().square().sum()) for k in exact)
    return math.sqrt(num / den) if den > 0 else math.inf


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _task_inputs(task: int, n: int, size: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + task)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    head = torch.nn.functional.normalize(torch.randn(CLASSES, dim, generator=gen), dim=-1)
    return x.to(device), y.to(device), head.to(device)


def check_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for one model; see the module docstring."""
    device = torch.device(args.device)
    result: dict[str, Any] = {"model": name, "device": str(device), "exemplars": args.exemplars, "tasks": args.tasks}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    fp32, size, dim = build_encoder(name, device, torch.float32)
    encoders = {"fp32": fp32, "bf16": build_encoder(name, device, torch.bfloat16)[0]}  # same seed: same weights
    scale = 100.0
    gradients: dict[str, list[dict[str, Tensor]]] = {"fp32": [], "bf16": []}
    for precision, encoder in encoders.items():
        total = 0.0
        for task in range(args.tasks):
            x, y, head = _task_inputs(task, args.exemplars, size, dim, device)
            batches = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, len(x), args.batch)]
            (abs_mean, _), seconds = _timed(
                lambda e=encoder, h=head, b=batches: gradient_stats(e, h, scale, b, chunk=args.chunk), device
            )
            total += seconds
            gradients[precision].append({k: v.cpu() for k, v in abs_mean.items()})
        result[f"gradients_{precision}_s"] = total
        result[f"gradients_{precision}_exemplars_per_s"] = args.exemplars * args.tasks / total
    errors = [relative_error(b, f) for b, f in zip(gradients["bf16"], gradients["fp32"], strict=True)]
    result["bf16_relative_error"] = max(errors)
    result["bf16_tolerance"] = BF16_TOLERANCE
    result["bf16_ok"] = bool(max(errors) <= BF16_TOLERANCE)

    theta0 = {k: v.detach().float().cpu() for k, v in encoders["fp32"].state_dict().items()}
    finetuned = []
    for task in range(args.tasks):
        gen = torch.Generator().manual_seed(task)
        finetuned.append({k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()})
    result.update(_merges(theta0, finetuned, gradients["fp32"]))
    del finetuned

    for precision, encoder in encoders.items():
        x, y, head = _task_inputs(0, args.eval_images, size, dim, device)

        @torch.no_grad()
        def evaluate(e: nn.Module = encoder, x: Tensor = x, y: Tensor = y, head: Tensor = head) -> int:
            correct = 0
            for i in range(0, len(x), args.eval_batch):
                feats = torch.nn.functional.normalize(e(x[i : i + args.eval_batch]), dim=-1)
                correct += int(((feats @ head.T).argmax(-1) == y[i : i + args.eval_batch]).sum())
            return correct

        evaluate()  # warm-up (kernel selection, allocator)
        _, seconds = _timed(evaluate, device)
        result[f"eval_{precision}_images_per_s"] = args.eval_images / seconds
    return result


def _merges(
    theta0: dict[str, Tensor], finetuned: list[dict[str, Tensor]], gradients: list[dict[str, Tensor]]
) -> dict[str, float]:
    """Seconds of a zero-shot and an exemplar TATR merge (plan, then q=0.99, λ=0.3), and the share
    of coordinates each moved (a merge that moved nothing would time nothing)."""
    out: dict[str, float] = {}
    total = sum(v.numel() for v in theta0.values())
    for mode, grads in (("zero-shot", None), ("exemplar", gradients)):

        def run(m: str = mode, g: list[dict[str, Tensor]] | None = grads) -> dict[str, Tensor]:
            return plan_merge(theta0, finetuned, method="ta", trust_region=m, gradients=g).merged(0.99, 0.3)

        merged, seconds = _timed(run, torch.device("cpu"))
        out[f"merge_{mode}_s"] = seconds
        out[f"merge_{mode}_moved_fraction"] = sum(int((merged[k] != theta0[k]).sum()) for k in theta0) / total
    return out


ROWS = (
    ("exemplar gradients fp32 (s)", "gradients_fp32_s", "{:.2f}"),
    ("exemplar gradients bf16 (s)", "gradients_bf16_s", "{:.2f}"),
    ("gradients fp32 (exemplars/s)", "gradients_fp32_exemplars_per_s", "{:.1f}"),
    ("gradients bf16 (exemplars/s)", "gradients_bf16_exemplars_per_s", "{:.1f}"),
    ("zero-shot merge (s)", "merge_zero-shot_s", "{:.2f}"),
    ("exemplar merge (s)", "merge_exemplar_s", "{:.2f}"),
    ("evaluation fp32 (images/s)", "eval_fp32_images_per_s", "{:.0f}"),
    ("evaluation bf16 (images/s)", "eval_bf16_images_per_s", "{:.0f}"),
    ("bf16 vs fp32 gradient rel. error", "bf16_relative_error", "{:.4f}"),
)


def markdown(results: list[dict[str, Any]]) -> str:
    head = results[0]
    lines = [
        f"device: {head.get('device_name', head['device'])}; {head['exemplars']} exemplars × {head['tasks']} tasks; "
        f"bf16 tolerance {BF16_TOLERANCE}",
        "",
        "| measure | " + " | ".join(r["model"] for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in results) + " |")
    lines.append("| bf16 within tolerance | " + " | ".join("yes" if r["bf16_ok"] else "NO" for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name, or 'tiny'")
    parser.add_argument("--large", action="store_true", help="also ViT-L-14")
    parser.add_argument("--exemplars", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="exemplars per loader batch")
    parser.add_argument("--chunk", type=int, default=8, help="exemplars differentiated at once (vmap)")
    parser.add_argument("--eval-images", type=int, default=2048)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for flag in ("exemplars", "tasks", "batch", "chunk", "eval_images", "eval_batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.tasks < 2:
        parser.error("--tasks must be at least 2 (a merge needs two task vectors)")
    models = [args.model] + (["ViT-L-14"] if args.large and args.model != "ViT-L-14" else [])
    results = [check_model(m, args) for m in models]
    print(markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    return 0 if all(r["bf16_ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
