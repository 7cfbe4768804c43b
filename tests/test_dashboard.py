"""`tatr dashboard` serves a sweep's study over HTTP on 127.0.0.1: the page and the API listing it; what
it shows reads true (the metric's name, intermediate values that are running means, what each trial
was); and the dashboard imports the sweep's storage part only."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch

from tatr.runs.config import ExperimentConfig
from tatr.runs.sweep.dashboard import default_storage, is_loopback
from tatr.runs.sweep.run import run_sweep
from tatr.runs.sweep.storage import open_storage
from tatr.runs.sweep.trial import definition
from tatr.store.rows import read_store
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd, write_experiment
from tests.test_postgres import free_port


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def test_dashboard_serves_the_study_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(write_experiment(tmp_path), REPO / "sweeps" / "tatr.yaml", trials=2, results=root,
                  wandb=False, progress=False, final=False, echo=lambda s: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    port = free_port()
    proc = subprocess.Popen(
        tatr_cmd("dashboard", "--root", root, "--port", str(port)),
        cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, page = time.monotonic() + 90, None
        while page is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[1][-2000:])
            try:
                page = get(f"http://127.0.0.1:{port}/dashboard")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert page is not None, "the dashboard did not answer"
        status, html = page
        assert status == 200 and "<html" in html.lower()
        status, body = get(f"http://127.0.0.1:{port}/api/studies")
        studies = json.loads(body)["study_summaries"]
        assert status == 200 and [s["study_name"] for s in studies] == ["toy-tatr"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}/" in out  # loopback by default, and it says where


def test_dashboard_finds_the_sweep_storage_or_says_there_is_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tatr.cli import main

    assert main(["dashboard", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tatr: error: no sweep storage under") and err.count("\n") == 1
    assert main(["dashboard", "--storage", str(tmp_path / "missing.db")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "optuna.journal").touch()  # what `tatr sweep --workers K` leaves
    assert default_storage(tmp_path) == f"journal:{(tmp_path / 'optuna.journal').resolve()}"
    (tmp_path / "optuna.db").touch()  # the single-process default wins when both exist
    assert default_storage(tmp_path) == f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


@pytest.mark.parametrize("port", ["70000", "65536", "0", "-1"])
def test_a_port_out_of_range_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str) -> None:
    from tatr.cli import main

    (tmp_path / "optuna.journal").touch()
    assert main(["dashboard", "--root", str(tmp_path), "--port", port]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"tatr: error: --port must be in 1..65535, got {port}\n"
    assert captured.out == ""


def test_a_taken_port_is_one_line_before_any_banner(tmp_path: Path) -> None:
    """A subprocess, as a user runs it: nothing on stdout (no "Listening on …"), one line on stderr."""
    (tmp_path / "optuna.journal").touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run(
            tatr_cmd("dashboard", "--root", tmp_path, "--port", str(port)),
            cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 2
    assert out.stdout == "" and "Listening" not in out.stderr
    assert out.stderr == f"tatr: error: port {port} on 127.0.0.1 is already in use; choose another --port\n"


def test_a_host_that_does_not_resolve_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tatr.cli import main

    assert main(["dashboard", "--root", str(tmp_path), "--host", "no-such-host.invalid", "--port", "8080"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tatr: error: --host 'no-such-host.invalid': cannot resolve") and err.count("\n") == 1


def test_the_study_names_its_metric_reports_running_means_and_says_what_each_trial_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_sweep(write_experiment(tmp_path), REPO / "sweeps" / "tatr.yaml",
                           ["merge.trust_region=exemplar", "exemplars.n=8", "seed=3"], trials=3, results=root,
                           pruner="none", wandb=False, progress=False, final=False, echo=lambda s: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    study = optuna.load_study(study_name=result.study, storage=open_storage(result.storage, heartbeat=False))
    assert study.metric_names == ["mean validation accuracy (%)"]  # not "Objective 0"
    rows = read_store(root)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    for t in complete:
        mine = rows[(rows.trial == t.number) & (rows.job_type == "trial")]  # in the order evaluated
        acc = mine.accuracy.tolist()
        running = [sum(acc[: i + 1]) / (i + 1) for i in range(len(acc))]
        assert list(t.intermediate_values) == list(range(len(acc)))
        assert list(t.intermediate_values.values()) == pytest.approx(running)
        assert t.intermediate_values[len(acc) - 1] == pytest.approx(t.value)  # the last is the objective
        shown = {k: t.user_attrs[k] for k in ("method", "trust_region", "components", "exemplars", "seed")}
        assert shown == {"method": "ta", "trust_region": "exemplar", "components": None, "exemplars": 8, "seed": 3}
        for column in ("method", "trust_region", "exemplars", "seed"):  # as the store's rows say it
            assert set(mine[column]) == {shown[column]}, column


def test_a_trial_without_exemplars_says_so_and_components_are_listed() -> None:
    plain = ExperimentConfig.model_validate({"merge": {"method": "ties-sum", "trust_region": "off"}})
    assert definition(plain) == {
        "method": "ties-sum", "trust_region": "off", "components": None, "exemplars": None, "seed": 0
    }  # fmt: skip
    parts = ExperimentConfig.model_validate(
        {"merge": {"components": ["orthogonal", "positive"]}, "exemplars": {"n": 4}, "seed": 2}
    )
    assert definition(parts) == {
        "method": "ta", "trust_region": "zero-shot", "components": ["orthogonal", "positive"], "exemplars": 4,
        "seed": 2,
    }  # fmt: skip


def test_the_dashboard_imports_only_the_sweep_storage() -> None:
    code = "import sys, tatr.runs.sweep.dashboard; print(' '.join(m for m in sys.modules if m.startswith('tatr')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert {"tatr.runs.sweep.dashboard", "tatr.runs.sweep.storage"} <= loaded
    sweep_parts = {f"tatr.runs.sweep.{m}" for m in ("space", "study", "trial", "workers", "run")}
    assert not loaded & sweep_parts, loaded & sweep_parts
    assert not any(m.startswith("tatr.suites") for m in loaded)
