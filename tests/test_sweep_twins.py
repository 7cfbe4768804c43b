"""Twin sweeps: two `tatr sweep --no-final` processes started at the same instant on one study (the
many-machines recipe of docs/sweeps.md, or two sweeps on one SQLite file) must not repeat each other's
trials, on each storage kind: one SQLite file, one journal file, PostgreSQL.

Both processes import everything first, then wait on a file barrier, so they load the study
together and see the same trials; a seed chosen from what they see would be the same in both and
draw the same (λ, q). Every task of the toy suite sleeps a little, so a trial outlasts the jitter
between the twins. The in-process tests check the seed rule itself: the experiment's seed for the
only worker of a fresh study, a seed of its own for any other, recorded in the worker registry;
and that grid workers share the grid's order, so that unique trial numbers give unique points.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

from tatr.runs.sweep.run import run_sweep
from tatr.runs.sweep.space import SearchSpace
from tatr.runs.sweep.storage import open_storage
from tatr.runs.sweep.study import REGISTRY, register_worker, registered_workers
from tatr.runs.sweep.workers import worker_sampler, worker_seed
from tests.sweep_fixtures import REPO, cli_env, write_experiment

pytest_plugins = ["tests.postgres_fixture"]  # the `postgres_url` fixture
TS = optuna.trial.TrialState
TATR = REPO / "sweeps" / "tatr.yaml"  # continuous λ and q: equal seeds would give equal points
TRIALS = 6

# A twin: import what `tatr sweep` needs (seconds, so not after the barrier), say "ready" in the
# barrier folder, wait for the other twin's "ready", then run the command line after the barrier's
# arguments.
TWIN = """
import sys, time
from pathlib import Path
import alembic, optuna, pandas, sqlalchemy, torch  # noqa: F401
import tatr.cli.sweep, tatr.store.rows, tatr.runs.sweep.run, tatr.runs.tracking  # noqa: F401
import tests.sweep_fixtures  # noqa: F401
from tatr.cli import main
barrier, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(barrier / name).touch()
deadline = time.monotonic() + 120
while len(list(barrier.iterdir())) < count:
    if time.monotonic() > deadline:
        sys.exit("twin: the other twin never came to the barrier")
    time.sleep(0.002)
