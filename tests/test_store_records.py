"""The store owns the record type and the run ids (issue 18): `RunRecord`'s named constructors give
rows of the schema, every kind of run id comes from `tatr.store.run_ids` (in the formats stores
already hold), every row names its model (the testbed's too), and a sweep in one process builds its
suite and plan book once and evaluates its trials with the grids' checks."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tatr.suites
from tatr.core.errors import TatrError
from tatr.runs.plan import PlanBook
from tatr.store import run_ids
from tatr.store.record import RunRecord, record_from_wandb, store_rows, wandb_config, write_store
from tatr.store.rows import check_row, read_store
from tatr.store.schema import COLUMNS, METHOD_OPTIONS
from tests.sweep_fixtures import REPO, write_experiment

TATR = REPO / "tatr"
STAMP = r"\d{8}-\d{6}-[0-9a-f]{8}"
CONFIG = {
    "name": "exp",
    "benchmark": "testbed",
    "suite": {"seed": 3},
    "merge": {"method": "ta", "trust_region": "exemplar", "q": 0.9, "lam": 0.4, "components": None},
    "exemplars": {"n": 8, "seed": 1},
    "split": "validation",
    "seed": 1,
}
ACC = {"a": 50.0, "b": 70.0}
NORM = {"a": 60.0, "b": 80.0}


# --- the named constructors ------------------------------------------------------------------------
def _rows(rec: RunRecord) -> list[dict]:
    rows = store_rows(rec)
    for row in rows:
        assert set(row) == set(COLUMNS)  # append_rows writes them in COLUMNS order
        check_row(row)
    return rows


def test_merged_record_gives_rows_of_the_schema(tmp_path: Path) -> None:
    rec = RunRecord.merged(
        run_id="evaluate-20250101-000000-0123abcd",
        job_type="evaluate",
        config=CONFIG,
        config_hash="abc",
        model="testbed-vit-96x3",
        split="validation",
        accuracy=ACC,
        normalized=NORM,
        merge_seconds=1.0,
        eval_seconds=2.0,
        mask={"w": (1, 10)},
        value=60.0,
    )
    assert rec.subject == "merged" and rec.mask == {"w": [1, 10]}
    rows = _rows(rec)
    assert [r["task"] for r in rows] == ["a", "b"]
    row = rows[0]
    assert (row["model"], row["method"], row["trust_region"], row["q"], row["lam"]) == (
        "testbed-vit-96x3",
        "ta",
        "exemplar",
        0.9,
        0.4,
    )
    assert (row["exemplars"], row["seed"], row["accuracy"], row["normalized_accuracy"]) == (8, 1, 50.0, 60.0)
    assert write_store(tmp_path, rec) and not write_store(tmp_path, rec)
    assert set(read_store(tmp_path)["model"]) == {"testbed-vit-96x3"}


@pytest.mark.parametrize("subject", ["pretrained", "individual"])
def test_reference_record_has_no_merge_columns(subject: str) -> None:
    rec = RunRecord.reference(
        subject=subject,
        run_id=run_ids.baseline_run_id(subject),
        job_type="baseline",
        config=CONFIG,
        config_hash="abc",
        model="ViT-B-32",
        split="test",
        accuracy=ACC,
        normalized=NORM,
        study="exp",
        ablation="baselines",
    )
    for row in _rows(rec):
        assert (row["method"], row["model"], row["seed"], row["ablation"]) == (subject, "ViT-B-32", 3, "baselines")
        merge_columns = ("trust_region", "q", "lam", "lam_neg", "components", "exemplars", *METHOD_OPTIONS)
        assert all(row[c] is None for c in merge_columns), row
    with pytest.raises(ValueError, match="pretrained"):
        RunRecord.reference(subject="merged", **{k: v for k, v in _reference_args().items() if k != "subject"})


def _reference_args() -> dict:
    return {
        "subject": "pretrained",
        "run_id": "r",
        "job_type": "baseline",
        "config": CONFIG,
        "config_hash": "abc",
        "model": None,
        "split": "test",
        "accuracy": ACC,
        "normalized": NORM,
    }


def test_gradients_record_is_one_row_per_pair() -> None:
    rec = RunRecord.gradients(
        run_id=run_ids.ablation_run_id("gradient-correlation"),
        config=CONFIG,
        config_hash="abc",
        model="minilm",
        correlations={"a|b": 0.5, "a|c": -0.25},
        ablation="gradient-correlation",
        study="exp",
    )
    rows = _rows(rec)
    assert [r["task"] for r in rows] == ["a|b", "a|c"]
    assert {(r["job_type"], r["split"], r["method"], r["model"], r["normalized_accuracy"]) for r in rows} == {
        ("ablation", "train", None, "minilm", None)
    }


def test_model_falls_back_to_the_config_and_survives_wandb() -> None:
    """A record without a model (a W&B run logged before records had one) reads its config's;
    a record with one logs it, and the W&B mirror reads it back."""
    old = {**CONFIG, "suite": {"model": "ViT-B-32"}}
    assert RunRecord("r", None, None, "trial", old, "h", "validation", ACC, NORM).model == "ViT-B-32"
    assert RunRecord("r", None, None, "trial", CONFIG, "h", "validation", ACC, NORM).model is None
    rec = RunRecord.merged(
        run_id="r", job_type="trial", config=CONFIG, config_hash="h", model="testbed-vit-32x1",
        split="validation", accuracy=ACC, normalized=NORM,
    )  # fmt: skip
    back = record_from_wandb(wandb_config(rec), "r", "trial", "validation", ACC, NORM)
    assert back.model == "testbed-vit-32x1" and store_rows(back)[0]["model"] == "testbed-vit-32x1"


# --- run ids: one owner, the formats of today ------------------------------------------------------
def test_run_ids_of_every_kind_keep_their_format() -> None:
    assert re.fullmatch(STAMP, run_ids.new_run_id())
    assert re.fullmatch(f"evaluate-{STAMP}", run_ids.evaluate_run_id())
    assert re.fullmatch(f"ablation-plugin-{STAMP}", run_ids.ablation_run_id("plugin"))
    assert re.fullmatch(f"baseline-pretrained-{STAMP}", run_ids.baseline_run_id("pretrained"))
    point = run_ids.ablation_run_id("mask-ratio")
    assert run_ids.grid_trial_run_id(point, 7) == f"{point}-t007"
    # sweep ids are deterministic: the same formula as before the move (stores hold them)
    for job, kind in (("trial", ""), ("final", "final-")):
        digest = hashlib.sha256(f"a b/c|3|2024-01-01|{job}".encode()).hexdigest()[:8]
        assert run_ids.sweep_run_id("a b/c", 3, "2024-01-01", job) == f"a-b-c-{kind}t0003-{digest}"
    assert run_ids.sweep_run_id("x" * 60, 12, "t").startswith("x" * 40 + "-t0012-")


def test_run_ids_are_built_only_in_the_store() -> None:
    """No module outside `tatr.store` writes a run id's prefix or stamp by hand."""
    hand_made = re.compile(
        r'f"(evaluate|ablation|baseline)-\{|new_run_id\(|sha256\(f"\{study\}|def (run_id_for|slug)\('
    )
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in TATR.rglob("*.py")
        if path.parent.name != "store"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if hand_made.search(line)
    ]
    assert offenders == []


