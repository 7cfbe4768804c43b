"""results/reference/published.csv: each row's source and checkpoints, its names, and a report that never
compares numbers on different fine-tuned checkpoints (task_vectors' vs FusionBench's re-trained ones)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tatr.core.methods import merge_label
from tatr.report import build as report
from tatr.report.labels import DEFAULT_CHECKPOINTS, checkpoints_key, reference_label
from tatr.report.reference import reference_table
from tatr.report.selection import prepare
from tatr.store.rows import append_rows
from tatr.suites.clip8.data import TASKS

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "reference" / "published.csv"
FUSIONBENCH_DOC = (
    "FusionBench docs/modelpool/clip_vit.md (tag v0.2.33, commit 2d147c0c2296403c53d03eca6b59fc07ecf15fb1), "
    'table "Multi-task model merging methods using CLIP-ViT-{model} models", line {line}'
)


def _published() -> pd.DataFrame:
    return pd.read_csv(PUBLISHED, comment="#")


# --- the file --------------------------------------------------------------------------------------


def test_every_row_names_its_checkpoints_source_and_setting() -> None:
    pub = _published()
    assert list(pub.columns) == ["benchmark", "model", "checkpoints", "method", "setting", "task", "accuracy", "source"]
    assert not pub.isna().any().any()
    assert set(pub["benchmark"]) == {"clip8"} and set(pub["model"]) == {"ViT-B/32", "ViT-B/16", "ViT-L/14"}
    assert set(pub["checkpoints"]) == {"task_vectors", "fusionbench"}
    assert set(pub["task"]) == {"average", *TASKS}
    assert (pub["setting"].str.len() > 10).all()
    papers = pub[pub["checkpoints"] == "task_vectors"]["source"]
    assert papers.str.contains("2501.15065|2310.02575").all()  # the TATR and AdaMerging papers
    fb = pub[pub["checkpoints"] == "fusionbench"]
    assert fb["source"].str.startswith("FusionBench docs/modelpool/clip_vit.md (tag v0.2.33, commit 2d147c0").all()
    # one row per (checkpoints, model, method, task): nothing is listed twice
    assert not pub.duplicated(["checkpoints", "model", "method", "task"]).any()


def test_fusionbench_rows_are_its_tables() -> None:
    """Spot checks against the three tables (line numbers in the doc at v0.2.33), and every method's
    per-task numbers consistent with its stated average (each rounded to 0.1: within 0.1)."""
    pub = _published()
    fb = pub[pub["checkpoints"] == "fusionbench"]
    avg = fb[fb["task"] == "average"].set_index(["model", "method"])
    expected = {
        ("ViT-B/32", "Pre-trained", 841): 48.2,
        ("ViT-B/32", "Fine-tuned (STL)", 842): 90.3,
        ("ViT-B/32", "Simple Averaging", 847): 66.5,
        ("ViT-B/32", "Fisher Merging", 848): 70.6,
        ("ViT-B/32", "RegMean", 849): 82.4,
        ("ViT-B/32", "Task Arithmetic", 851): 68.0,
        ("ViT-B/32", "Ties-Merging", 853): 72.2,
        ("ViT-B/32", "Task-wise AdaMerging", 854): 68.7,
        ("ViT-B/32", "Layer-wise AdaMerging", 855): 82.6,
        ("ViT-B/32", "ISO-C", 858): 82.8,
        ("ViT-B/32", "ISO-CTS", 859): 82.7,
        ("ViT-B/16", "Pre-trained", 869): 55.3,
        ("ViT-B/16", "Fine-tuned (STL)", 870): 92.3,
        ("ViT-B/16", "Simple Averaging", 872): 72.3,
        ("ViT-B/16", "Fisher Merging", 873): 74.2,
        ("ViT-B/16", "RegMean", 874): 86.0,
        ("ViT-B/16", "Task Arithmetic", 876): 77.1,
        ("ViT-B/16", "Ties-Merging", 877): 77.5,
        ("ViT-B/16", "Layer-wise AdaMerging", 878): 85.0,
        ("ViT-L/14", "Pre-trained", 888): 64.6,
        ("ViT-L/14", "Fine-tuned (STL)", 889): 94.3,
        ("ViT-L/14", "Simple Averaging", 892): 80.0,
        ("ViT-L/14", "Fisher Merging", 893): 80.3,
        ("ViT-L/14", "RegMean", 894): 90.4,
        ("ViT-L/14", "Task Arithmetic", 896): 80.7,
        ("ViT-L/14", "Ties-Merging", 897): 84.0,
        ("ViT-L/14", "Task-wise AdaMerging", 898): 80.1,
        ("ViT-L/14", "Layer-wise AdaMerging", 899): 91.0,
    }
    assert len(avg) == len(expected)
    for (model, method, line), value in expected.items():
        assert avg.at[(model, method), "accuracy"] == value
        assert avg.at[(model, method), "source"] == FUSIONBENCH_DOC.format(model=model[4:], line=line)
    per_task = fb[fb["task"] != "average"]
    for (model, method), group in per_task.groupby(["model", "method"]):
        assert list(group["task"]) == list(TASKS)  # the tables' column order is the suite's
        assert abs(group["accuracy"].mean() - avg.at[(model, method), "accuracy"]) <= 0.1 + 1e-9
        assert (group["source"] == avg.at[(model, method), "source"]).all()
    b32 = per_task[(per_task["model"] == "ViT-B/32") & (per_task["method"] == "RegMean")]["accuracy"]
    assert b32.tolist() == [68.6, 70.0, 84.6, 95.4, 92.6, 83.4, 98.4, 66.1]  # line 849
    # FusionBench's TIES is the disjoint sum at k=20, λ=0.3, as tatr's ties-sum
    ties = fb[fb["method"] == "Ties-Merging"]["setting"]
    assert ties.str.contains("merge_func sum").all() and ties.str.contains("threshold 20").all()


def test_every_published_method_has_a_tatr_label() -> None:
    """Each row's method maps to a label `tatr report` shows for a store row (so 'Ours' can be filled)."""
    labels = {reference_label(m) for m in _published()["method"]}
    merges = {merge_label(m) for m in ("average", "ta", "ties-sum", "adamerging-task", "adamerging-layer")}
    merges |= {merge_label(m) for m in ("iso-c", "iso-cts", "fisher", "regmean")}
    merges |= {merge_label("ta", "zero-shot"), merge_label("ties-sum", "zero-shot")}
    assert labels == {"Pretrained", "Individual", *merges}


