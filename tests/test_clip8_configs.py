"""The paper setups (experiments/clip_vit_*.yaml) and the published reference numbers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tatr.core.errors import TatrError
from tatr.report import build as report
from tatr.report.labels import reference_label
from tatr.runs.config import load_config
from tatr.store.rows import append_rows
from tatr.suites import get_suite
from tatr.suites.clip8 import parse_options
from tatr.suites.clip8.data import TASKS

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "reference" / "published.csv"
SETUPS = {"clip_vit_b32": "ViT-B-32", "clip_vit_b16": "ViT-B-16", "clip_vit_l14": "ViT-L-14"}


@pytest.mark.parametrize("stem", sorted(SETUPS))
def test_paper_setups_load_and_build_a_suite(stem: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TATR_DATA", str(tmp_path))
    monkeypatch.setenv("TATR_CHECKPOINTS", str(tmp_path / "ckpt"))
    config = load_config(REPO / "experiments" / f"{stem}.yaml")
    assert config.benchmark == "clip8" and config.split == "validation"
    assert (config.merge.q, config.merge.lam) == (0.99, 0.3)
    options = parse_options(config.suite)
    assert options.model == SETUPS[stem] and options.pretrained == "openai"
    assert options.tasks == TASKS
    suite = get_suite("clip8", config.suite, tmp_path / "cache")  # no weights or data needed yet
    assert suite.tasks == TASKS and suite.data_root == tmp_path
    with pytest.raises(TatrError, match=f"fine-tuned checkpoint for SUN397 not found: {tmp_path}/ckpt/{SETUPS[stem]}"):
        suite.finetuned_source("SUN397")
    # overrides reach the suite options like any other key
    config = load_config(REPO / "experiments" / f"{stem}.yaml", ["suite.batch_size=7", "suite.tasks=[MNIST, SVHN]"])
    assert parse_options(config.suite).batch_size == 7 and get_suite("clip8", config.suite).tasks == ("MNIST", "SVHN")


def test_unset_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("TATR_DATA", raising=False)
    config = load_config(REPO / "experiments" / "clip_vit_b32.yaml")
    with pytest.raises(TatrError, match="environment variable TATR_DATA in '\\$\\{TATR_DATA\\}' is not set"):
        get_suite("clip8", config.suite)


def _published() -> pd.DataFrame:
    return pd.read_csv(PUBLISHED, comment="#")


def test_published_numbers_are_the_paper_numbers():
    pub = _published()
    assert set(pub["checkpoints"]) == {"task_vectors", "fusionbench"}  # FusionBench's re-trained ones: their own rows
    pub = pub[pub["checkpoints"] == "task_vectors"].drop(columns="checkpoints").reset_index(drop=True)
    assert list(pub.columns) == ["benchmark", "model", "method", "setting", "task", "accuracy", "source"]
    adamerging = pub["method"].str.startswith("AdaMerging")
    assert set(pub["benchmark"]) == {"clip8"} and pub["source"][~adamerging].str.contains("2501.15065").all()
    # every row names its method setting; the ViT-B/32 rows name their table
    assert pub["setting"].notna().all() and (pub["setting"].str.len() > 10).all()
    b32 = pub[(pub["model"] == "ViT-B/32") & ~adamerging]
    assert (b32["source"] == "TATR paper (arXiv 2501.15065), Table 1").all()
    # AdaMerging's own paper, Table 1 (ViT-B/32), with its setting: test inputs, 500 steps, batch 16
    ada = pub[adamerging]
    assert (ada["source"] == "AdaMerging paper (arXiv 2310.02575), Table 1").all() and set(ada["model"]) == {"ViT-B/32"}
    assert ada["setting"].str.contains("unlabeled test inputs").all() and ada["setting"].str.contains("500 steps").all()
    ties = pub[pub["method"].str.startswith("TIES")]["setting"]
    assert len(ties) == 5 and ties.str.contains("dis-sum").all() and ties.str.contains("k=20").all()
    assert (
        pub.set_index(["model", "method", "task"])
        .at[("ViT-B/32", "TIES", "average"), "setting"]
        .startswith("TIES dis-sum, k=20, λ=0.3")
    )
    avg = pub[pub["task"] == "average"].set_index(["model", "method"])["accuracy"]
    expected = {
        ("ViT-B/32", "Pretrained"): 48.0,
        ("ViT-B/32", "Individual"): 90.5,
        ("ViT-B/32", "Task Arithmetic"): 69.1,
        ("ViT-B/32", "TIES"): 72.4,
        ("ViT-B/32", "TATR"): 72.8,
        ("ViT-B/32", "TIES+TATR"): 73.3,
        ("ViT-B/32", "AdaMerging (task-wise)"): 71.1,
        ("ViT-B/32", "AdaMerging (layer-wise)"): 80.1,
        ("ViT-L/14", "Task Arithmetic"): 84.5,
        ("ViT-L/14", "TIES"): 86.0,
        ("ViT-L/14", "TATR"): 85.3,
        ("ViT-L/14", "TIES+TATR"): 86.5,
        ("ViT-B/16", "Task Arithmetic"): 73.8,
        ("ViT-B/16", "TIES"): 77.0,
        ("ViT-B/16", "TATR"): 77.0,
    }
    assert avg.to_dict() == expected
    per_task = pub[pub["task"] != "average"]
    assert list(per_task["task"]) == list(TASKS)  # the suite's task names, in the paper's order
    assert per_task["accuracy"].tolist() == [62.7, 59.3, 72.3, 82.3, 80.5, 72.6, 97.0, 55.4]
    assert round(per_task["accuracy"].mean(), 1) == 72.8  # consistent with the published average
    labels = {reference_label(m) for m in pub["method"]}
    assert labels == {
        "Pretrained",
        "Individual",
        "TA",
        "TIES (dis-sum)",
        "TA+TR",
        "TIES (dis-sum)+TR",
        "AdaMerging (task-wise)",  # the methods' own labels (tatr.core.adamerging), as the main table shows them
        "AdaMerging (layer-wise)",
    }
    from tatr.core.methods import merge_label

    assert {merge_label("adamerging-task"), merge_label("adamerging-layer")} <= labels


def test_report_places_a_reproduced_run_beside_the_published_numbers(tmp_path: Path):
    rows = [
        {
            "run_id": "00001-tatr",
            "benchmark": "clip8",
            "split": "test",
            "task": task,
            "accuracy": acc,
            "normalized_accuracy": acc / 0.9,
            "job_type": "final",
            "method": "ta",
            "trust_region": "zero-shot",
            "lam": 0.3,
            "q": 0.99,
            "seed": 0,
            "git_commit": "abc123",
            "timestamp": 1.7e9,
        }
        for task, acc in zip(TASKS, (62.0, 60.0, 72.0, 82.0, 80.0, 73.0, 97.0, 55.0), strict=True)
    ]
    append_rows(tmp_path, rows, "00001-tatr")
    report.generate(tmp_path, benchmarks=["clip8"], published=PUBLISHED, figures=False)
    ref = pd.read_csv(tmp_path / "clip8" / "tables" / "reference.csv", index_col=0)
    assert ref.at["ViT-B/32 TA+TR", "Published"] == 72.8
    assert ref.at["ViT-B/32 TA+TR", "Ours"] == pytest.approx(72.625)
    assert ref.at["ViT-L/14 TA+TR", "Published"] == 85.3