# --- every row names its model: the testbed's too -------------------------------------------------
@pytest.mark.slow
def test_testbed_rows_name_their_model(tiny_testbed, tiny_testbed_cache: Path, tmp_path: Path) -> None:
    from tatr.cli import main

    config = str(REPO / "experiments" / "testbed.yaml")
    args = [config, "suite.preset=tiny", "suite.progress=false", "--cache-dir", str(tiny_testbed_cache)]
    assert main(["evaluate", *args, "--root", str(tmp_path)]) == 0
    assert main(["evaluate", *args, "--model", "pretrained", "--root", str(tmp_path)]) == 0
    rows = read_store(tmp_path)
    assert len(rows) == 2 * len(tiny_testbed.tasks)
    assert set(rows["model"]) == {"testbed-vit-32x1"} == {tiny_testbed.model_name}
    assert set(rows["run_id"].str.extract(r"^(evaluate)-\d{8}-\d{6}-[0-9a-f]{8}$")[0]) == {"evaluate"}


# --- one sweep path --------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _sweep(tmp: Path, trials: int = 3, **kw):
    from tatr.runs.sweep.run import run_sweep

    return run_sweep(
        write_experiment(tmp),
        REPO / "sweeps" / "tatr.yaml",
        trials=trials,
        results=tmp / "results",
        wandb=False,
        progress=False,
        echo=lambda s: None,
        **kw,
    )


