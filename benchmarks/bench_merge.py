"""Wall time and peak RSS of `tatr merge --trust-region zero-shot` against a literal baseline.

The baseline is what a straightforward implementation (FusionBench's TATR) does: load every state
dict, flatten all T task vectors into one [T, N] matrix, loop over all task pairs for Ω, fully sort
Ω for the threshold. Both run as separate processes on the same synthetic files, in the same run,
so the ratios are meaningful on a noisy machine; absolute numbers are not.

Shapes are those of open_clip's visual towers (built with pretrained=None, nothing downloaded).

    python benchmarks/bench_merge.py --model ViT-B-32 --tasks 8 20 [--skip-baseline-over-gib 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peak_memory beside this file
ROOT = Path(__file__).resolve().parents[1]


def visual_shapes(model: str) -> dict[str, tuple[int, ...]]:
    import open_clip

    m = open_clip.create_model(model, pretrained=None)
    return {k: tuple(v.shape) for k, v in m.visual.state_dict().items()}


def write_models(folder: Path, shapes: dict[str, tuple[int, ...]], tasks: int, seed: int = 0) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(pre, folder / "pre.safetensors")
    paths = []
    for t in range(tasks):
        ft = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        paths.append(folder / f"ft{t:02d}.safetensors")
        save_file(ft, paths[-1])
        del ft
    return paths


def baseline(pre_path: str, ft_paths: list[str], q: float, lam: float, out: str) -> None:
    """Literal TATR: flatten all task vectors, O(T²) pairs, full sort."""
    pre = load_file(pre_path)
    fts = [load_file(p) for p in ft_paths]
    keys = list(pre)
    flat_pre = torch.cat([pre[k].reshape(-1) for k in keys])
    taus = torch.stack([torch.cat([ft[k].reshape(-1) for k in keys]) - flat_pre for ft in fts])
    omega = torch.zeros_like(flat_pre)
    for i in range(len(fts)):
        for j in range(len(fts)):
            if i != j:
                omega += taus[i].abs() * taus[j].abs()
    sorted_omega = torch.sort(omega).values
    threshold = sorted_omega[int(q * omega.numel())]
    mask = omega < threshold
    merged = flat_pre + lam * (taus * mask).sum(0)
    out_sd, offset = {}, 0
    for k in keys:
        n = pre[k].numel()
        out_sd[k] = merged[offset : offset + n].view(pre[k].shape).clone()
        offset += n
    save_file(out_sd, out)


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run `python …`; return (seconds, peak RSS in MiB) of that process alone: its own VmHWM, not wait4's
    ru_maxrss, which carries this script's peak (the generated checkpoints) into the child
    (`benchmarks/peak_memory.py`)."""
    from peak_memory import measured

    return measured(cmd[1:], env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    ap.add_argument("--q", type=float, default=0.99)
    ap.add_argument(
        "--skip-baseline-over-gib", type=float, default=16.0, help="skip the baseline if it would need more"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    shapes = visual_shapes(args.model)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    rows = []
    for tasks in args.tasks:
        work = Path(tempfile.mkdtemp(prefix="tatr-bench-", dir=args.workdir))
        try:
            ft = write_models(work, shapes, tasks)
            ours_cmd = [
                sys.executable,
                "-m",
                "tatr",
                "merge",
                "--quiet",
                "-p",
                str(work / "pre.safetensors"),
                "-f",
                *map(str, ft),
                "--q",
                str(args.q),
                "--lam",
                "0.3",
                "-o",
                str(work / "ours.safetensors"),
            ]
            t_ours, m_ours = timed(ours_cmd)
            need_gib = (2 * tasks + 4) * n * 4 / 2**30  # loaded dicts + flattened τ + Ω + sort
            if need_gib <= args.skip_baseline_over_gib:
                base_cmd = [
                    sys.executable,
                    __file__,
                    "--_baseline",
                    str(work / "pre.safetensors"),
                    str(args.q),
                    str(work / "base.safetensors"),
                    *map(str, ft),
                ]
                t_base, m_base = timed(base_cmd)
                diff = max(
                    float((a - b).abs().max())
                    for a, b in zip(
                        load_file(work / "ours.safetensors").values(),
                        load_file(work / "base.safetensors").values(),
                        strict=True,
                    )
                )
            else:
                t_base = m_base = diff = float("nan")
            rows.append(
                {
                    "model": args.model,
                    "params": n,
                    "tasks": tasks,
                    "ours_s": t_ours,
                    "ours_peak_mib": m_ours,
                    "baseline_s": t_base,
                    "baseline_peak_mib": m_base,
                    "speedup": t_base / t_ours,
                    "memory_ratio": m_ours / m_base,
                    "max_abs_diff": diff,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| model | params | T | tatr s | tatr peak MiB | baseline s | baseline peak MiB | speed-up | memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tasks']} | {r['ours_s']:.1f} | "
            f"{r['ours_peak_mib']:.0f} | "
            f"{r['baseline_s']:.1f} | {r['baseline_peak_mib']:.0f} | {r['speedup']:.1f}× | {r['memory_ratio']:.2f}× |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_baseline":
        _, _, pre, q, out, *fts = sys.argv
        baseline(pre, fts, float(q), 0.3, out)
    else:
        main()
