"""Hostile results stores: names from rows never lead a report outside its root; bad rows get one line.

A victim folder beside the results root (and symlinks inside the root pointing at it) must be
byte-identical after every command here; every refusal is a single line, with the file and line
number for store rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.report import build as report
from tatr.report import figures
from tatr.report import wandb_rows as report_wandb
from tatr.store.rows import append_rows, read_store, store_dir
from tests.report_fixtures import BENCHMARK, make_store

GOOD_ROW = {
    "run_id": "r1",
    "benchmark": BENCHMARK,
    "job_type": "final",
    "method": "ta",
    "trust_region": "off",
    "lam": 0.3,
    "seed": 0,
    "split": "test",
    "task": "digits",
    "accuracy": 71.5,
    "normalized_accuracy": 80.0,
    "timestamp": 1.0,
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links as links) with the digest of each file's bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder outside the results root shaped like a report, which the old code deleted."""
    folder = tmp_path / "victim"
    (folder / "tables").mkdir(parents=True)
    (folder / "figures").mkdir()
    (folder / "tables" / "precious.csv").write_text("do not touch\n")
    (folder / "index.html").write_text("<p>mine</p>")
    (folder / "notes.txt").write_text("mine too")
    return folder


def raw_store(root: Path, *lines: str, name: str = "run.jsonl") -> Path:
    """A store file written by hand (as a hostile or broken writer would), bypassing `append_rows`."""
    folder = store_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tatr: error: ") and "\n" not in err, err
    return err


# --- names from rows --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("benchmark", "../victim"),
        ("benchmark", ".."),
        ("benchmark", "sub/../../victim"),
        ("benchmark", "/abs/victim"),
        ("benchmark", ".hidden"),
        ("benchmark", ""),
        ("run_id", "../../victim/x"),
        ("study", "../victim"),
        ("experiment", "a/b"),
        ("task", "../victim"),
        ("task", "digits|../victim"),
    ],
)
def test_unsafe_names_in_rows_get_one_line_and_touch_nothing(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str], field: str, value: str
) -> None:
    results = tmp_path / "results"
    path = raw_store(results, json.dumps({**GOOD_ROW, field: value}))
    before = snapshot(victim)
    assert main(["report", "--root", str(results), "--tables-only", "--published", str(tmp_path / "none.csv")]) == 2
    err = one_line_error(capsys)
    assert f"{path}:1: bad store row: {field} " in err and "is not a safe name" in err
    assert snapshot(victim) == before
    assert sorted(p.name for p in results.iterdir()) == ["store"]  # nothing written in the root either


