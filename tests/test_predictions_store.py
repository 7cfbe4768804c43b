"""Per-example predictions: the suites give them, the store keeps them compactly, old stores still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tatr.core.errors import TatrError
from tatr.store.predictions import (
    TaskPredictions,
    pack_correct,
    prediction_columns,
    predictions_from_row,
    unpack_correct,
    unpack_predicted,
)
from tatr.store.record import RunRecord, store_rows, write_store
from tatr.store.rows import append_rows, read_store
from tatr.store.schema import COLUMNS, PREDICTION_COLUMNS
from tatr.suites import evaluation as ev
from tests.sweep_fixtures import ToySweepSuite

CONFIG = {
    "name": "exp",
    "benchmark": "testbed",
    "suite": {"preset": "tiny"},
    "merge": {"method": "ta", "trust_region": "off", "q": 0.99, "lam": 0.3},
    "seed": 0,
}


def preds(n: int, k: int, seed: int = 0, classes: int = 10) -> TaskPredictions:
    rng = np.random.default_rng(seed)
    correct = np.zeros(n, bool)
    correct[rng.choice(n, k, replace=False)] = True
    return TaskPredictions(correct, rng.integers(0, classes, n))


def record(split: str, predictions: dict[str, TaskPredictions] | None, run_id: str = "r1") -> RunRecord:
    acc = {t: p.accuracy for t, p in (predictions or {"a": preds(320, 200)}).items()}
    return RunRecord.merged(
        run_id=run_id, job_type="evaluate", config=CONFIG, config_hash="h", model="m", split=split,
        accuracy=acc, normalized=acc, predictions=predictions,
    )  # fmt: skip


def test_the_new_columns_come_last() -> None:
    """Columns added later go after the older ones (an older store's columns keep their positions)."""
    at = COLUMNS.index("timestamp") + 1
    assert COLUMNS[at : at + 3] == PREDICTION_COLUMNS
    assert COLUMNS[at + 3 :] == ("fisher_estimator", "exemplar_selection")


@pytest.mark.parametrize("n", [1, 7, 8, 9, 320, 1001])
def test_packed_bits_round_trip(n: int) -> None:
    p = preds(n, n // 2, seed=n, classes=300)  # classes ≥ 256: uint16
    cols = prediction_columns(p, "test")
    assert len(cols["correct"]) == 4 * -(-((n + 7) // 8) // 3)  # base64 of ⌈n/8⌉ bytes
    assert predictions_from_row(cols) == p


def test_320_examples_take_40_bytes() -> None:
    import base64

    assert len(base64.b64decode(pack_correct(np.ones(320, bool)))) == 40


def test_predictions_round_trip_through_the_store(tmp_path: Path) -> None:
    p = {"a": preds(320, 201, 1), "b": preds(100, 37, 2)}
    assert write_store(tmp_path, record("test", p))
    rows = read_store(tmp_path)
    for _, row in rows.iterrows():
        back = predictions_from_row(row.to_dict())
        assert back == p[row["task"]]
        assert row["accuracy"] == back.accuracy
        assert row["n_examples"] == back.n


def test_predicted_classes_are_kept_on_test_rows_only() -> None:
    p = {"a": preds(320, 201)}
    (val,) = store_rows(record("validation", p))
    (test,) = store_rows(record("test", p))
    assert val["correct"] == test["correct"] and val["n_examples"] == 320
    assert val["predicted"] is None and test["predicted"] is not None
    assert np.array_equal(predictions_from_row(val).correct, p["a"].correct)


def test_rows_without_predictions_still_read(tmp_path: Path) -> None:
    """A store written before the columns existed: its rows lack the keys; they read with nulls."""
    (row,) = store_rows(record("test", None))
    old = {k: v for k, v in row.items() if k not in PREDICTION_COLUMNS}
    old.update(git_commit="abc", timestamp=1.0)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "old.jsonl").write_text(json.dumps(old) + "\n")
    rows = read_store(tmp_path)
    assert list(rows.columns) == list(COLUMNS)
    assert rows[list(PREDICTION_COLUMNS)].isna().all().all()
    assert predictions_from_row(rows.iloc[0].to_dict()) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"correct": "not base64!"}, "not base64"),
        ({"n_examples": 321}, "needs 41"),
        ({"n_examples": None}, "n_examples must be"),
        ({"predicted": "AAAA"}, "predicted holds"),
        ({"accuracy": 50.0}, "100·mean"),
        ({"correct": None}, "without correct"),
        ({"correct": pack_correct(np.ones(320, bool))[:-4] + "//8="}, "past n_examples|needs"),
    ],
)
def test_inconsistent_predictions_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    (row,) = store_rows(record("test", {"a": preds(320, 200)}))
    with pytest.raises(TatrError, match=message):
        append_rows(tmp_path, [{**row, **change}], "bad")


def test_bits_past_n_are_refused() -> None:
    with pytest.raises(ValueError, match="past n_examples"):
        unpack_correct(pack_correct(np.ones(8, bool)), 5)
    with pytest.raises(ValueError, match="needs 5 or 10"):
        unpack_predicted("AAAA", 5)


