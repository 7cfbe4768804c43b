"""`tatr evaluate` on the tiny testbed: the table, JSON output, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tatr.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "testbed.yaml")
TINY = ["suite.preset=tiny", "suite.progress=false"]


def run_cli(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TATR_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "tatr", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_evaluate_prints_a_per_task_table(tiny_testbed, tiny_testbed_cache: Path) -> None:
    proc = run_cli(["evaluate", CONFIG, *TINY, "merge.lam=0.4", "merge.q=0.95"], tiny_testbed_cache)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ta · trust region zero-shot · q=0.95 · λ=0.4 · split=validation" in out
    for task in tiny_testbed.tasks:
        assert task in out
    assert "average" in out


def test_evaluate_json_matches_the_suite(tiny_testbed, tiny_testbed_cache: Path, capsys) -> None:
    from tatr.core.one_shot import merge

    os.environ["TATR_CACHE"] = str(tiny_testbed_cache)
    try:
        code = main(["evaluate", CONFIG, *TINY, "merge.method=ties-sum", "merge.lam=0.5", "split=test", "--json"])
    finally:
        del os.environ["TATR_CACHE"]
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    ckpts = tiny_testbed.checkpoints()
    merged = merge(
        ckpts.pretrained, [ckpts.finetuned[t] for t in tiny_testbed.tasks], method="ties-sum", q=0.99, lam=0.5
    )
    assert payload["accuracy"] == tiny_testbed.evaluate(merged, "test")
    assert payload["split"] == "test" and payload["config"]["merge"]["method"] == "ties-sum"
    individual = tiny_testbed.individual_accuracy("test")
    for task, norm in payload["normalized_accuracy"].items():
        assert norm == pytest.approx(100 * payload["accuracy"][task] / individual[task])


def test_evaluate_exemplar_mode_and_reference_models(tiny_testbed, tiny_testbed_cache: Path, capsys) -> None:
    args = ["evaluate", CONFIG, *TINY, "--cache-dir", str(tiny_testbed_cache), "--json"]
    assert main([*args, "merge.trust_region=exemplar", "exemplars.n=4"]) == 0
    exemplar = json.loads(capsys.readouterr().out)
    assert set(exemplar["accuracy"]) == set(tiny_testbed.tasks)
    assert main([*args, "--model", "pretrained"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == tiny_testbed.pretrained_accuracy("validation")
    assert main([*args, "--model", "individual"]) == 0
    individual = json.loads(capsys.readouterr().out)
    assert individual["mean_normalized_accuracy"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("merge.lamda=0.3", "unknown config key 'merge.lamda'; did you mean 'merge.lam'?"),
        ("merge.method=tie", "unknown merge method 'tie'; did you mean 'ties-sum'"),
        ("merge.trust_region=exemplars", "merge.trust_region"),
        ("merge.q=1.5", "merge.q"),
        ("split=tset", "split"),
        ("suite.widht=8", "unknown testbed option 'suite.widht'; did you mean 'suite.width'?"),
        ("benchmark=testbd", "unknown benchmark 'testbd'; did you mean 'testbed'"),
        ("merge.q", "must look like key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(tiny_testbed_cache: Path, override: str, message: str, capsys) -> None:
    code = main(["evaluate", CONFIG, *TINY, override, "--cache-dir", str(tiny_testbed_cache)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tatr: error:"), captured.err
    assert message in lines[0]


def test_errors_from_the_real_command_line(tmp_path: Path) -> None:
    proc = run_cli(["evaluate", str(tmp_path / "nope.yaml")], tmp_path)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"tatr: error: {tmp_path / 'nope.yaml'}: no such experiment file"
    )
    proc = run_cli(["evaluate", CONFIG, "merge.lamda=0.3"], tmp_path)
    assert proc.returncode == 2 and "did you mean 'merge.lam'?" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "testbed").exists()  # failed before building anything