def test_one_worker_sweep_builds_the_suite_and_plan_book_once(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = {"suite": 0, "book": 0}
    get_suite, book_init = tatr.suites.get_suite, PlanBook.__init__

    def counting_get_suite(*args, **kwargs):
        built["suite"] += 1
        return get_suite(*args, **kwargs)

    def counting_init(self, *args, **kwargs):
        built["book"] += 1
        book_init(self, *args, **kwargs)

    monkeypatch.setattr(tatr.suites, "get_suite", counting_get_suite)
    monkeypatch.setattr(PlanBook, "__init__", counting_init)
    result = _sweep(env, trials=3)
    assert result.complete + result.pruned == 3 and result.test is not None
    assert built == {"suite": 1, "book": 1}
    rows = read_store(env / "results")
    assert set(rows["job_type"]) == {"trial", "final"}


def test_a_sweep_trial_with_a_non_finite_merge_is_refused(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check as `evaluate_merged`: nothing is evaluated, nothing reaches the store."""
    import tatr.runs.plan

    real = tatr.runs.plan.merge_once

    def overflowing(*args, **kwargs):
        merged, seconds, mask = real(*args, **kwargs)
        key = next(iter(merged))
        merged = {**merged, key: torch.full_like(merged[key], float("inf"))}
        return merged, seconds, mask

    monkeypatch.setattr("tatr.runs.sweep.trial.merge_once", overflowing)
    with pytest.raises(TatrError, match="NaN or infinite"):
        _sweep(env, trials=2)
    assert read_store(env / "results").empty


def test_a_fisher_row_names_its_estimator_and_no_other_row_does() -> None:
    """Two Fisher estimators of one configuration must not look like a re-run: the row keeps which one."""
    rows = {}
    for method, stats in [("fisher", {"fisher_estimator": "per-sample"}), ("fisher", None), ("regmean", {})]:
        config = {**CONFIG, "merge": {**CONFIG["merge"], "method": method}}
        if stats is not None:
            config["statistics"] = stats
        rec = RunRecord.merged(
            run_id="evaluate-20250101-000000-0123abcd", job_type="evaluate", config=config, config_hash="abc",
            model="m", split="test", accuracy=ACC, normalized=NORM, merge_seconds=1.0, eval_seconds=1.0,
        )  # fmt: skip
        rows[method, stats is None] = _rows(rec)[0]["fisher_estimator"]
    assert rows == {("fisher", False): "per-sample", ("fisher", True): "fusionbench", ("regmean", False): None}
    assert {r["fisher_estimator"] for r in _rows(RunRecord.merged(
        run_id="evaluate-20250101-000000-0123abcd", job_type="evaluate", config=CONFIG, config_hash="abc",
        model="m", split="test", accuracy=ACC, normalized=NORM, merge_seconds=1.0, eval_seconds=1.0,
    ))} == {None}  # fmt: skip
