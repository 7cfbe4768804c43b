"""Suite builds with their fine-tunes in one process against several worker processes, on the same machine.

    python benchmarks/bench_build_workers.py                          # testbed and text, 1 and 2 workers
    python benchmarks/bench_build_workers.py --suites testbed text lm --lm-only en-genre language
    python benchmarks/bench_build_workers.py --suites testbed --testbed-preset tiny --json workers.json  # smoke

Why: every build runs on one torch thread so that its bytes do not depend on the machine's load
(`tatr.suites.built_suite.pinned_build`); since issue 21 the independent fine-tunes run in processes of one
thread each (`tatr.suites.workers`), with the same bytes. Each row builds the suite from scratch into a fresh
cache folder (`TATR_CACHE` for the suites' reads: the text suite needs `tatr prepare-text`, the causal-LM
suite `tatr prepare-lm` too) and reports wall and CPU time (the workers' included) from the build's own
`build_log.json`, and the ratio against one worker measured in the same run. It also checks that the
two builds wrote the same bytes. Run it on a quiet machine: the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tatr.suites import get_suite


def digests(folder: Path) -> dict[str, str]:
    """Every file of a build but its timings, its paths (meta) and the manifest of their digests."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("build_log.json", "meta.json", "manifest.json")
    }


def build_once(suite: str, options: dict, workers: int) -> tuple[dict, dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="tatr-bench-workers-") as tmp:
        s = get_suite(suite, {**options, "build_workers": workers, "progress": False}, Path(tmp))
        start = time.perf_counter()
        folder = s.folder
        wall = time.perf_counter() - start
        log = json.loads((folder / "build_log.json").read_text())
        return {"wall_s": wall, "cpu_s": log.get("total_cpu_s"), "workers": log.get("workers")}, digests(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", nargs="+", default=["testbed", "text"], choices=["testbed", "text", "lm"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--testbed-preset", default=None, help="e.g. tiny, for a smoke run")
    parser.add_argument("--lm-only", nargs="*", default=None, help="a subset of the causal-LM suite's tasks")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    options = {
        "testbed": {"preset": args.testbed_preset} if args.testbed_preset else {},
        "text": {},
        "lm": {"only": args.lm_only} if args.lm_only else {},
    }
    if "lm" in args.suites:  # the prepared θ_0 folder lives in the default cache, not in each build's fresh one
        from tatr.suites.causal_lm.model import resolve_lm

        options["lm"]["model"] = str(resolve_lm("smollm2"))
    rows = []
    print(f"{os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| suite | workers | wall s | CPU s | × 1 worker | same bytes | load average |")
    print("|---|---|---|---|---|---|---|")
    for suite in args.suites:
        base = None
        for workers in args.workers:
            row, files = build_once(suite, options[suite], workers)
            base = base or (row, files)
            row.update(suite=suite, ratio=base[0]["wall_s"] / row["wall_s"], same=files == base[1])
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            if not row["same"]:
                differ = sorted(k for k in {*files, *base[1]} if files.get(k) != base[1].get(k))
                print(f"files that differ from the one-worker build: {', '.join(differ)}", flush=True)
            print(
                f"| {suite} | {workers} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['ratio']:.2f}× | "
                f"{'yes' if row['same'] else 'NO'} | {row['load']:.2f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
