"""Both notebooks run top to bottom (nbclient) on data the tests make, so they cannot rot.

The kernel is this interpreter (a temporary kernelspec pointing at `sys.executable`), with the
repository on PYTHONPATH and the notebook's parameters in its environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.report_fixtures import BENCHMARK, make_store

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def run_notebook(name: str, tmp: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> nbformat.NotebookNode:
    spec = tmp / "jupyter" / "kernels" / "tatr-test"
    spec.mkdir(parents=True)
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tatr tests",
        "language": "python",
        "env": {"PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", **env},
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        book, kernel_name="tatr-test", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return book


def images(book: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in book.cells for out in cell.get("outputs", []))


def text(book: nbformat.NotebookNode) -> str:
    parts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_explore_results_runs_on_a_small_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_store(tmp_path / "results", seeds=(0, 1), parts=("final", "mask-ratio", "trial"))
    book = run_notebook("explore_results.ipynb", tmp_path, monkeypatch, TATR_RESULTS=str(root))
    assert images(book) >= 2  # the interactive figure and the report's version of it
    out = text(book)
    assert BENCHMARK in out and "sweep 'sweep-a'" in out


def test_explore_results_says_when_the_store_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CellExecutionError, match="no rows under"):
        run_notebook("explore_results.ipynb", tmp_path, monkeypatch, TATR_RESULTS=str(tmp_path / "empty"))


@pytest.mark.slow
def test_trust_region_anatomy_runs_on_the_tiny_testbed(
    tiny_testbed: object, tiny_testbed_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import TINY_OPTIONS

    book = run_notebook(
        "trust_region_anatomy.ipynb",
        tmp_path,
        monkeypatch,
        TATR_CACHE=str(tiny_testbed_cache),
        TATR_SUITE=json.dumps(TINY_OPTIONS),
        TATR_EXEMPLARS="16",
        TATR_Q="0.95",
    )
    assert images(book) >= 3
    out = text(book)
    assert "Jaccard" in out and "block 00" in out
