"""`tatr sweep` as a user runs it (subprocesses): the summary and progress bar, and resuming
after `kill -9` of a worker in the middle of a trial: a single process on SQLite, and one of two
workers on the journal file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import optuna

from tatr.runs.sweep.storage import open_storage
from tatr.store.rows import read_store
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd, write_experiment

TATR = REPO / "sweeps" / "tatr.yaml"
TS = optuna.trial.TrialState


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))


def wait_for(check: Callable[[], bool], proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except (KeyError, ValueError, optuna.exceptions.StorageInternalError):
            pass  # the study or the storage is not there yet
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}): {err[-2000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def check_exactly_once(root: Path, study: optuna.Study, trials: int) -> None:
    """Every finished trial counted once in Optuna and stored once; nothing for failed trials."""
    finished = study.get_trials(states=(TS.COMPLETE, TS.PRUNED))
    assert len(finished) == trials
    rows = read_store(root)
    stored = rows[rows.job_type == "trial"].groupby("run_id").trial.first()
    assert sorted(stored) == sorted(t.number for t in finished)  # one run per finished trial, no more
    failed = {t.number for t in study.get_trials(states=(TS.FAIL,))}
    assert not failed & set(stored)


def test_main_command_prints_progress_and_summary(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path)
    out = subprocess.run(
        tatr_cmd("sweep", exp, "--sweep", TATR, "--trials", "3", "--root", tmp_path / "results"),
        cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "sweep toy-tatr" in out.stderr and "3/3" in out.stderr and "best" in out.stderr  # the bar
    for text in ("Best trial #", "lam=", "q=", "val acc %", "test acc %", "average", "Results store:",
                 "Optuna storage: sqlite:///", "tatr dashboard --storage", "wandb sync"):  # fmt: skip
        assert text in out.stdout, text
    assert (tmp_path / "results" / "optuna.db").is_file()


def test_kill_9_mid_trial_then_the_same_command_completes_the_study(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, delay=0.25)  # 3 tasks: ~0.75 s per trial
    root = tmp_path / "results"
    url = f"sqlite:///{root / 'optuna.db'}"
    cmd = tatr_cmd("sweep", exp, "--sweep", TATR, "--trials", "5", "--root", root, "--pruner", "none", "--no-wandb")
    env = cli_env(tmp_path)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mid_trial() -> bool:
        study = load(url, "toy-tatr")
        done = study.get_trials(states=(TS.COMPLETE,))
        running = study.get_trials(states=(TS.RUNNING,))
        return len(done) >= 2 and any(t.intermediate_values for t in running)  # evaluating, task 1 done

    try:
        wait_for(mid_trial, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    before = load(url, "toy-tatr")
    done_before = {t.number: (t.params, t.value) for t in before.get_trials(states=(TS.COMPLETE,))}
    killed = before.get_trials(states=(TS.RUNNING,))
    assert len(killed) == 1 and len(done_before) < 5

    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    after = load(url, "toy-tatr")
    check_exactly_once(root, after, 5)
    for number, (params, value) in done_before.items():  # no completed trial lost or changed
        assert after.trials[number].state == TS.COMPLETE
        assert (after.trials[number].params, after.trials[number].value) == (params, value)
    dead = after.trials[killed[0].number]
    assert dead.state == TS.FAIL
    retried = [t for t in after.trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params and retried[0].state == TS.COMPLETE
    assert (read_store(root).job_type == "final").sum() == 3  # one final run, 3 tasks


def test_kill_9_of_one_of_two_workers_loses_nothing(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, delay=0.2)
    root = tmp_path / "results"
    url = f"journal:{root / 'optuna.journal'}"
    cmd = tatr_cmd("sweep", exp, "--sweep", TATR, "--trials", "6", "--workers", "2", "--root", root,
                   "--pruner", "none", "--no-wandb", "--no-progress")  # fmt: skip
    env = cli_env(tmp_path)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim: dict[str, int] = {}

    def mid_trial() -> bool:
        study = load(url, "toy-tatr")
        if len(study.get_trials(states=(TS.COMPLETE,))) < 2:
            return False
        for t in study.get_trials(states=(TS.RUNNING,)):
            if t.intermediate_values and "worker" in t.user_attrs:
                victim.update(pid=t.user_attrs["worker"]["pid"], trial=t.number)
                return True
        return False

    try:
        wait_for(mid_trial, proc)
        os.kill(victim["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "exit code -9" in err  # the parent says what happened
    assert (root / "optuna.journal").is_file() and not (root / "optuna.db").exists()  # K workers: journal
    study = load(url, "toy-tatr")
    check_exactly_once(root, study, 6)  # the surviving worker finished the study, retry included
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}
    assert len(pids) == 2  # both worker processes ran trials
    assert study.trials[victim["trial"]].state == TS.FAIL
    assert any(t.user_attrs.get("retry_of") == victim["trial"] and t.state == TS.COMPLETE for t in study.trials)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr  # the same command again: nothing left but the final run
    check_exactly_once(root, load(url, "toy-tatr"), 6)
    assert (read_store(root).job_type == "final").any()
