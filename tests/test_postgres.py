"""Many machines, one study: a private PostgreSQL server on 127.0.0.1, the study created once, then
two worker processes on it; every trial must be recorded exactly once.

The server is started with initdb/pg_ctl in a temporary folder (as the `postgres` user when the
tests run as root: PostgreSQL refuses to run as root). Skipped only where no PostgreSQL binaries
exist; `.ci/run` installs them.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from tatr.runs.store import read_store
from tatr.runs.sweep.storage import open_storage
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd, write_experiment

TS = optuna.trial.TrialState


def pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) + sorted(
        glob.glob("/usr/local/pgsql/bin/initdb")
    )
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bindir = pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine: apt-get install -y postgresql")
    folder = Path(tempfile.mkdtemp(prefix="tatr-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses root: run the server as the `postgres` user
        shutil.chown(folder, user="postgres", group="postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(*args: str | Path) -> None:
        out = subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log = (folder / "log").read_text() if (folder / "log").exists() else ""
            raise RuntimeError(f"{args[0]} failed: {out.stderr[-1500:]} {log[-1500:]}")

    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "tatr", "--no-sync", "-E", "UTF8")
    options = f"-h 127.0.0.1 -p {port} -k {folder} -F -c max_connections=60"
    run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", folder / "log", "-w", "-t", "60", "start")
    try:
        yield f"postgresql://tatr@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


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
