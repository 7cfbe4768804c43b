"""Wall time and peak RSS of `tatr merge` with DARE, DARE-TIES and Breadcrumbs, as ratios against TA.

Every method runs as its own process on the same synthetic checkpoints (open_clip's visual-tower
shapes, built with pretrained=None, nothing downloaded), TA first, in the same run, so the ratios
mean something on a noisy machine while absolute numbers do not. Its ratio between the largest and
the smallest T shows whether peak memory grows with the number of tasks (it should not: every
method streams one tensor of one task at a time).

Peak memory is the merge process's own high-water RSS (`VmHWM` of /proc/self/status, read by the
process itself as it ends), not `wait4`'s ru_maxrss: Linux carries ru_maxrss across fork and exec,
so a child of this script would report at least this script's own peak (the models it generated).

    python benchmarks/bench_sparsifiers.py --model ViT-B-32 --tasks 8 20 [--trust-region off|zero-shot]
        [--blocks K]   (only the first K residual blocks, each tensor at its full ViT shape: a smaller run)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ROOT, visual_shapes, write_models  # the merge benchmark's shapes and files

METHODS = ("ta", "dare", "dare-ties", "breadcrumbs")  # TA first: the baseline of every ratio


# `tatr merge` in-process, then the process's own peak RSS (kB) on stderr's last line
RUN_AND_REPORT = (
    "import sys; from tatr.cli import main; code = main(sys.argv[1:]); "
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
    "print('VmHWM', hwm, file=sys.stderr); sys.exit(code)"
)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, the process's own peak RSS in MiB) of one `tatr merge` run."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("VmHWM ")]
    return seconds, int(lines[-1].split()[1]) / 1024


def merge_cmd(work: Path, ft: list[Path], method: str, trust_region: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        RUN_AND_REPORT,
        "merge",
        "--quiet",
        "-p",
        str(work / "pre.safetensors"),
        "-f",
        *map(str, ft),
        "--method",
        method,
        "--trust-region",
        trust_region,
        "--lam",
        "0.3",
        "-o",
        str(work / f"{method}.safetensors"),
    ]


def first_blocks(shapes: dict[str, tuple[int, ...]], blocks: int | None) -> dict[str, tuple[int, ...]]:
    """The stem, the head and the first `blocks` residual blocks (every tensor keeps its shape)."""
    if blocks is None:
        return shapes
    block = re.compile(r"(?:^|\.)resblocks\.(\d+)\.")
    return {k: s for k, s in shapes.items() if (m := block.search(k)) is None or int(m.group(1)) < blocks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    ap.add_argument("--trust-region", default="off", help="off (the plain methods) or a mode, e.g. zero-shot")
    ap.add_argument("--methods", nargs="+", default=list(METHODS[1:]), help="measured against TA")
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first K residual blocks")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    shapes = first_blocks(visual_shapes(args.model), args.blocks)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    rows = []
    for tasks in args.tasks:
        work = Path(tempfile.mkdtemp(prefix="tatr-bench-sparse-", dir=args.workdir))
        try:
            ft = write_models(work, shapes, tasks)
            measured = {m: timed(merge_cmd(work, ft, m, args.trust_region)) for m in ["ta", *args.methods]}
            ta_s, ta_mib = measured["ta"]
            for method, (seconds, mib) in measured.items():
                rows.append(
                    {
                        "model": args.model if args.blocks is None else f"{args.model} ({args.blocks} blocks)",
                        "params": n,
                        "tasks": tasks,
                        "trust_region": args.trust_region,
                        "method": method,
                        "seconds": seconds,
                        "peak_mib": mib,
                        "time_vs_ta": seconds / ta_s,
                        "memory_vs_ta": mib / ta_mib,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    smallest, largest = min(args.tasks), max(args.tasks)
    peak = {(r["method"], r["tasks"]): r["peak_mib"] for r in rows}
    print()
    print(f"| model | params | T | method | s | peak MiB | time ÷ TA | memory ÷ TA | peak ÷ peak at T={smallest} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        growth = r["peak_mib"] / peak[r["method"], smallest]
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tasks']} | {r['method']} | {r['seconds']:.1f} | "
            f"{r['peak_mib']:.0f} | {r['time_vs_ta']:.2f}× | {r['memory_vs_ta']:.2f}× | {growth:.2f}× |"
        )
    if largest != smallest:
        print(
            f"\n(trust region: {args.trust_region}; last column: the peak at T={largest} over the peak at T={smallest})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
