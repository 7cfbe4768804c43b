"""The README's main command on the real testbed (the session's tiny build): `tatr sweep
experiments/testbed.yaml --sweep sweeps/tatr.yaml` with the tiny preset as overrides."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tatr.store.rows import read_store
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd

pytest.importorskip("tatr.suites.testbed", reason="the testbed suite is not in this checkout")


def test_main_command_on_the_testbed(tmp_path: Path, tiny_testbed, tiny_testbed_cache: Path) -> None:
    experiment = REPO / "experiments" / "testbed.yaml"
    if not experiment.is_file():  # until the testbed's experiment file lands, the same content
        experiment = tmp_path / "testbed.yaml"
        experiment.write_text(json.dumps({"name": "testbed", "benchmark": "testbed"}))
    root = tmp_path / "results"
    env = cli_env(tmp_path, TATR_CACHE=str(tiny_testbed_cache))
    cmd = tatr_cmd("sweep", experiment, "--sweep", REPO / "sweeps" / "tatr.yaml", "--trials", "3", "--root", root,
                   "suite.preset=tiny", "suite.progress=false")  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_store(root)
    assert set(rows.benchmark) == {"testbed"}
    trials = rows[rows.job_type == "trial"]
    assert trials.run_id.nunique() == 3 and set(trials.split) == {"validation"}
    final = rows[rows.job_type == "final"]
    assert set(final.split) == {"test"} and set(final.task) == set(tiny_testbed.tasks)
    assert final.normalized_accuracy.notna().all()
    for task in tiny_testbed.tasks:
        assert task in out.stdout  # the per-task summary table
    assert len(list((root / "wandb").glob("offline-run-*"))) == 4  # 3 trials + the final run
