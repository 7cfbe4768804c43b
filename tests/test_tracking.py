"""Tracking: store rows per trial and final run, one W&B run per trial (group, job type, tags,
config, tables), offline runs under results/, a W&B failure that warns once and loses nothing,
and the reconciliation of trials whose worker died after Optuna recorded them."""

from __future__ import annotations

import contextlib
import math
import socket
import sys
import time
import types
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from tatr.runs.sweep.run import run_sweep
from tatr.runs.sweep.storage import open_storage
from tatr.runs.tracking import WandbLogger, reconcile, wandb_mode
from tatr.store.record import RunRecord, store_rows
from tatr.store.rows import read_store
from tatr.store.run_ids import sweep_run_id
from tests.sweep_fixtures import REPO, write_experiment

TATR = REPO / "sweeps" / "tatr.yaml"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TATR_HEARTBEAT", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def sweep(tmp: Path, trials: int = 3, **kw: Any):
    kw.setdefault("progress", False)
    return run_sweep(write_experiment(tmp), TATR, (), trials=trials, results=tmp / "results", echo=lambda s: None, **kw)


class FakeWandb(types.ModuleType):
    """Records every init/log/summary/finish call, like W&B would receive them."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__("wandb")
        self.runs: list[dict[str, Any]] = []
        self.fail = fail
        self.Settings = lambda **kw: kw

    class Table:
        def __init__(self, columns: list[str], data: list[list[Any]]) -> None:
            self.columns, self.data = columns, data

    def init(self, **kwargs: Any) -> Any:
        if self.fail:
            raise ConnectionError("no network")
        run = {"init": kwargs, "logged": {}, "summary": {}, "finished": False}
        self.runs.append(run)
        return types.SimpleNamespace(
            log=lambda d: run["logged"].update(d),
            summary=run["summary"],
            finish=lambda exit_code=0: run.update(finished=True),
        )


def test_one_wandb_run_per_trial_and_final_with_group_job_type_tags_config_tables(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    result = sweep(env, trials=4, pruner="none")
    rows = read_store(env / "results")
    assert len(fake.runs) == rows.run_id.nunique() == 5  # 4 trials + the final run
    by_id = {r["init"]["id"]: r for r in fake.runs}
    assert set(by_id) == set(rows.run_id)
    jobs = sorted(r["init"]["job_type"] for r in fake.runs)
    assert jobs == ["final", "trial", "trial", "trial", "trial"]
    for run in fake.runs:
        init = run["init"]
        assert init["group"] == result.study
        assert init["mode"] == "offline" and init["dir"] == str(env / "results")
        assert set(init["tags"]) == {"benchmark:sweep-toy", "method:ta", "mode:zero-shot"}
        cfg = init["config"]
        assert cfg["merge"]["lam"] == pytest.approx(cfg["params"]["lam"])  # the resolved config
        assert cfg["benchmark"] == "sweep-toy" and cfg["study"] == result.study
        mine = rows[rows.run_id == init["id"]]
        table = run["logged"]["accuracy_table"]
        assert table.columns[:3] == ["task", "split", "accuracy"]
        assert {r[0]: r[2] for r in table.data} == dict(zip(mine.task, mine.accuracy, strict=True))
        mask = run["logged"]["mask_table"]
        dropped = sum(r[1] for r in mask.data)
        numel = sum(r[2] for r in mask.data)
        q = cfg["merge"]["q"]
        assert dropped == run["summary"]["mask/dropped"] and numel > 0
        # exactly ⌈(1−q)N⌉ coordinates, q read as its decimal text (0.99 of 100 drops 1, not 2)
        assert dropped == math.ceil((1 - Fraction(repr(float(q)))) * numel)
        assert run["summary"]["time/merge_seconds"] > 0 and run["summary"]["time/eval_seconds"] > 0
        assert run["finished"]


def test_wandb_failure_warns_once_and_the_store_gets_every_trial(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sweep(env, trials=4)
    ours = [w for w in caught if "W&B logging failed" in str(w.message)]
    assert len(ours) == 1 and "ConnectionError: no network" in str(ours[0].message)
    rows = read_store(env / "results")
    assert (rows.job_type == "trial").groupby(rows.run_id).any().sum() == 4
    assert (rows.job_type == "final").any()
    assert "W&B failed" in result.table()


def test_wandb_unreachable_server_with_a_bad_key(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real client, online, against a closed local port: one warning, no trial lost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep(env, trials=2, final=False)
    assert len([w for w in caught if "W&B logging failed" in str(w.message)]) == 1
    assert read_store(env / "results").run_id.nunique() == 2


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_an_unreachable_wandb_server_costs_seconds_once_and_loses_nothing(
    env: Path, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    """The real client, online, W&B's own timeouts (90 s by default): a closed port, and a port that
    accepts connections but never answers. One warning, W&B off for the sweep, every row stored."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if server == "silent":
            listener.listen(16)  # connections complete in the backlog; nothing is ever read or sent
        else:
            listener.close()
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = sweep(env, trials=3)
        seconds = time.monotonic() - start
    ours = [str(w.message) for w in caught if "W&B logging failed" in str(w.message)]
    assert len(ours) == 1 and f"127.0.0.1:{port}" in ours[0] and "unreachable" in ours[0], ours
    assert seconds < 20, seconds  # the probe's few seconds, not wandb.init's 90 per trial
    rows = read_store(env / "results")
    assert rows.run_id.nunique() == 4 and (rows.job_type == "final").any()  # 3 trials + final
    assert "W&B failed" in result.table()


