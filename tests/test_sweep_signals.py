"""`tatr sweep --workers K` and signals: SIGTERM, SIGINT or SIGKILL to the parent leaves no worker
running and no temporary behind; a trial that died unsigned on this host is recovered at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import torch

from tatr.runs.sweep.owners import worker_identity
from tatr.runs.sweep.run import run_sweep
from tatr.runs.sweep.storage import open_storage
from tatr.runs.sweep.study import fail_dead_trials, register_worker
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd, write_experiment

TATR = REPO / "sweeps" / "tatr.yaml"
TS = optuna.trial.TrialState


def identity_of(proc: subprocess.Popen) -> dict:
    import socket

    return {"host": socket.gethostname(), "pid": proc.pid, "started": psutil.Process(proc.pid).create_time()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_a_signal_to_the_parent_ends_every_worker_and_leaves_no_temporary(tmp_path: Path, sig: int) -> None:
    root = tmp_path / "results"
    cmd = tatr_cmd("sweep", write_experiment(tmp_path, delay=0.3), "--sweep", TATR, "--trials", "40",
                   "--workers", "2", "--root", root, "--pruner", "none", "--no-wandb", "--no-progress")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    url = f"journal:{root / 'optuna.journal'}"
    try:
        deadline, workers = time.monotonic() + 150, set()
        while len(workers) < 2:  # both workers evaluating a trial
            assert time.monotonic() < deadline, "the workers did not start"
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="toy-tatr", storage=open_storage(url, heartbeat=False))
            except (KeyError, ValueError):
                continue
            workers = {t.user_attrs["worker"]["pid"] for t in study.get_trials(states=(TS.RUNNING,))
                       if "worker" in t.user_attrs and t.intermediate_values}  # fmt: skip
        family = psutil.Process(proc.pid).children(recursive=True)
        assert workers <= {p.pid for p in family}
        os.kill(proc.pid, sig)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig != signal.SIGKILL:
        assert proc.returncode == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, [p.cmdline() for p in alive]
    leftovers = [p for folder in (root, tmp_path / "cache") for p in folder.rglob(".tatr-tmp-*")]
    assert not leftovers, leftovers
    if sig == signal.SIGKILL:
        return
    study = optuna.load_study(study_name="toy-tatr", storage=open_storage(url, heartbeat=False))
    assert len(study.get_trials(states=(TS.COMPLETE,))) < 40  # stopped, not finished


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TATR_HEARTBEAT", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def sweep(tmp: Path, trials: int):
    return run_sweep(write_experiment(tmp), TATR, (), trials=trials, results=tmp / "results", wandb=False,
                     progress=False, final=False, echo=lambda s: None)  # fmt: skip


def test_a_trial_that_died_unsigned_on_this_host_is_recovered_at_once(env: Path) -> None:
    """Killed between Optuna creating the trial and the objective signing it (e.g. while the sampler
    chose its parameters): with no other live worker, the resume does not wait (it waited 60 s)."""
    result = sweep(env, 2)
    storage = open_storage(result.storage, heartbeat=False)
    study = optuna.load_study(study_name=result.study, storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_identity = identity_of(dead)
    dead.wait()
    study.set_user_attr(f"tatr_worker:{dead_identity['host']}:{dead.pid}:x", dead_identity)  # its registration
    orphan = storage.create_new_trial(study._study_id)  # RUNNING, unsigned, just started
    assert storage.get_trial(orphan).state == TS.RUNNING
    start = time.monotonic()
    result = sweep(env, 3)
    assert time.monotonic() - start < 15
    study = optuna.load_study(study_name=result.study, storage=open_storage(result.storage, heartbeat=False))
    assert study.trials[2].state == TS.FAIL and len(study.get_trials(states=(TS.COMPLETE,))) == 3


def test_an_unsigned_trial_waits_while_another_worker_may_be_asking(env: Path) -> None:
    result = sweep(env, 1)
    storage = open_storage(result.storage, heartbeat=False)
    study = optuna.load_study(study_name=result.study, storage=storage)
    me = register_worker(study)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = identity_of(other)
        study.set_user_attr(f"tatr_worker:{ident['host']}:{other.pid}:y", ident)
        orphan = storage.create_new_trial(study._study_id)
        assert fail_dead_trials(study, me) == []  # the other worker lives: it may own the trial
    finally:
        other.kill()
        other.wait()
    number = storage.get_trial(orphan).number
    assert fail_dead_trials(study, me) == [number]  # now nobody can own it
    assert me == worker_identity()


def test_a_trial_whose_heartbeat_stops_is_retried_by_optunas_callback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another machine's worker died: no pid to check, only its stale heartbeat (RDB storages).
    Optuna fails the trial and its retry callback re-creates it with the same parameters; the copy
    carries `retry_of` and not the dead worker's signature; a trial is retried at most twice."""
    monkeypatch.setenv("TATR_HEARTBEAT", "1")  # grace period: 3 s
    storage = open_storage(f"sqlite:///{tmp_path / 'h.db'}")
    study = optuna.create_study(storage=storage, study_name="h", direction="maximize")
    elsewhere = {"host": "another-machine", "pid": 1, "started": 0.0}
    trial = study.ask({"lam": optuna.distributions.FloatDistribution(0.0, 1.0)})
    trial.set_user_attr("worker", elsewhere)
    trial.set_user_attr("method", "ta")
    for attempt in range(3):
        storage.record_heartbeat(trial._trial_id)  # beats once, then its machine dies
        time.sleep(4.5)  # past the grace period, with SQLite's whole-second timestamps
        assert fail_dead_trials(study, None) == []  # not ours to judge by pid: another host
        failed = study.trials[trial.number]
        assert failed.state == TS.FAIL
        waiting = study.get_trials(states=(TS.WAITING,))
        if attempt == 2:
            assert waiting == []  # the original and two retries failed: no third retry
            break
        assert len(waiting) == 1
        copy = waiting[0]
        assert copy.params == failed.params and copy.user_attrs["retry_of"] == failed.number
        assert "worker" not in copy.user_attrs and copy.user_attrs["method"] == "ta"
        trial = study.ask()  # a live worker takes the retry (the same parameters) and dies in turn
        assert trial.number == copy.number and trial.params == failed.params
        trial.set_user_attr("worker", elsewhere)