def test_benchmark_from_the_command_line_is_a_name_too(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = make_store(tmp_path / "results", parts=("final",))
    before = snapshot(victim)
    assert main(["report", "--root", str(results), "--benchmark", "../victim", "--tables-only"]) == 2
    assert "'../victim' is not a safe name" in one_line_error(capsys)
    assert snapshot(victim) == before


def test_rows_given_directly_are_checked_too(tmp_path: Path, victim: Path) -> None:
    """`generate(rows=…)` (how --from-wandb feeds the report) checks the benchmark as well."""
    rows = pd.DataFrame([{**GOOD_ROW, "benchmark": "../victim"}])
    before = snapshot(victim)
    with pytest.raises(TatrError, match="not a safe name"):
        report.generate(tmp_path / "results", rows=rows, published=None, figures=False)
    assert snapshot(victim) == before


def test_a_benchmark_folder_linking_out_of_the_root_is_refused(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = make_store(tmp_path / "results", parts=("final",))
    (results / BENCHMARK).symlink_to(victim, target_is_directory=True)
    before = snapshot(victim)
    assert main(["report", "--root", str(results), "--tables-only"]) == 2
    assert "leaves" in one_line_error(capsys)
    assert snapshot(victim) == before


def test_links_inside_the_report_folder_are_replaced_not_followed(tmp_path: Path, victim: Path) -> None:
    """tables/, figures/ and index.html that link out are replaced by the new report; their targets stay."""
    results = make_store(tmp_path / "results", parts=("final",))
    folder = results / BENCHMARK
    folder.mkdir()
    (folder / "tables").symlink_to(victim / "tables", target_is_directory=True)
    (folder / "figures").symlink_to(victim / "figures", target_is_directory=True)
    (folder / "index.html").symlink_to(victim / "index.html")
    before = snapshot(victim)
    [done] = report.generate(results, published=None, figures=False)
    assert snapshot(victim) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(report.REPORT_OUTPUTS)
    for name in ("tables", "figures", "index.html"):
        assert not (folder / name).is_symlink()
    assert sorted(p.stem for p in (folder / "tables").glob("*.csv")) == ["main"] == done.tables
    assert "tatr report: synthetic" in (folder / "index.html").read_text()


@pytest.mark.parametrize("where", ["tables/published.csv", "index.html", "figures/p.csv"])
def test_the_published_csv_is_never_an_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    results = make_store(tmp_path / "results", parts=("final",))
    published = results / BENCHMARK / where
    published.parent.mkdir(parents=True, exist_ok=True)
    published.write_text("benchmark,model,method,task,accuracy,source\n")
    assert main(["report", "--root", str(results), "--tables-only", "--published", str(published)]) == 2
    assert "an input of the report lies in its output" in one_line_error(capsys)
    assert published.read_text() == "benchmark,model,method,task,accuracy,source\n"


def test_the_store_is_never_an_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--root x/synthetic/tables --out x`: the report would replace the folder holding the store."""
    root = make_store(tmp_path / "x" / BENCHMARK / "tables", parts=("final",))
    before = snapshot(root)
    assert main(["report", "--root", str(root), "--out", str(tmp_path / "x"), "--tables-only"]) == 2
    assert "an input of the report lies in its output" in one_line_error(capsys)
    assert snapshot(root) == before


def test_a_failed_report_keeps_the_previous_one_and_leaves_no_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = make_store(tmp_path / "results", parts=("final", "mask-ratio"))
    report.generate(results, published=None)
    folder = results / BENCHMARK
    before = snapshot(folder)

    def broken(fig: object, stem: Path) -> None:
        (stem.parent / "half-written.png").write_bytes(b"\x89PNG")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(figures, "save", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        report.generate(results, published=None)
    assert snapshot(folder) == before  # no .tatr-tmp-* left, the old report whole


# --- store rows -------------------------------------------------------------------------------------
BAD_LINES = [
    ("[1, 2]", "must be a JSON object, not list"),
    ('"x"', "must be a JSON object, not str"),
    ("3", "must be a JSON object, not int"),
    ("null", "must be a JSON object, not NoneType"),
    (json.dumps({**GOOD_ROW, "accuracy": "71.5"}), "accuracy must be a number"),
    (json.dumps({**GOOD_ROW, "accuracy": True}), "accuracy must be a number"),
    (json.dumps({**GOOD_ROW, "accuracy": [71.5]}), "accuracy must be a number"),
    (json.dumps({**GOOD_ROW, "lam": float("nan")}), "NaN is not a number"),
    (json.dumps({**GOOD_ROW, "accuracy": float("inf")}), "Infinity is not a number"),
    (json.dumps(GOOD_ROW).replace("71.5", "1e400"), "accuracy must be finite"),
    (json.dumps({**GOOD_ROW, "seed": 1.5}), "seed must be an integer"),
    (json.dumps({**GOOD_ROW, "trial": "3"}), "trial must be an integer"),
    (json.dumps({**GOOD_ROW, "components": "positive"}), "components must be a list"),
    (json.dumps({**GOOD_ROW, "components": [1]}), "components must be a list"),
    (json.dumps({**GOOD_ROW, "split": 1}), "split must be text"),
    (json.dumps({**GOOD_ROW, "task": None, "benchmark": 7}), "benchmark 7 is not a safe name"),
    (json.dumps({k: v for k, v in GOOD_ROW.items() if k != "run_id"}), "run_id is missing"),
    ("[" * 100_000, "not a JSON row"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_store_lines_get_one_line_with_file_and_line_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    path = raw_store(tmp_path, json.dumps(GOOD_ROW), "", line)
    with pytest.raises(TatrError, match=message) as info:
        read_store(tmp_path)
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)
    assert main(["report", "--root", str(tmp_path), "--tables-only"]) == 2
    assert f"{path}:3: " in one_line_error(capsys)


def test_a_store_file_that_is_not_text_gets_one_line(tmp_path: Path) -> None:
    folder = store_dir(tmp_path)
    folder.mkdir()
    (folder / "r.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TatrError, match=r"r\.jsonl: not a text file"):
        read_store(tmp_path)


def test_good_rows_read_back_with_their_values(tmp_path: Path) -> None:
    raw_store(tmp_path, json.dumps(GOOD_ROW), json.dumps({**GOOD_ROW, "task": "a|b", "accuracy": 0.5}))
    rows = read_store(tmp_path)
    assert rows["task"].tolist() == ["digits", "a|b"] and rows["accuracy"].tolist() == [71.5, 0.5]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"accuracy": float("nan")}, "accuracy must be finite"),
        ({"accuracy": float("inf")}, "accuracy must be finite"),
        ({"lam": float("-inf")}, "lam must be finite"),
        ({"q": float("nan")}, "q must be finite"),
        ({"benchmark": "../victim"}, "not a safe name"),
        ({"task": "../x"}, "not a safe name"),
    ],
)
def test_append_refuses_rows_it_could_not_read_back(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(TatrError, match=message):
        append_rows(tmp_path, [{**GOOD_ROW, **change}], "r1")
    assert not list(tmp_path.rglob("*.jsonl"))


def test_append_refuses_a_run_id_leaving_the_store(tmp_path: Path, victim: Path) -> None:
    before = snapshot(victim)
    for run_id in ("../../victim/tables/precious", "/abs/x", ".."):
        with pytest.raises(TatrError, match="not a safe name"):
            append_rows(tmp_path / "results", [{**GOOD_ROW, "run_id": None}], run_id)
    assert snapshot(victim) == before and not (tmp_path / "results").exists()


def test_an_undefined_normalized_accuracy_is_stored_as_null(tmp_path: Path) -> None:
    """A task whose fine-tuned model scores 0 has no normalized accuracy: null in the store, not NaN."""
    path = append_rows(tmp_path, [{**GOOD_ROW, "normalized_accuracy": float("nan")}], "r1")
    assert "NaN" not in path.read_text()
    value = read_store(tmp_path)["normalized_accuracy"].iloc[0]
    assert value is None or math.isnan(value)


# --- W&B ----------------------------------------------------------------------------------------------
class FakeFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def download(self, root: str, replace: bool = False) -> None:
        target = Path(root) / self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"columns": ["task", "split", "normalized_accuracy"], "data": []}))


class FakeRun:
    def __init__(self, run_id: str, benchmark: str = BENCHMARK, table: str | None = None) -> None:
        self.id, self.group, self.job_type, self.commit, self.created_at = run_id, "s", "final", None, 1.0
        self.config = {"benchmark": benchmark, "merge": {"method": "ta", "trust_region": "off", "lam": 0.3}}
        self.summary: dict = {"test/accuracy/digits": 70.0}
        self.table = table
        if table is not None:
            self.summary["accuracy_table"] = {"_type": "table-file", "path": table}

    def file(self, path: str) -> FakeFile:
        return FakeFile(path)


class FakeApi:
    def __init__(self, runs: list[FakeRun]) -> None:
        self._runs = runs

    def runs(self, path: str) -> list[FakeRun]:
        return self._runs


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (FakeRun("../../victim"), "not a safe name"),
        (FakeRun("ok", benchmark="../victim"), "not a safe name"),
        (FakeRun("../../victim", table="t.json"), "not a safe name"),
        (FakeRun("ok", table="../../../../victim/tables/precious.csv"), "leaves"),
        (FakeRun("ok", table="/tmp/abs.json"), "leaves the run's folder"),
    ],
)
def test_wandb_runs_with_unsafe_names_get_one_line(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch, run: FakeRun, message: str
) -> None:
    scratch = tmp_path / "scratch" / "a" / "b"
    scratch.mkdir(parents=True)
    monkeypatch.setattr(report_wandb, "tempfile", SimpleNamespace(TemporaryDirectory=lambda **kw: _Here(scratch)))
    before = snapshot(victim)
    with pytest.raises(TatrError, match=message) as info:
        report.rows_from_wandb("team/tatr", api=FakeApi([run]))
    assert "\n" not in str(info.value)
    assert snapshot(victim) == before
    assert not list(scratch.rglob("*"))  # nothing downloaded anywhere


def test_wandb_summary_values_must_be_numbers(tmp_path: Path) -> None:
    run = FakeRun("ok")
    run.summary["test/accuracy/digits"] = "seventy"
    with pytest.raises(TatrError, match=r"W&B run 'ok': accuracy must be a number"):
        report.rows_from_wandb("team/tatr", api=FakeApi([run]))


class _Here:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> str:
        return str(self.folder)

    def __exit__(self, *exc: object) -> None:
        return None
