"""Exemplar gradients: vectorised `vmap(grad)` against one backward pass per sample, same run.

    python benchmarks/bench_gradients.py                 # testbed ViT and ViT-B/32, 8 exemplars
    python benchmarks/bench_gradients.py --threads 2 --repeats 3 --json out.json

For each model it times `gradient_stats` (vmap, MATH attention), the same with PyTorch's fused
attention kernel (which has no vmap batching rule: the "fallback" column), and the reference
`gradient_stats_loop`, checks that the results agree, and prints loop time ÷ vmap time. Weights
and inputs are random (timing does not depend on their values); shapes are the real ones:
the default testbed encoder on 16×16 images, and CLIP ViT-B/32's visual tower on 224×224.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatr.core.gradients import gradient_stats, gradient_stats_loop
from tatr.suites.testbed.build import DEFAULT_SPEC, make_encoder


def models() -> dict[str, tuple[VisionTransformer, int, int]]:
    """name → (encoder, image size, embedding dim)."""
    torch.manual_seed(0)
    vit_b32 = VisionTransformer(
        image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512
    )
    return {
        "testbed": (make_encoder(DEFAULT_SPEC), 16, DEFAULT_SPEC.embed_dim),
        "ViT-B/32": (vit_b32, 224, 512),
    }


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median wall time, median process CPU time (fairer on a shared machine), last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), out


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def bench_one(name: str, model: VisionTransformer, size: int, dim: int, args: argparse.Namespace) -> dict:
    model.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.exemplars, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (args.exemplars,), generator=gen)
    head = F.normalize(torch.randn(10, dim, generator=gen), dim=-1)
    batches = [(x, y)]
    gradient_stats(model, head, 100.0, [(x[:2], y[:2])], chunk=2)  # warm-up (functorch tracing)
    gradient_stats_loop(model, head, 100.0, [(x[:1], y[:1])])
    t_vmap, c_vmap, (abs_v, signed_v) = timed(
        lambda: gradient_stats(model, head, 100.0, batches, chunk=args.chunk), args.repeats
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "performance drop ... batching rule"
        t_fallback, c_fallback, _ = timed(
            lambda: gradient_stats(model, head, 100.0, batches, chunk=args.chunk, math_attention=False), 1
        )
    t_loop, c_loop, (abs_l, signed_l) = timed(lambda: gradient_stats_loop(model, head, 100.0, batches), args.repeats)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vmap_s": t_vmap,
        "fused_attention_fallback_s": t_fallback,
        "loop_s": t_loop,
        "loop_over_vmap": t_loop / t_vmap,
        "vmap_cpu_s": c_vmap,
        "fused_attention_fallback_cpu_s": c_fallback,
        "loop_cpu_s": c_loop,
        "loop_over_vmap_cpu": c_loop / c_vmap,
        "max_rel_err": max(max_rel(abs_v, abs_l), max_rel(signed_v, signed_l)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exemplars", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=None, help="samples per vmap call (default: auto_chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", nargs="*", default=None, help="subset of: testbed ViT-B/32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.exemplars} exemplars, "
        f"chunk {args.chunk or 'auto'}, median of {args.repeats}"
    )
    rows = []
    for name, (model, size, dim) in models().items():
        if args.models and name not in args.models:
            continue
        row = bench_one(name, model, size, dim, args)
        rows.append(row)
        print(
            f"{name:>9}: {row['parameters']:>11,} params  vmap {row['vmap_s']:7.3f}s  "
            f"(fused-attention fallback {row['fused_attention_fallback_s']:7.3f}s)  loop {row['loop_s']:7.3f}s  "
            f"loop/vmap {row['loop_over_vmap']:.2f}x\n{'':>11}CPU time: vmap {row['vmap_cpu_s']:7.3f}s  "
            f"(fallback {row['fused_attention_fallback_cpu_s']:7.3f}s)  loop {row['loop_cpu_s']:7.3f}s  "
            f"loop/vmap {row['loop_over_vmap_cpu']:.2f}x  max rel err {row['max_rel_err']:.1e}"
        )
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
