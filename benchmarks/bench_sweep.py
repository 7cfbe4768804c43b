"""A 50-trial TATR sweep on the testbed against a naive loop that recomputes Ω for every trial.

Three measurements, in one run on the same machine:

1. `tatr sweep` itself (`tatr.runs.sweep.run.run_sweep`, sweeps/tatr.yaml, TPE, median pruner, W&B
   offline unless --no-wandb) with a cold plan cache: wall time and trials per minute. The plan
   cache is cold because TATR_CACHE points at a fresh folder that links only the suite's own
   build (testbed/, gradients/) from the real cache.
2. The naive loop over the same (λ, q) in the same order: per trial `tatr.core.one_shot.merge` from the
   checkpoint files (task vectors streamed again, Ω and the exact selection recomputed), then the
   full validation evaluation (no pruning), then one final test evaluation like the sweep's.
   Reported as naive wall / sweep wall. Also the sweep rerun with --pruner none, so the ratio
   without pruning's savings is visible.
3. Interleaved: for the first N of those (λ, q), a naive trial and a cached trial (same merge,
   full evaluation, no Optuna) back to back; the load of a shared machine drifts over minutes and
   alternating cancels most of it from the ratio.
4. The merge alone on the testbed model (min of repeats): a trial's merge (`MergePlan.merged`, new
   q and λ each time), a plain TA merge with the same cached inputs (θ0 + λΣτ), and the naive
   per-trial merge. The target is trial / TA ≤ 1.5.

    python benchmarks/bench_sweep.py [--experiment experiments/testbed.yaml] [--trials 50] [KEY=VALUE ...]
    python benchmarks/bench_sweep.py suite.preset=tiny --trials 10      # a quick check

Timings on 2 shared cores are noisy: the script prints the load average and process CPU time
(this process only: W&B's service process is not counted) beside wall time, and the interleaved
ratio is the one that survives a load that drifts between phases.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_EXPERIMENT = {"name": "testbed", "benchmark": "testbed", "suite": {}}


def cold_plan_cache(real: Path) -> Path:
    """A fresh cache root sharing the suite's builds but not the sweep's plan cache."""
    fresh = Path(tempfile.mkdtemp(prefix="tatr-bench-cache-"))
    for name in ("testbed", "gradients", "sweep-toy"):
        if (real / name).exists():
            (fresh / name).symlink_to(real / name)
    return fresh


def experiment_file(path: Path | None, work: Path) -> Path:
    if path is not None:
        return path
    default = ROOT / "experiments" / "testbed.yaml"
    if default.is_file():
        return default
    out = work / "testbed.yaml"
    out.write_text(json.dumps(DEFAULT_EXPERIMENT))
    return out


def run_sweep_timed(exp: Path, overrides: list[str], trials: int, root: Path, study: str, **kw) -> tuple[float, object]:
    from tatr.runs.sweep.run import run_sweep

    start, cpu = time.perf_counter(), time.process_time()
    result = run_sweep(exp, ROOT / "sweeps" / "tatr.yaml", overrides, trials=trials, study=study, results=root,
                       progress=True, **kw)  # fmt: skip
    result.cpu_seconds = time.process_time() - cpu  # type: ignore[attr-defined]
    return time.perf_counter() - start, result


def naive_loop(config, params: list[dict]) -> tuple[float, list[float]]:
    """Every trial from scratch: stream the checkpoints, recompute Ω and the selection, merge, evaluate."""
    from tatr.core.one_shot import merge
    from tatr.suites import get_suite

    start, cpu = time.perf_counter(), time.process_time()
    suite = get_suite(config.benchmark, config.suite)
    ckpt = suite.checkpoints()
    fts = [ckpt.finetuned[t] for t in suite.tasks]
    merge_seconds = []
    for p in params:
        t0 = time.perf_counter()
        sd = merge(ckpt.pretrained, fts, trust_region=config.merge.trust_region, q=p["q"], lam=p["lam"])
        merge_seconds.append(time.perf_counter() - t0)
        suite.evaluate(sd, config.split)
    best = params[0]  # one final test evaluation, as the sweep does (which parameters does not matter)
    suite.evaluate(merge(ckpt.pretrained, fts, q=best["q"], lam=best["lam"]), "test")
    return time.perf_counter() - start, time.process_time() - cpu, merge_seconds


def interleaved(config, params: list[dict], q_min: float) -> dict[str, float]:
    """Per trial, the naive trial and the cached trial back to back (same λ, q): the load of a
    shared machine drifts over minutes, so alternating cancels most of it out of the ratio."""
    from tatr.core.merging import MergePlan, plan_merge
    from tatr.core.one_shot import merge
    from tatr.suites import get_suite

    suite = get_suite(config.benchmark, config.suite)
    ckpt = suite.checkpoints()
    fts = [ckpt.finetuned[t] for t in suite.tasks]
    mode = config.merge.trust_region
    folder = Path(tempfile.mkdtemp(prefix="tatr-bench-plan-"))
    plan = plan_merge(ckpt.pretrained, fts, trust_region=mode)
    plan.prepare([q_min])
    plan.save(folder)
    cached = MergePlan.load(folder, plan.task_set, plan.method, mode, cache_pretrained=True)
    suite.evaluate(cached.merged(0.99, 0.3), config.split)  # load the data once, outside the timing
    naive_s = cached_s = 0.0
    for p in params:
        t0 = time.perf_counter()
        suite.evaluate(merge(ckpt.pretrained, fts, trust_region=mode, q=p["q"], lam=p["lam"]), config.split)
        naive_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        suite.evaluate(cached.merged(p["q"], p["lam"]), config.split)
        cached_s += time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return {"trials": len(params), "naive_s": naive_s, "cached_s": cached_s, "naive_over_cached": naive_s / cached_s}


def merge_costs(config, repeats: int = 20) -> dict[str, float]:
    """Min-of-repeats seconds: trial merge, plain TA merge (same cached inputs), naive merge."""
    from tatr.core.merging import MergePlan, plan_merge
    from tatr.core.one_shot import merge
    from tatr.suites import get_suite

    suite = get_suite(config.benchmark, config.suite)
    ckpt = suite.checkpoints()
    fts = [ckpt.finetuned[t] for t in suite.tasks]
    ta = plan_merge(ckpt.pretrained, fts, trust_region="off", cache_pretrained=True)
    folder = Path(tempfile.mkdtemp(prefix="tatr-bench-plan-"))
    plan_merge(ckpt.pretrained, fts, trust_region=config.merge.trust_region).save(folder)
    tr = MergePlan.load(folder, ta.task_set, ta.method, config.merge.trust_region, cache_pretrained=True)
    tr.prepare([0.9])
    rng = random.Random(0)
    t_ta, t_tr, t_naive = [], [], []
    tr.merged(0.99, 0.3), ta.merged(0.99, 0.3)  # warm the θ0 caches
    for i in range(repeats):
        q, lam = rng.uniform(0.9, 1.0), rng.uniform(0.05, 1.0)
        t0 = time.perf_counter()
        ta.merged(q, lam)
        t_ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tr.merged(q, lam)
        t_tr.append(time.perf_counter() - t0)
        if i < 5:
            t0 = time.perf_counter()
            merge(ckpt.pretrained, fts, trust_region=config.merge.trust_region, q=q, lam=lam)
            t_naive.append(time.perf_counter() - t0)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "params": tr.num_coordinates,
        "ta_merge_s": min(t_ta),
        "trial_merge_s": min(t_tr),
        "trial_over_ta": min(t_tr) / min(t_ta),
        "trial_over_ta_median": sorted(t_tr)[len(t_tr) // 2] / sorted(t_ta)[len(t_ta) // 2],
        "naive_merge_s": min(t_naive),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--experiment", type=Path, default=None)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-unpruned", action="store_true")
    ap.add_argument("--interleaved", type=int, default=20, metavar="N", help="naive/cached pairs (0: skip)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from tatr.core.cache import default_cache_root
    from tatr.runs.config import load_config
    from tatr.runs.sweep.space import load_search_space
    from tatr.store.rows import read_store
    from tatr.suites import get_suite

    work = Path(tempfile.mkdtemp(prefix="tatr-bench-sweep-"))
    exp = experiment_file(args.experiment, work)
    space = load_search_space(ROOT / "sweeps" / "tatr.yaml")
    config = load_config(exp, [*space.merge_overrides(), *args.overrides])
    get_suite(config.benchmark, config.suite).checkpoints()  # build the suite first (not timed)
    if not args.no_wandb:  # one-off imports are not what is compared (the naive loop has none)
        import wandb.sdk.launch  # noqa: F401
    os.environ["TATR_CACHE"] = str(cold_plan_cache(default_cache_root()))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    out: dict[str, object] = {"experiment": str(exp), "overrides": args.overrides, "trials": args.trials,
                              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}  # fmt: skip
    load0 = os.getloadavg()[0]
    wall, result = run_sweep_timed(exp, args.overrides, args.trials, work / "results", "bench", wandb=not args.no_wandb)
    out.update(sweep_s=wall, sweep_cpu_s=result.cpu_seconds, sweep_trials_per_min=60 * args.trials / wall,
               sweep_pruned=result.pruned,
               best_params=result.best_params, load_before=load0, load_after=os.getloadavg()[0])  # fmt: skip
    rows = read_store(work / "results")
    trials = rows[rows.job_type == "trial"].groupby("run_id").first().sort_values("trial")
    out["sweep_trial_merge_s_median"] = float(trials.merge_seconds.median())
    out["sweep_trial_eval_s_median"] = float(trials.eval_seconds.median())
    params = [{"lam": float(r.lam), "q": float(r.q)} for r in trials.itertuples()]
    if not args.skip_unpruned:
        wall2, res2 = run_sweep_timed(exp, args.overrides, args.trials, work / "results2", "bench-unpruned",
                                   wandb=not args.no_wandb, pruner="none")  # fmt: skip
        out.update(sweep_unpruned_s=wall2, sweep_unpruned_cpu_s=res2.cpu_seconds,
                   sweep_unpruned_trials_per_min=60 * args.trials / wall2)  # fmt: skip
    if not args.skip_naive:
        naive_wall, naive_cpu, naive_merges = naive_loop(config, params)
        out.update(naive_s=naive_wall, naive_cpu_s=naive_cpu, naive_trials_per_min=60 * len(params) / naive_wall,
                   naive_merge_s_median=sorted(naive_merges)[len(naive_merges) // 2],
                   naive_over_sweep=naive_wall / wall)  # fmt: skip
        if "sweep_unpruned_s" in out:
            out["naive_over_sweep_unpruned"] = naive_wall / out["sweep_unpruned_s"]  # type: ignore[operator]
    if args.interleaved:
        out["interleaved"] = interleaved(config, params[: args.interleaved], min(p["q"] for p in params))
    out["merge"] = merge_costs(config)
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(os.environ["TATR_CACHE"], ignore_errors=True)


if __name__ == "__main__":
    main()
