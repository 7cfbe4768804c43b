"""Independent build jobs (one fine-tune per task) in parallel processes of one torch thread each.

Why processes and not threads: a build pins one intra-op torch thread because the bytes of a matrix product
depend on the thread count (`built_suite.pinned_build`), which left every other core idle. A job that gets
the same inputs, seed and thread count in a process of its own computes the same bytes, so the suites run
their fine-tunes here and their tests compare the files of a one-worker and a two-worker build. Processes are
spawned (not forked: a forked torch can deadlock in its thread pools), so a job and its function must be
picklable and importable; jobs pass file paths rather than large tensors.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch

J = TypeVar("J")
R = TypeVar("R")


def default_workers(jobs: int) -> int:
    """One process per core, at most one per job."""
    return max(1, min(jobs, os.cpu_count() or 1))


def _init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(fn: Callable[[J], R], jobs: Sequence[J], workers: int | None = None) -> list[R]:
    """`fn(job)` for every job, results in job order: in `workers` spawned processes (default: one per core)
    on the caller's torch thread count, or in this process when one worker (or one job) is asked for."""
    workers = default_workers(len(jobs)) if workers is None else workers
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    threads = torch.get_num_threads()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init, initargs=(threads,)) as pool:
        return list(pool.map(fn, jobs))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (the workers), user + system."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