def test_real_offline_runs_land_under_results(env: Path) -> None:
    sweep(env, trials=2, final=False)
    runs = sorted((env / "results" / "wandb").glob("offline-run-*"))
    ids = set(read_store(env / "results").run_id)
    assert len(runs) == 2
    assert {p.name.split("-", 3)[-1] for p in runs} == ids  # offline-run-<date>_<time>-<id>
    assert all(any(p.glob("run-*.wandb")) for p in runs)
    assert not (env / "wandb-env").exists() or not any((env / "wandb-env").rglob("offline-run-*"))


def test_no_wandb_and_disabled_mode_log_nothing(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sweep(env, trials=2, wandb=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not WandbLogger(env, True).enabled
    assert fake.runs == []
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"


def test_reconcile_writes_rows_of_trials_recorded_but_not_stored(env: Path) -> None:
    """A worker killed between Optuna's tell and the store write: the next start writes the rows."""
    result = sweep(env, trials=3, final=False, wandb=False)
    store = env / "results" / "store"
    files = sorted(store.glob("*.jsonl"))
    lost = files[1]
    lost.unlink()
    study = optuna.load_study(study_name=result.study, storage=open_storage(result.storage, heartbeat=False))
    assert reconcile(study, env / "results") == 1
    assert lost.is_file()
    assert reconcile(study, env / "results") == 0  # never twice
    again = sweep(env, trials=3, final=False, wandb=False)
    assert again.complete + again.pruned == 3 and len(list(store.glob("*.jsonl"))) == 3


def test_store_rows_have_the_contract_columns() -> None:
    config = {
        "name": "exp",
        "benchmark": "testbed",
        "seed": 3,
        "exemplars": {"n": 16, "seed": 0},
        "merge": {"method": "ta", "trust_region": "off", "q": 0.99, "lam": None, "ties_k": 20.0, "components": None},
    }
    rec = RunRecord("r1", "s", 7, "trial", config, "abc", "validation", {"a": 50.0, "b": 70.0}, {"a": 60.0, "b": 80.0})
    rows = store_rows(rec)
    assert [r["task"] for r in rows] == ["a", "b"]
    row = rows[0]
    assert row["q"] is None  # no trust region: q means nothing
    assert row["lam"] == 0.3  # the method's default, resolved
    assert row["exemplars"] is None and row["ties_k"] is None
    assert (row["study"], row["trial"], row["seed"], row["experiment"]) == ("s", 7, 3, "exp")
    assert row["normalized_accuracy"] == 60.0
    assert sweep_run_id("a b/c", 3, "t") != sweep_run_id("a b/c", 3, "u")
    assert "/" not in sweep_run_id("a b/c", 3, "t")