# --- the suites: predictions in the loader's order, their accuracy the suite's ---------------------------
def test_the_toy_suites_predictions_are_its_accuracies(tmp_path: Path) -> None:
    suite = ToySweepSuite({"tasks": 2, "n": 50}, tmp_path)
    theta = {k: v + 0.1 for k, v in suite._theta0.items()}
    got = suite.evaluate_predictions(theta, "test")
    assert {t: p.accuracy for t, p in got.items()} == suite.evaluate(theta, "test")
    for task, p in got.items():
        x, y = suite._data(task, "test")
        with torch.no_grad():
            logits = suite.encoder(theta)(x) @ suite.head(task).T
        assert np.array_equal(p.predicted, logits.argmax(-1).numpy())
        assert np.array_equal(p.correct, (logits.argmax(-1) == y).numpy())


def test_evaluate_merged_carries_predictions_and_a_plugin_without_them_gives_none(tmp_path: Path) -> None:
    suite = ToySweepSuite({"tasks": 2, "n": 40}, tmp_path)
    theta = {k: v.clone() for k, v in suite._theta0.items()}
    result = ev.evaluate_merged(suite, theta, "validation")
    assert result.predictions is not None
    assert {t: p.accuracy for t, p in result.predictions.items()} == result.accuracy

    class Plugin:  # a suite written against `Suite.evaluate` alone
        name, tasks = suite.name, suite.tasks

        def evaluate(self, state_dict, split, tasks=None, on_task=None):
            return suite.evaluate(state_dict, split, tasks, on_task)

        def individual_accuracy(self, split):
            return suite.individual_accuracy(split)

    plain = ev.evaluate_merged(Plugin(), theta, "validation")
    assert plain.predictions is None and plain.accuracy == result.accuracy


def test_the_testbeds_predictions_are_its_accuracies(tiny_testbed) -> None:
    from tatr.core.checkpoints import load_state_dict

    theta = load_state_dict(tiny_testbed.checkpoints().finetuned[tiny_testbed.tasks[0]])
    got = tiny_testbed.evaluate_predictions(theta, "test")
    assert {t: p.accuracy for t, p in got.items()} == tiny_testbed.evaluate(theta, "test")
    assert all(p.n == len(tiny_testbed.loader(t, "test").dataset) for t, p in got.items())
    assert got == tiny_testbed.evaluate_predictions(theta, "test")  # the order is fixed


def test_the_text_suite_caches_its_predictions(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    from text_fixtures import TINY_OPTIONS, make_tasks, make_tiny_bert

    from tatr.core.checkpoints import load_state_dict
    from tatr.suites import get_suite

    model, tasks = make_tiny_bert(tmp_path / "bert"), make_tasks(tmp_path / "tasks")
    suite = get_suite("text", {"model": str(model), "tasks": str(tasks), **TINY_OPTIONS}, tmp_path / "cache")
    theta = load_state_dict(suite.checkpoints().finetuned[suite.tasks[0]])
    measured = ev.predictions(suite, theta, "test")  # uncached
    assert suite.evaluate_predictions(theta, "test") == measured
    entry = json.loads(next((tmp_path / "cache" / "text-evals").rglob("*.json")).read_text())
    assert {"accuracy", *PREDICTION_COLUMNS} <= set(entry)

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder ran although every evaluation was cached")

    monkeypatch.setattr(suite, "encoder", refuse)
    assert suite.evaluate_predictions(theta, "test") == measured
    assert suite.evaluate(theta, "test") == {t: p.accuracy for t, p in measured.items()}


# --- the writers: a sweep keeps them, and its store grows by less than 2× --------------------------------
def test_a_50_trial_sweeps_store_keeps_predictions_and_grows_less_than_twofold(tmp_path: Path, monkeypatch) -> None:
    from tatr.runs.sweep.run import run_sweep
    from tests.sweep_fixtures import REPO, write_experiment

    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = write_experiment(tmp_path, n=300)  # 300 examples per split, as the testbed's validation split
        run_sweep(exp, REPO / "sweeps" / "tatr.yaml", (), trials=50, results=tmp_path / "results",
                  echo=lambda s: None, wandb=False, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = read_store(tmp_path / "results")
    complete = rows[(rows.job_type == "trial") & rows.correct.notna()]
    assert len(complete) > 0 and complete.predicted.isna().all() and (complete.n_examples == 300).all()
    final = rows[rows.job_type == "final"]
    assert final.correct.notna().all() and final.predicted.notna().all()
    for _, row in rows[rows.correct.notna()].iterrows():
        assert predictions_from_row(row.to_dict()).accuracy == row["accuracy"]
    files = list((tmp_path / "results" / "store").glob("*.jsonl"))
    now = sum(f.stat().st_size for f in files)
    today = sum(
        len(json.dumps({k: v for k, v in json.loads(line).items() if k not in PREDICTION_COLUMNS})) + 1
        for f in files
        for line in f.read_text().splitlines()
    )
    assert now < 2 * today, (now, today)
