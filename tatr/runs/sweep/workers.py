"""Sweep workers: run trials until the study is full, and never outlive the `tatr sweep` that
started them.

Signals. `tatr sweep --workers K` spawns K processes. SIGINT or SIGTERM to the parent terminates
them all and waits (then kills a worker that ignores SIGTERM for `STOP_SECONDS`). Each worker
turns SIGTERM into `SystemExit`, so its `finally` blocks remove temporaries, and asks the kernel
to send it SIGTERM when the parent dies (Linux `PR_SET_PDEATHSIG`, elsewhere a thread polling the
parent pid), so even a SIGKILLed parent leaves no worker running.

Seeds. Workers of one study must not share a sampler seed: two processes that draw from the same
seed propose the same (λ, q), so twin sweeps on one storage (`--no-final` on each machine, or two
`tatr sweep` started at once) would repeat each other's trials. The number of trials a process sees
when it starts cannot tell them apart (processes started together see the same count), its
identity can: host, pid and process start time, recorded in the study's worker registry
(`tatr.runs.sweep.study.register_worker`). So a worker registers first and then chooses its seed
(`worker_seed`): the experiment's `seed` if it is the study's only registered worker and no trial
has been started (a fresh study swept by one process samples exactly as `seed` says, as before),
otherwise a hash of `seed` and its identity. Every storage tatr opens orders these writes and
reads (SQLite's database lock, PostgreSQL's committed reads, the journal's append lock), so of two
processes that register at once at most one can read a registry holding only itself: at most one
worker of a study ever uses `seed` itself. The seed a worker used is recorded in its registry entry,
to reproduce its draws. The grid sampler is the exception (`worker_sampler`): Optuna's
`GridSampler` gives trial n the n-th point of a grid shuffled by its seed, and trial numbers are
unique in a study, so every worker keeps the study's seed (one shuffle, no point twice) and only
the random pick it falls back on after the first pass (retries) is reseeded per worker.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tatr.core.errors import TatrError
from tatr.runs.sweep.space import SearchSpace, make_sampler
from tatr.runs.sweep.storage import open_storage
from tatr.runs.sweep.study import fail_dead_trials, register_worker, registered_workers, same_process
from tatr.runs.sweep.trial import Objective, SurplusTrial, SweepSpec, counts, make_pruner

POLL_SECONDS = 0.5
STOP_SECONDS = 10.0  # a worker that has not stopped this long after SIGTERM is killed


# --- plugins (suites registered by other modules, e.g. a test's toy suite) -------------------------
def load_plugins() -> None:
    """Import the modules named in `TATR_PLUGINS` (comma-separated) so their registrations run."""
    for name in filter(None, (m.strip() for m in os.environ.get("TATR_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise TatrError(f"TATR_PLUGINS: cannot import '{name}' ({exc})") from None


def run_worker(
    spec: SweepSpec,
    index: int = 0,
    on_trial: Callable[[Any, Any], None] | None = None,
    logger: Any = None,
    suite: Any = None,
    plans: Any = None,
) -> None:
    """Run trials until the study holds `spec.trials` finished ones (any worker's count).

    The worker registers in the study, then seeds its sampler (`worker_seed`: never the seed of
    another worker of the study, see the module docstring). `index` is its number among this
    machine's workers; the seed does not depend on it. `logger` is the process's `WandbLogger`
    (one per process, so a W&B failure warns once). `suite` and `plans` (a `PlanBook` of that
    suite and `spec`'s experiment) are what the process already built: `tatr sweep`'s own process
    passes its own, so nothing is built twice; a spawned worker (None) builds them once.
    """
    import optuna

    from tatr.runs.tracking import TrialCallback, WandbLogger

    load_plugins()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec.storage)
    space = SearchSpace.from_dict(spec.space)
    objective = Objective(spec, suite, plans)
    pruner = make_pruner(space.pruner, len(objective.suite.tasks))
    study = optuna.load_study(study_name=spec.study, storage=storage, pruner=pruner)
    me = register_worker(study)  # before choosing the seed, which reads the registry (module docstring)
    seed = worker_seed(study, spec.seed, me)
    study.sampler = worker_sampler(space, spec.seed, seed)
    register_worker(study, seed=seed)  # recorded, to reproduce this worker's draws
    logger = logger if logger is not None else WandbLogger(spec.results, spec.wandb)
    callbacks: list[Callable[[Any, Any], None]] = [TrialCallback(spec.results, logger)]
    if on_trial is not None:
        callbacks.append(on_trial)
    while True:
        fail_dead_trials(study, me)
        finished, running = counts(study)
        if finished >= spec.trials:
            return
        if finished + running >= spec.trials:
            time.sleep(POLL_SECONDS)  # the last trials are running elsewhere; wait for them or their death
            continue
        study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(SurplusTrial,), gc_after_trial=False)


def worker_seed(study: Any, seed: int, me: dict[str, Any]) -> int:
    """This worker's sampler seed; call it after `register_worker` (see the module docstring).

    `seed` (the experiment's) for the study's only registered worker while no trial has started
    (only enqueued ones wait), so a fresh study swept by one process is reproducible; otherwise a
    hash of `seed` and this process's identity, so no two workers of the study share a seed:
    processes started at once see the same trials, never the same identity.
    """
    import optuna

    from tatr.core.cache import content_hash

    others = [w for w in registered_workers(study) if not same_process(w, me)]
    started = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING]
    if not others and not started:
        return seed
    return int(content_hash("worker-seed", seed, me["host"], me["pid"], me["started"]), 16) % (2**31)


def worker_sampler(space: SearchSpace, study_seed: int, seed: int) -> Any:
    """The space's sampler for a worker whose seed is `seed` (`worker_seed`) in a study seeded `study_seed`.

    TPE and random draw from `seed`. The grid keeps `study_seed`: `GridSampler` visits its grid in
    an order shuffled by its seed, trial n taking the n-th point, and trial numbers are unique in a
    study, so workers sharing the order never repeat a point while workers with their own orders
    would. Only its fallback (a random unvisited point, once trial numbers pass the grid's size, as
    after retries) is reseeded (`reseed_rng`) in any worker but the one that has `study_seed`.
    """
    sampler = make_sampler(space, study_seed if space.sampler == "grid" else seed)
    if space.sampler == "grid" and seed != study_seed:
        sampler.reseed_rng()
    return sampler


# --- worker processes ------------------------------------------------------------------------------
def die_with_parent(parent: int) -> str:
    """Get SIGTERM when `parent` dies; return how ("pdeathsig" on Linux, else "poll")."""
    how = "poll"
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
                how = "pdeathsig"
    if how == "poll":

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="tatr-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return how


def _spawned_worker(spec: SweepSpec, index: int, parent: int) -> None:
    from tatr.core.outputs import install_signal_handlers

    install_signal_handlers()
    die_with_parent(parent)
    try:
        run_worker(spec, index)
    except TatrError as exc:
        print(f"tatr: worker {index}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(spec: SweepSpec, workers: int, study: Any, bar: Callable[..., None]) -> None:
    """K worker processes on this machine; the parent only watches the storage for the progress bar.

    Any exception here (SIGINT's KeyboardInterrupt, SIGTERM's SystemExit, a bug) stops every worker
    before it propagates.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_spawned_worker, args=(spec, i, os.getpid()), name=f"tatr-worker-{i}")
        for i in range(workers)
    ]
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            bar(study, None)
            time.sleep(POLL_SECONDS)
    finally:
        stop_all(procs)
    bar(study, None)
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode]
    if bad:
        i, code = bad[0]
        raise TatrError(f"sweep worker {i} failed (exit code {code}); its error is printed above")


def stop_all(procs: list[Any]) -> None:
    """SIGTERM to every live worker, wait up to `STOP_SECONDS`, then SIGKILL the rest; reap all."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for p in started:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in started:
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            p.join()
