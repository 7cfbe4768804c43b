"""A report's rows committed beside it (`results/<benchmark>/rows.jsonl.xz`): written by every report, read back as
store rows, and the start of `tatr ablate --resume` on a machine whose store is empty (a fresh clone).

Runs use the `sweep-toy` suite of `tests/sweep_fixtures.py` (a real suite whose trials cost milliseconds).
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
from tatr.cli import ablate
from tatr.core.errors import TatrError
from tatr.report import build as report
from tatr.store import rows as store_rows
from tatr.store.rows import read_store
from tests.report_fixtures import BENCHMARK, make_store

KEY = ["run_id", "task", "split"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def sorted_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.sort_values(KEY).reset_index(drop=True)


def test_the_snapshot_holds_every_row_of_the_store_and_reads_back_the_same(tmp_path: Path) -> None:
    root = tmp_path / "results"
    make_store(root)
    report.generate(root, published=None, figures=False)
    snapshot = root / BENCHMARK / "rows.jsonl.xz"
    lines = lzma.decompress(snapshot.read_bytes()).decode().splitlines()
    files = sorted((root / "store").glob("*.jsonl"))
    on_disk = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(json.loads(line)["run_id"] + line for line in lines) == sorted(
        r["run_id"] + json.dumps(r) for r in on_disk
    )  # the same rows, field for field, as the run files hold them
    fresh = tmp_path / "fresh"
    (fresh / "store").mkdir(parents=True)
    shutil.copy(snapshot, fresh / "store" / "copy.jsonl.xz")
    pd.testing.assert_frame_equal(sorted_rows(read_store(fresh)), sorted_rows(read_store(root)))
    first = snapshot.read_bytes()
    report.generate(root, published=None, figures=False)
    assert snapshot.read_bytes() == first  # the same store gives the same bytes (deterministic compression)


def test_a_report_from_the_snapshot_alone_equals_the_original(tmp_path: Path) -> None:
    root, fresh = tmp_path / "results", tmp_path / "fresh"
    make_store(root)
    report.generate(root, published=None, figures=False)
    (fresh / "store").mkdir(parents=True)
    shutil.copy(root / BENCHMARK / "rows.jsonl.xz", fresh / "store" / "copy.jsonl.xz")
    report.generate(fresh, published=None, figures=False)
    for table in sorted((root / BENCHMARK / "tables").iterdir()):
        assert (fresh / BENCHMARK / "tables" / table.name).read_bytes() == table.read_bytes(), table.name


def test_identical_copies_count_once_and_different_ones_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "results"
    make_store(root, parts=("baseline",))
    files = sorted((root / "store").glob("*.jsonl"))
    shutil.copy(files[0], root / "store" / "again.jsonl")
    assert len(read_store(root)) == sum(len(f.read_text().splitlines()) for f in files)
    row = json.loads(files[0].read_text().splitlines()[0])
    (root / "store" / "again.jsonl").write_text(json.dumps({**row, "accuracy": row["accuracy"] + 1}) + "\n")
    with pytest.raises(TatrError, match=r"again\.jsonl:1: run .*differs from") as err:
        read_store(root)
    assert "\n" not in str(err.value)


def test_a_decompression_bomb_and_a_damaged_xz_file_are_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "results" / "store"
    store.mkdir(parents=True)
    monkeypatch.setattr(store_rows, "MAX_STORE_FILE_BYTES", 1 << 20)
    bomb = store / "bomb.jsonl.xz"
    bomb.write_bytes(lzma.compress(b"\n" * (8 << 20)))  # about 1 KiB on disk, 8 MiB inflated
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(TatrError, match=r"bomb\.jsonl\.xz: inflates past the 1 MiB limit"):
        read_store(tmp_path / "results")
    bomb.write_bytes(lzma.compress(b'{"run_id": "a"}\n')[:-12])  # cut short
    with pytest.raises(TatrError, match=r"bomb\.jsonl\.xz: not a whole xz store file") as err:
        read_store(tmp_path / "results")
    assert "\n" not in str(err.value)
    bomb.write_bytes(b"not xz at all")
    with pytest.raises(TatrError, match=r"bomb\.jsonl\.xz: not a whole xz store file"):
        read_store(tmp_path / "results")


def _ablation_file(folder: Path) -> Path:
    body = {
        "name": "tr",
        "benchmark": "sweep-toy",
        "suite": {"tasks": 3, "n": 48},
        "exemplars": {"n": 8},
        "ablation": {"kind": "trust-region", "lam": [0.5], "q": [0.9], "seeds": [0, 1], "baselines": True,
                     "variants": [{"trust_region": "off"}, {"trust_region": "exemplar"}]},
    }  # fmt: skip
    path = folder / "tr.yaml"
    path.write_text(json.dumps(body))
    return path


def test_resume_on_a_fresh_clone_continues_from_the_committed_rows(tmp_path: Path) -> None:
    """The committed results of one machine are where `tatr ablate --resume` starts on another: no point is run
    again, the store gets only the copy, and the report it writes is the committed one."""
    path = _ablation_file(tmp_path)
    first, clone = tmp_path / "first", tmp_path / "clone"
    args = ["--no-wandb", "--report"]
    done = CliRunner().invoke(ablate.command, [str(path), "--root", str(first), *args])
    assert done.exit_code == 0, done.output
    committed = first / "sweep-toy"
    shutil.copytree(committed, clone / "sweep-toy")  # what git holds: the report, the rows beside it
    again = CliRunner().invoke(ablate.command, [str(path), "--root", str(clone), "--resume", *args])
    assert again.exit_code == 0, again.output
    n_rows = len(read_store(first))
    assert f"--resume: the {n_rows:,} rows of" in again.output
    # the three points (off once, exemplar per seed) and the baselines
    assert again.output.count("in the store already (--resume), skipped") == 4
    assert "baselines of sweep-toy" in again.output
    assert sorted(p.name for p in (clone / "store").iterdir()) == ["sweep-toy-committed.jsonl.xz"]
    for name in ("baselines.csv", "rows.jsonl.xz", *(f"tables/{t.name}" for t in (committed / "tables").iterdir())):
        assert (clone / "sweep-toy" / name).read_bytes() == (committed / name).read_bytes(), name
    # without --resume nothing is copied: a regeneration from scratch is not mixed with the committed rows
    scratch = CliRunner().invoke(ablate.command, [str(path), "--root", str(tmp_path / "scratch"), "--no-wandb"])
    assert scratch.exit_code == 0 and "--resume:" not in scratch.output
