"""The import direction is a contract: cli > report > runs > suites > core, and the core imports no
model, dataset, optuna or wandb code. `lint-imports` reads the contracts from pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_layers_contract_holds() -> None:
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert ", 0 broken." in result.stdout and "BROKEN" not in result.stdout


def test_a_violation_is_caught(tmp_path: Path) -> None:
    """The contract is live: an upward import from the core into the run layer breaks it."""
    package = tmp_path / "tatr"
    shutil.copytree(REPO / "tatr", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "core" / "upward.py").write_text("from tatr.runs import store  # noqa: F401\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    exe = shutil.which("lint-imports")
    assert exe is not None
    result = subprocess.run([exe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "tatr.core.upward -> tatr.runs" in result.stdout
