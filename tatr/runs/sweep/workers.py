"""Sweep workers: run trials until the study is full, and never outlive the `tatr sweep` that
started them.

Signals. `tatr sweep --workers K` spawns K processes. SIGINT or SIGTERM to the parent terminates
them all and waits (then kills a worker that ignores SIGTERM for `STOP_SECONDS`). Each worker
turns SIGTERM into `SystemExit`, so its `finally` blocks remove temporaries, and asks the kernel
to send it SIGTERM when the parent dies (Linux `PR_SET_PDEATHSIG`, elsewhere a thread polling the
parent pid), so even a SIGKILLed parent leaves no worker running.
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
from tatr.runs.sweep.study import fail_dead_trials, register_worker
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
) -> None:
    """Run trials until the study holds `spec.trials` finished ones (any worker's count).

    `logger` is the process's `WandbLogger` (one per process, so a W&B failure warns once).
    """
    import optuna

    from tatr.runs.tracking import TrialCallback, WandbLogger

    load_plugins()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec.storage)
    space = SearchSpace.from_dict(spec.space)
    objective = Objective(spec)
    pruner = make_pruner(space.pruner, len(objective.suite.tasks))
    study = optuna.load_study(study_name=spec.study, storage=storage, pruner=pruner)
    study.sampler = make_sampler(space, _worker_seed(spec.seed, index, len(study.trials)))
    logger = logger if logger is not None else WandbLogger(spec.results, spec.wandb)
    callbacks: list[Callable[[Any, Any], None]] = [TrialCallback(spec.results, logger)]
    if on_trial is not None:
        callbacks.append(on_trial)
    me = register_worker(study)
    while True:
        fail_dead_trials(study, me)
        finished, running = counts(study)
        if finished >= spec.trials:
            return
        if finished + running >= spec.trials:
            time.sleep(POLL_SECONDS)  # the last trials are running elsewhere; wait for them or their death
            continue
        study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(SurplusTrial,), gc_after_trial=False)


def _worker_seed(seed: int, index: int, existing: int) -> int:
    """A fresh study with one worker samples exactly as `seed` says; resumes and extra workers differ."""
    from tatr.core.cache import content_hash

    if index == 0 and existing <= 1:
        return seed
    return int(content_hash("worker-seed", seed, index, existing), 16) % (2**31)


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
