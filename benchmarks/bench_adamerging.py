"""AdaMerging steps per second and peak memory on the testbed, as ratios against a TA trial, same run.

    python benchmarks/bench_adamerging.py                      # full testbed if cached, else tiny
    python benchmarks/bench_adamerging.py --steps 20 --repeats 5 --json out.json
    python benchmarks/bench_adamerging.py --preset tiny        # force the tiny preset

The baseline is one TA trial of a sweep: `plan.merged(q=0.99, λ=0.3)` (zero-shot trust region)
plus its evaluation on all validation sets. An AdaMerging step is 2 batches of 16 unlabeled test
inputs per task through the merged model, forward and backward, and one Adam update of λ
(`tatr.core.adamerging`), after the task vectors are masked at q=0.99 and read once (timed
separately as "setup"). Each measurement runs in a process of its own (one torch thread, as the
testbed build), so its peak RSS is its own; the processes run back to back in the same run, so
the ratios are comparable on a busy machine even where the absolute times are not.

The testbed is never built here: the full default testbed is used when `$TATR_CACHE` (or
~/.cache/tatr) holds it, else the tiny preset (built in a temporary cache if needed); the output
says which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # peak_memory beside this file


def _suite(preset: str, cache: str | None):  # -> Testbed
    from tatr.suites import get_suite

    options = {"progress": False} if preset == "default" else {"preset": preset, "progress": False}
    return get_suite("testbed", options, Path(cache) if cache else None)


def child(kind: str, preset: str, cache: str | None, steps: int, repeats: int) -> dict:
    """One measurement in this process: 'ta', or AdaMerging 'task' / 'layer'."""
    import torch

    from tatr.core.adamerging import adamerging, masked_task_vectors
    from tatr.core.checkpoints import load_state_dict
    from tatr.runs.config import ExperimentConfig, MergeConfig
    from tatr.runs.plan import PlanBook
    from tatr.suites.evaluation import evaluate_merged

    torch.set_num_threads(1)
    suite = _suite(preset, cache)
    book = PlanBook(suite, ExperimentConfig(), cache_root=Path(cache) if cache else None)
    plan = book.get(MergeConfig(method="ta", trust_region="zero-shot"))
    out: dict = {"kind": kind, "coordinates": plan.space.numel, "tasks": len(suite.tasks)}
    if kind == "ta":
        evaluate_merged(suite, plan.merged(0.99, 0.3), "validation")  # warm-up
        walls, cpus = [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            evaluate_merged(suite, plan.merged(0.99, 0.3), "validation")
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        out.update(seconds=statistics.median(walls), cpu_seconds=statistics.median(cpus))
    else:
        start = time.perf_counter()
        vectors = masked_task_vectors(plan, 0.99)
        theta0 = load_state_dict(book.pretrained)
        heads = [suite.head(t) for t in suite.tasks]
        model = suite.encoder()
        out["setup_seconds"] = time.perf_counter() - start

        def run(n: int) -> tuple[float, float, object]:
            batches = [suite.unlabeled_loader(t, "test", 16, seed=0) for t in suite.tasks]
            start, cpu = time.perf_counter(), time.process_time()
            result = adamerging(theta0, vectors, model, heads, batches, suite.logit_scale(), granularity=kind, steps=n)
            return time.perf_counter() - start, time.process_time() - cpu, result

        run(1)  # warm-up
        wall, cpu, result = run(steps)
        out.update(
            steps=steps,
            seconds=wall / steps,
            cpu_seconds=cpu / steps,
            coefficients=int(result.coefficients.numel()),  # type: ignore[attr-defined]
        )
    # this process's own peak (VmHWM): getrusage's ru_maxrss would carry the parent's across fork and exec
    from peak_memory import own_peak_mib

    out["max_rss_mib"] = own_peak_mib()
    return out


def full_testbed_cached(cache: str | None) -> bool:
    from tatr.core.cache import default_cache_root
    from tatr.suites.testbed import spec_from_options, spec_key

    root = Path(cache) if cache else default_cache_root()
    return (root / "testbed" / spec_key(spec_from_options({}))).is_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("auto", "default", "tiny"), default="auto")
    parser.add_argument("--cache", default=None, help="testbed cache root (default: $TATR_CACHE or ~/.cache/tatr)")
    parser.add_argument("--steps", type=int, default=20, help="AdaMerging steps timed per granularity")
    parser.add_argument("--repeats", type=int, default=5, help="TA merge+evaluation repeats (median)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.preset, args.cache, args.steps, args.repeats)))
        return
    preset, cache = args.preset, args.cache
    if preset == "auto":
        preset = "default" if full_testbed_cached(cache) else "tiny"
    if preset == "tiny" and cache is None:
        cache = tempfile.mkdtemp(prefix="tatr-bench-")
    print(f"testbed: {preset} ({'cached' if preset == 'default' else 'tiny preset'}), cache {cache or 'default'}")
    results = {}
    for kind in ("ta", "task", "layer"):
        cmd = [sys.executable, __file__, "--child", kind, "--preset", preset, "--steps", str(args.steps)]
        cmd += ["--repeats", str(args.repeats)] + (["--cache", cache] if cache else [])
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    ta = results["ta"]
    print(f"\nT = {ta['tasks']} tasks, {ta['coordinates']:,} merged coordinates; one torch thread per process")
    print(f"{'measurement':<34} {'s/step':>9} {'steps/s':>8} {'CPU s':>8} {'× TA':>6} {'peak RSS':>10} {'× TA':>6}")
    rows = [("TA trial (merge + eval, validation)", ta)]
    rows += [(f"AdaMerging {k}-wise step", results[k]) for k in ("task", "layer")]
    for name, r in rows:
        speed, memory = r["seconds"] / ta["seconds"], r["max_rss_mib"] / ta["max_rss_mib"]
        print(
            f"{name:<34} {r['seconds']:9.3f} {1 / r['seconds']:8.2f} {r['cpu_seconds']:8.3f} "
            f"{speed:6.2f} {r['max_rss_mib']:8.0f} MiB {memory:6.2f}"
        )
    for k in ("task", "layer"):
        r = results[k]
        print(f"AdaMerging {k}-wise: {r['coefficients']} coefficients, setup (mask + read T task vectors) "
              f"{r['setup_seconds']:.2f} s, {r['steps']} steps timed")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"preset": preset, **results}, indent=1))


if __name__ == "__main__":
    main()
