"""benchmarks/gpu_check.py at the test's size on the CPU: it runs the project's own code end to end,
its numbers are finite, and its bf16 check really compares bf16 gradients with fp32 ones."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_relative_error_is_the_global_l2_ratio():
    exact = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert gpu_check.relative_error(exact, exact) == 0.0
    approx = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[4.0]])}
    assert gpu_check.relative_error(approx, exact) == pytest.approx(1 / 5)  # ‖(0,1,0)‖ / ‖(3,0,4)‖
    with pytest.raises(ValueError, match="different keys"):
        gpu_check.relative_error({"a": exact["a"]}, exact)


def test_tiny_run_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--model", "tiny", "--exemplars", "4", "--tasks", "2", "--eval-images", "16"]
    assert gpu_check.main([*argv, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())["results"][0]
    assert result["model"] == "tiny" and result["device"] == "cpu"
    timings = [k for k in result if k.endswith(("_s", "_per_s"))]
    assert len(timings) == 8
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in timings)
    # bf16 really differs from fp32 (a check comparing fp32 with itself would give 0) and is close
    assert 0 < result["bf16_relative_error"] < gpu_check.BF16_TOLERANCE and result["bf16_ok"] is True
    # both merges moved all but the 1% the trust region drops (q = 0.99)
    assert result["merge_zero-shot_moved_fraction"] == pytest.approx(0.99, abs=2e-3)
    assert result["merge_exemplar_moved_fraction"] == pytest.approx(0.99, abs=2e-3)
    assert f"| bf16 vs fp32 gradient rel. error | {result['bf16_relative_error']:.4f} |" in table


def test_the_bf16_check_fails_the_run_when_the_error_is_too_large(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gpu_check, "BF16_TOLERANCE", 1e-9)
    argv = ["--device", "cpu", "--model", "tiny", "--exemplars", "2", "--tasks", "2", "--eval-images", "4"]
    assert gpu_check.main(argv) == 1
