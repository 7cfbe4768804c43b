"""`tatr dashboard` serves a sweep's study over HTTP on 127.0.0.1: the page and the API listing it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tatr.sweep import run_sweep
from tests.sweep_fixtures import REPO, cli_env, tatr_cmd, write_experiment
from tests.test_postgres import free_port


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


@pytest.mark.parametrize("workers", [1, 2], ids=["sqlite", "journal"])
def test_dashboard_serves_the_study_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers == 1:
            run_sweep(write_experiment(tmp_path), REPO / "sweeps" / "tatr.yaml", trials=2, results=root,
                      wandb=False, progress=False, final=False, echo=lambda s: None)  # fmt: skip
        else:  # the journal file that --workers K uses, created here without spawning workers
            run_sweep(write_experiment(tmp_path), REPO / "sweeps" / "tatr.yaml", results=root, workers=2,
                      create_only=True, progress=False, echo=lambda s: None)  # fmt: skip
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


def test_dashboard_without_a_storage_is_a_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run(tatr_cmd("dashboard", "--root", tmp_path / "nothing"), cwd=REPO, env=cli_env(tmp_path),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("tatr: error: no sweep storage under") and out.stderr.count("\n") == 1