# --- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("TSV-M", "tsv-m"),
        ("TSV", "tsv-m"),
        ("tsvm", "tsv-m"),
        ("Iso-C", "iso-c"),
        ("ISO-C", "iso-c"),
        ("iso_c", "iso-c"),
        ("Iso-CTS", "iso-cts"),
        ("ISO-CTS", "iso-cts"),
        ("Consensus TA", "consensus-ta"),
        ("Consensus Task Arithmetic", "consensus-ta"),
        ("Consensus Merging", "consensus-ta"),
        ("Fisher Merging", "fisher"),
        ("fisher", "fisher"),
        ("RegMean", "regmean"),
        ("Simple Averaging", "average"),
        ("Ties-Merging", "ties-sum"),
        ("Task-wise AdaMerging", "adamerging-task"),
        ("Layer-wise  AdaMerging", "adamerging-layer"),
    ],
)
def test_source_names_map_to_the_methods_labels(name: str, method: str) -> None:
    assert reference_label(name) == merge_label(method)


def test_names_that_are_other_methods_keep_their_own() -> None:
    """RegMean++ reads the merged model's own activations: not RegMean. TSV-C is a compression scheme and
    'TALL masks + TA' one masked model per task: neither is a single merged model."""
    assert reference_label("RegMean++") == "RegMean++"
    assert reference_label("TSV-C") == "TSV-C"
    assert reference_label("TALL masks + TA") == "TALL masks + TA"
    assert reference_label("Pre-trained") == "Pretrained" and reference_label("Fine-tuned (STL)") == "Individual"


def test_checkpoint_names() -> None:
    assert DEFAULT_CHECKPOINTS == "task_vectors"
    for name in ("task_vectors", "Task-Vectors", "task vectors", "ilharco"):
        assert checkpoints_key(name) == "task_vectors"
    for name in ("fusionbench", "FusionBench", "fusion_bench", "tanganke"):
        assert checkpoints_key(name) == "fusionbench"
    assert checkpoints_key("tall-masks") == "tall_masks"
    assert checkpoints_key("My fine-tunes") == "myfinetunes"
    assert checkpoints_key(None) is None and checkpoints_key(float("nan")) is None and checkpoints_key(" ") is None


# --- the report keeps checkpoints apart ------------------------------------------------------------


def _store(root: Path, methods: dict[str, float], model: str = "ViT-B-32") -> None:
    for method, acc in methods.items():
        run_id = f"final-{method}"
        rows = [
            {"run_id": run_id, "benchmark": "clip8", "model": model, "split": "test", "task": task,
             "accuracy": acc, "normalized_accuracy": acc / 0.9, "job_type": "final", "method": method,
             "trust_region": "off", "lam": 0.3, "seed": 0, "timestamp": 1.7e9}
            for task in TASKS
        ]  # fmt: skip
        append_rows(root, rows, run_id)


