"""Many machines, one study: a private PostgreSQL server on 127.0.0.1 (`tests.postgres_fixture`),
the study created once, then two worker processes on it; every trial must be recorded exactly once.

Skipped only where no PostgreSQL binaries exist; `.ci/run` installs them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna

from tatr.runs.sweep.storage import open_storage
from tatr.store.rows import read_store
from tests.postgres_fixture import free_port, pg_bindir  # noqa: F401  (other tests import them from here)
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd, write_experiment

pytest_plugins = ["tests.postgres_fixture"]  # the `postgres_url` fixture
TS = optuna.trial.TrialState


def test_two_workers_share_one_postgres_study_and_record_each_trial_once(tmp_path: Path, postgres_url: str) -> None:
    exp = write_experiment(tmp_path, delay=0.05)
    root = tmp_path / "results"
    env = cli_env(tmp_path)
    base = ["sweep", exp, "--sweep", REPO / "sweeps" / "tatr.yaml", "--storage", postgres_url, "--root", root]
    created = subprocess.run(tatr_cmd(*base, "--create-only"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=180)  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "Created study 'toy-tatr'" in created.stdout
    worker = tatr_cmd(*base, "--trials", "8", "--no-final", "--no-wandb", "--no-progress")
    procs = [
        subprocess.Popen(worker, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="toy-tatr", storage=open_storage(postgres_url, heartbeat=False))
    finished = study.get_trials(states=(TS.COMPLETE, TS.PRUNED))
    assert len(finished) == 8
    assert not study.get_trials(states=(TS.RUNNING, TS.WAITING))
    rows = read_store(root)
    stored = rows[rows.job_type == "trial"].groupby("run_id").trial.first()
    assert sorted(stored) == sorted(t.number for t in finished)  # every trial once, in Optuna and the store
    assert study.trials[0].params == {"lam": 0.3, "q": 0.99}  # enqueued once, by the creating process
    hosts_pids = {(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in finished}
    assert len(hosts_pids) == 2  # both workers ran trials
