"""Testbed build speed against torch's thread count, on a quiet machine and beside a CPU hog.

    python benchmarks/bench_build_threads.py                       # default testbed, 1 and 2 threads, 0 and 1 hog
    python benchmarks/bench_build_threads.py --threads 1 2 4 --hogs 0 1 3 --json threads.json
    python benchmarks/bench_build_threads.py --preset tiny --steps 5 --warmup 1   # a smoke run

Why: `tatr.suites.testbed.build` runs the whole build on one torch thread, because the built
bytes depend on the thread count (see its docstring) and because more threads are much slower as
soon as another process wants the cores. This measures both sides on your machine: steps/s of the
build's pretraining step loop (the same encoder, batch, loss and AdamW step as `pretrain`, on
`pretrain_batch` samples drawn as the build draws them) with each thread count, alone and with
`--hogs` busy-looping Python processes beside it. Each row's ratio is against 1 thread under the
same load, measured in the same run. Do not run it while other heavy jobs share the machine unless
that is the condition you want to measure: the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatr.suites import testbed as testbed_mod
from tatr.suites.base import torch_threads
from tatr.suites.testbed import build as tb


def step_loop(spec: tb.TestbedSpec, pools: dict, steps: int, warmup: int) -> float:
    """Steps/s of `pretrain`'s inner loop (fresh encoder and classifiers from the spec's seed)."""
    torch.manual_seed(spec.seed)
    encoder = tb.make_encoder(spec)
    classifiers = nn.ParameterDict(
        {t: nn.Parameter(torch.randn(len(tb.data.CLASSES[t]), spec.embed_dim) * 0.1) for t in spec.tasks}
    )
    opt = torch.optim.AdamW([*encoder.parameters(), *classifiers.parameters()], lr=spec.pretrain_lr)
    per_task = max(1, spec.pretrain_batch // len(spec.tasks))
    batches = [tb.pretrain_batch(spec, pools, step, per_task) for step in range(warmup + steps)]
    encoder.train()
    start = 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        feats = encoder(tb.preprocess(torch.cat([batch[t][0] for t in spec.tasks])))
        loss = torch.zeros(())
        for i, t in enumerate(spec.tasks):
            f = feats[i * per_task : (i + 1) * per_task]
            loss = loss + F.cross_entropy(tb.cosine_logits(f, classifiers[t], 20.0), batch[t][1])
        opt.zero_grad(set_to_none=True)
        (loss / len(spec.tasks)).backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def start_hogs(n: int) -> list[subprocess.Popen]:
    """`n` processes that each keep one core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for proc in hogs:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=sorted(testbed_mod.PRESETS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 1], help="busy processes beside the build")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if min(args.threads) < 1 or min(args.hogs) < 0 or args.steps < 1 or args.warmup < 0:
        parser.error("--threads and --steps must be at least 1, --hogs and --warmup at least 0")
    threads = sorted(set(args.threads) | {1})  # 1 thread is the baseline of every ratio
    spec = testbed_mod.spec_from_options({"preset": args.preset})
    pools = tb.build_data(spec)
    rows = []
    for hogs in args.hogs:
        procs = start_hogs(hogs)
        try:
            time.sleep(1.0 if hogs else 0.0)  # let the hogs get scheduled
            speeds = {}
            for n in threads:
                with torch_threads(n):
                    speeds[n] = step_loop(spec, pools, args.steps, args.warmup)
            load = os.getloadavg()[0]
        finally:
            stop_hogs(procs)
        rows += [
            {"hogs": hogs, "threads": n, "steps_per_s": s, "ratio": s / speeds[1], "load": load}
            for n, s in speeds.items()
        ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"testbed preset '{args.preset}', {cores} usable cores, torch {torch.__version__}, {args.steps} steps\n")
    print("| other busy processes | torch threads | steps/s | × 1 thread | load average (1 min) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hogs']} | {r['threads']} | {r['steps_per_s']:.1f} | {r['ratio']:.2f} | {r['load']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"preset": args.preset, "cores": cores, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