sys.exit(main(sys.argv[4:]))
"""


def run_twins(
    tmp: Path, url: str, sampler: str, study: str, monkeypatch: pytest.MonkeyPatch, precreate: bool = True
) -> optuna.Study:
    """Create the study once (here, to save a process start), then start two `--no-final` sweeps
    on it at the same instant; without `precreate`, the twins race to create it too (the issue's
    `for i in 1 2; do tatr sweep … & done`)."""
    exp = write_experiment(tmp, delay=0.25)  # 3 tasks: a trial lasts ≥ 0.75 s
    env = cli_env(tmp)
    monkeypatch.setenv("TATR_CACHE", env["TATR_CACHE"])  # the twins find the plan built here
    options = ["--storage", url, "--root", tmp / "results", "--study", study, "--sampler", sampler, "--pruner", "none"]
    if precreate:
        run_sweep(exp, TATR, storage=url, results=tmp / "results", study=study, sampler=sampler, pruner="none",
                  create_only=True, wandb=False, progress=False, echo=lambda _: None)  # fmt: skip
    barrier = tmp / "barrier"
    barrier.mkdir()
    argv = ["sweep", exp, "--sweep", TATR, *options, "--trials", TRIALS, "--no-final", "--no-wandb", "--no-progress"]
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    twin = [sys.executable, "-c", TWIN, str(barrier)]
    procs = [subprocess.Popen([*twin, f"twin{i}", "2", *map(str, argv)], cwd=REPO, env=env, **pipes) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return optuna.load_study(study_name=study, storage=open_storage(url, heartbeat=False))


def check_distinct(study: optuna.Study) -> None:
    finished = study.get_trials(states=(TS.COMPLETE, TS.PRUNED))
    assert len(finished) == TRIALS
    points = [(t.params["lam"], t.params["q"]) for t in finished]
    assert len(set(points)) == len(points), f"twins repeated points: {sorted(points)}"
    pids = {t.user_attrs["worker"]["pid"] for t in finished}
    assert len(pids) == 2  # both twins ran trials: they did run side by side
    seeds = [w["seed"] for w in registered_workers(study)]
    assert len(seeds) == 2 and len(set(seeds)) == 2  # each twin recorded a seed of its own


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "sampler", "precreate"),
    [
        ("sqlite", "tpe", True),
        ("journal", "random", True),
        ("postgres", "tpe", True),
        ("sqlite", "tpe", False),
        ("journal", "tpe", False),
    ],
)
def test_twin_sweeps_started_at_once_draw_distinct_points(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    sampler: str,
    precreate: bool,
) -> None:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
    elif kind == "journal":
        url = f"journal:{tmp_path / 'optuna.journal'}"
    else:
        url = request.getfixturevalue("postgres_url")  # one server per module: a study name per test
    study = run_twins(tmp_path, url, sampler, f"twins-{kind}-{sampler}-{precreate}", monkeypatch, precreate)
    check_distinct(study)
    assert sum(bool(t.user_attrs.get("paper_default")) for t in study.trials) == 1  # enqueued once


# --- the seed rule, in-process ------------------------------------------------------------------------
def fresh_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"lam": 0.3, "q": 0.99})  # as `create_study` does: the paper default waits
    return study


def other_worker(study: optuna.Study, pid: int) -> dict[str, Any]:
    ident = {"host": "elsewhere", "pid": pid, "started": 1.0}
    study.set_user_attr(f"{REGISTRY}elsewhere:{pid}:1.0", ident)
    return ident


def test_the_only_worker_of_a_fresh_study_uses_the_experiments_seed_and_records_it() -> None:
    study = fresh_study()
    me = register_worker(study)
    assert worker_seed(study, 7, me) == 7  # one process on a fresh study: reproducible as before
    register_worker(study, seed=7)
    [entry] = registered_workers(study)
    assert entry == {**me, "seed": 7}
    assert worker_seed(study, 7, me) == 7  # its own entry, now with the seed, is still itself


def test_a_second_worker_or_a_resume_gets_a_seed_of_its_own() -> None:
    study = fresh_study()
    other_worker(study, 1)
    me = register_worker(study)
    mine = worker_seed(study, 7, me)
    assert mine != 7  # another worker registered first: it may have taken 7
    assert worker_seed(study, 7, {**me, "pid": me["pid"] + 1}) != mine  # another process, another seed
    alone = fresh_study()
    me = register_worker(alone)
    alone.optimize(lambda t: t.suggest_float("lam", 0, 1), n_trials=1)  # a trial has started (resume)
    assert worker_seed(alone, 7, me) == mine  # the seed depends on who asks, not on what it sees


def test_twin_workers_with_their_seeds_draw_different_points() -> None:
    study = fresh_study()
    space = SearchSpace.from_dict({"name": "s", "params": [{"name": "lam", "low": 0.0, "high": 1.0}]})
    a = register_worker(study)
    b = other_worker(study, 2)
    seeds = {worker_seed(study, 0, a), worker_seed(study, 0, b)}
    assert len(seeds) == 2
    for name in ("tpe", "random"):
        points = set()
        for seed in seeds:
            sampler = worker_sampler(space.with_options(name), 0, seed)
            twin = optuna.create_study(sampler=sampler)
            twin.optimize(lambda t: t.suggest_float("lam", 0, 1), n_trials=3)
            points |= {t.params["lam"] for t in twin.trials}
        assert len(points) == 6, name


def test_grid_workers_share_the_grids_order_so_trials_never_repeat_a_point() -> None:
    space = SearchSpace.from_dict(
        {"name": "g", "sampler": "grid", "params": [{"name": "lam", "choices": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}]}
    )
    study = optuna.create_study()
    samplers = [worker_sampler(space, 0, 0), worker_sampler(space, 0, 12345)]  # the first worker, another one
    asked: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        asked.append(trial.suggest_categorical("lam", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
        return 0.0

    for i in range(6):  # interleaved trials, as two processes on one storage would run them
        study.sampler = samplers[i % 2]
        study.optimize(objective, n_trials=1)
    assert sorted(asked) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


OPEN = """
import sys, time
from pathlib import Path
from tatr.core.errors import TatrError
from tatr.runs.sweep.storage import open_storage
barrier, name, count, url = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
(barrier / name).touch()
while len(list(barrier.iterdir())) < count:
    time.sleep(0.001)
try:
    open_storage(url)
except TatrError as exc:
    sys.exit(f"tatr: error: {exc}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_processes_creating_one_sqlite_schema_at_once_all_open_it(tmp_path: Path, round_: int) -> None:
    """The schema race behind twin sweeps on a new SQLite file ("table studies already exists")."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN, str(barrier), f"p{i}", "4", url], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