def test_report_compares_with_task_vectors_numbers_only(tmp_path: Path) -> None:
    """The shipped file lists TA, TIES and AdaMerging on both kinds of checkpoints: the clip8 report shows
    only task_vectors' (the TATR and AdaMerging papers), never FusionBench's number, nor a mean of both."""
    _store(tmp_path, {"ta": 70.0, "ties-sum": 72.0, "fisher": 71.0, "iso-c": 80.0})
    report.generate(tmp_path, benchmarks=["clip8"], published=PUBLISHED, figures=False)
    ref = pd.read_csv(tmp_path / "clip8" / "tables" / "reference.csv", index_col=0)
    assert ref.at["ViT-B/32 TA", "Published"] == 69.1  # the TATR paper's, not FusionBench's 68.0
    assert ref.at["ViT-B/32 TIES (dis-sum)", "Published"] == 72.4  # not 72.2
    assert ref.at["ViT-B/32 AdaMerging (layer-wise)", "Published"] == 80.1  # not 82.6
    assert ref.at["ViT-B/32 TA", "Ours"] == pytest.approx(70.0)
    assert set(ref["Checkpoints"]) == {"task_vectors"}
    assert not ref["Source"].str.contains("FusionBench").any()
    # FusionBench's Fisher, Iso-C, RegMean, … have no task_vectors number here: not listed at all
    assert not any(label in ref.index for label in ("ViT-B/32 Fisher", "ViT-B/32 Iso-C", "ViT-B/32 RegMean"))
    assert set(ref.index) == {
        f"ViT-B/32 {label}"
        for label in ("Pretrained", "Individual", "TA", "TIES (dis-sum)", "TA+TR", "TIES (dis-sum)+TR")
    } | {"ViT-B/32 AdaMerging (task-wise)", "ViT-B/32 AdaMerging (layer-wise)"}
    md = (tmp_path / "clip8" / "tables" / "reference.md").read_text()
    assert "task_vectors fine-tuned checkpoints" in md and "(fusionbench) are left out" in md


def _rows(methods: dict[str, float], model: str = "ViT-B-32", **extra: object) -> pd.DataFrame:
    """Store rows as the report reads them (`prepare`), with any extra column (a `checkpoints` one)."""
    rows = [
        {"run_id": f"final-{m}", "benchmark": "clip8", "model": model, "split": "test", "task": task,
         "accuracy": acc, "normalized_accuracy": acc / 0.9, "job_type": "final", "method": m,
         "trust_region": "off", "lam": 0.3, "seed": 0, "timestamp": 1.7e9, **extra}
        for m, acc in methods.items()
        for task in TASKS
    ]  # fmt: skip
    return prepare(pd.DataFrame(rows))


def test_fusionbench_checkpoints_compare_with_fusionbench_numbers_only() -> None:
    pub = _published()
    df = _rows({"ta": 67.0, "fisher": 71.0, "iso-c": 83.0, "regmean": 82.0})
    table = reference_table(df, pub, "clip8", checkpoints="FusionBench")
    mean = table.mean
    assert mean.at["ViT-B/32 TA", "Published"] == 68.0  # FusionBench's, not the TATR paper's 69.1
    assert mean.at["ViT-B/32 Fisher", "Published"] == 70.6
    assert mean.at["ViT-B/32 RegMean", "Published"] == 82.4
    assert mean.at["ViT-B/32 Iso-C", "Published"] == 82.8 and mean.at["ViT-B/32 Iso-CTS", "Published"] == 82.7
    assert mean.at["ViT-B/32 Iso-C", "Ours"] == pytest.approx(83.0)
    assert "ViT-B/32 TA+TR" not in mean.index  # TATR's numbers are task_vectors' only
    assert set(table.info["Checkpoints"]) == {"fusionbench"}
    assert table.info["Source"].str.startswith("FusionBench").all()
    assert "(task_vectors) are left out" in table.note
    # the store may say which checkpoints its models used: then the argument is not needed
    stored = reference_table(_rows({"ta": 67.0}, checkpoints="fusion_bench"), pub, "clip8")
    assert stored.mean.at["ViT-B/32 TA", "Published"] == 68.0
    # a store on two kinds has no single set of published rows to compare with
    mixed = pd.concat([_rows({"ta": 67.0}, checkpoints="fusionbench"), _rows({"ties-sum": 70.0}, checkpoints="tv")])
    mixed.loc[mixed["method"] == "ties-sum", "checkpoints"] = "task_vectors"
    assert reference_table(mixed, pub, "clip8").empty


def test_unmarked_rows_are_task_vectors_and_a_csv_without_the_column_is_one_kind() -> None:
    df = _rows({"ta": 70.0})
    pub = pd.DataFrame(
        {
            "benchmark": ["clip8"] * 3,
            "model": ["ViT-B/32"] * 3,
            "checkpoints": ["", "fusionbench", "someone's"],
            "method": ["Task Arithmetic"] * 3,
            "task": ["average"] * 3,
            "accuracy": [69.1, 68.0, 50.0],
            "source": ["paper", "FusionBench", "elsewhere"],
        }
    )
    pub["checkpoints"] = pub["checkpoints"].replace("", None)
    table = reference_table(df, pub, "clip8")
    assert table.mean["Published"].tolist() == [69.1]  # the blank row is the default (task_vectors) kind
    assert "fusionbench, someones" in table.note
    assert reference_table(df, pub, "clip8", checkpoints="someone's").mean["Published"].tolist() == [50.0]
    assert reference_table(df, pub, "clip8", checkpoints="tall_masks").empty  # none published on those
    # without the column (a user's own CSV), every row is one kind, as before
    plain = reference_table(df, pub.drop(columns="checkpoints").iloc[:1], "clip8")
    assert plain.mean["Published"].tolist() == [69.1] and "Checkpoints" not in plain.info.columns
