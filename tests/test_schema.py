"""One schema: a sweep, an ablation (with its baselines) and `tatr evaluate` write rows alike.

Every writer goes through `tatr.store.record`, so every row has the store's columns, in order, each
of its column's type, and the same meaning: `model` is the suite's model wherever the suite has
one, `experiment` is the experiment's name, `ablation` the ablation kind (null outside ablations).
The rows are read back from the JSONL files as written, not through `read_store`, so a writer that
left a column out or put one in another order is caught.

The `sweep-toy` suite of `tests/sweep_fixtures.py` is a real `Suite` with a `model` option (the
testbed has none, so it could not show a missing model) whose trials cost milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
from tatr.cli import main
from tatr.runs.ablation_spec import load_ablation, per_suite_seed, points
from tatr.store.schema import ABLATION_KINDS, COLUMNS, INTEGERS, JOB_TYPES, NUMBERS, TEXT
from tatr.suites import get_suite
from tatr.suites.evaluation import evaluate_merged

REPO = Path(__file__).resolve().parents[1]
TOY = {"tasks": 3, "n": 48, "model": "toy-mlp"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def write(path: Path, body: dict) -> Path:
    path.write_text(json.dumps(body))  # JSON is valid YAML
    return path


def written_rows(root: Path) -> list[dict]:
    rows = []
    for f in sorted((root / "store").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def check_types(row: dict) -> None:
    for column in INTEGERS:
        assert row[column] is None or type(row[column]) is int, (column, row)
    for column in NUMBERS:
        assert row[column] is None or type(row[column]) in (int, float), (column, row)
    for column in TEXT:
        assert row[column] is None or isinstance(row[column], str), (column, row)
    comps = row["components"]
    assert comps is None or (isinstance(comps, list) and all(isinstance(c, str) for c in comps)), row


def test_sweep_ablation_and_evaluate_rows_share_one_schema(tmp_path: Path) -> None:
    root = tmp_path / "results"
    experiment = write(
        tmp_path / "toy.yaml", {"name": "toy-exp", "benchmark": "sweep-toy", "suite": TOY, "exemplars": {"n": 8}}
    )
    sweep = ["sweep", str(experiment), "--sweep", str(REPO / "sweeps" / "tatr.yaml"), "--trials", "2"]
    assert main([*sweep, "--root", str(root), "--no-wandb", "--no-progress"]) == 0
    plugin = {"kind": "plugin", "lam": [0.3, 0.6], "q": [0.9], "baselines": True,
              "variants": [{"method": "ta", "trust_region": "exemplar"}]}  # fmt: skip
    ablation = write(
        tmp_path / "abl.yaml",
        {"name": "toy-abl", "benchmark": "sweep-toy", "suite": TOY, "exemplars": {"n": 8}, "ablation": plugin},
    )
    assert main(["ablate", str(ablation), "--root", str(root), "--no-wandb"]) == 0
    assert main(["evaluate", str(experiment), "split=test", "merge.lam=0.5", "--root", str(root)]) == 0
    assert main(["evaluate", str(experiment), "--model", "pretrained", "--root", str(root)]) == 0

    rows = written_rows(root)
    for row in rows:
        assert tuple(row) == COLUMNS  # the same columns, in the same order, whoever wrote the row
        check_types(row)
        assert row["job_type"] in JOB_TYPES
        assert row["model"] == "toy-mlp"  # the suite has a model: every row names it (sweeps too)
        assert row["git_commit"] is None or row["git_commit"]
        assert isinstance(row["timestamp"], float)
    kinds = {r["job_type"] for r in rows}
    assert kinds == {"trial", "final", "ablation", "baseline", "evaluate"}
    for row in rows:
        name = "toy-abl" if row["job_type"] in ("ablation", "baseline") else "toy-exp"
        assert row["experiment"] == name, row  # always the experiment's name, never the ablation kind
        assert row["ablation"] == ("plugin" if name == "toy-abl" else None), row
        merged = row["method"] not in ("pretrained", "individual")
        if merged:  # a merge's columns are filled the same way by every writer
            assert row["method"] == "ta" and isinstance(row["lam"], float), row
            assert (row["q"] is None) == (row["trust_region"] == "off"), row
        else:
            assert row["trust_region"] is None and row["q"] is None and row["lam"] is None, row
        uses = row["trust_region"] == "exemplar"
        assert (row["exemplars"] == 8) if uses else (row["exemplars"] is None), row
    # the evaluate rows hold what the suite gives for that merge and for θ_0
    suite = get_suite("sweep-toy", TOY)
    evaluated = [r for r in rows if r["job_type"] == "evaluate"]
    pretrained = {r["task"]: r["accuracy"] for r in evaluated if r["method"] == "pretrained"}
    assert pretrained == pytest.approx(evaluate_merged(suite, None, "validation").accuracy)
    merged_rows = [r for r in evaluated if r["method"] == "ta"]
    assert {r["split"] for r in merged_rows} == {"test"} and {r["lam"] for r in merged_rows} == {0.5}


def test_the_baselines_file_is_the_old_baseline_table() -> None:
    """`experiments/baselines/testbed.yaml` asks for the rows, grids and seeds of the module it replaces."""
    config, spec = load_ablation(REPO / "experiments" / "baselines" / "testbed.yaml")
    assert spec.kind == "baselines" and spec.kind in ABLATION_KINDS and spec.baselines
    assert spec.lam == tuple(round(0.1 * i, 1) for i in range(1, 16))
    runs = per_suite_seed(config, spec)
    assert [c.suite["seed"] for c, _ in runs] == [0, 1, 2]  # one testbed build per seed
    for cfg, part in runs:
        seed = cfg.suite["seed"]
        todo = points(cfg, part)
        assert [(p.merge.method, p.merge.trust_region) for p in todo] == [
            ("ta", "off"),
            ("ta", "zero-shot"),
            ("ta", "exemplar"),
            ("ties-sum", "off"),
            ("ties-sum", "zero-shot"),
            ("ties-mean", "off"),
            ("ties-mean", "zero-shot"),
        ]
        assert {p.seed for p in todo} == {seed} and {p.exemplars for p in todo} == {32}
        for p in todo:
            assert p.qs == ((1.0,) if p.merge.trust_region == "off" else (0.7, 0.8, 0.9, 0.95, 0.99))
            assert p.merge.ties_k == 20


def test_suite_seeds_build_one_suite_per_seed(tmp_path: Path) -> None:
    """With `suite_seeds`, each seed is its own suite: every variant runs per seed, baselines too."""
    from tatr.runs import ablations
    from tatr.store.rows import read_store

    spec = {"kind": "baselines", "baselines": True, "suite_seeds": True, "seeds": [0, 1], "lam": [0.3, 0.7],
            "variants": [{"method": "ta", "trust_region": "off"}]}  # fmt: skip
    path = write(tmp_path / "b.yaml", {"name": "toy-baselines", "benchmark": "sweep-toy", "suite": TOY,
                                       "ablation": spec})  # fmt: skip
    config, parsed = load_ablation(path)
    results = ablations.run(config, parsed, tmp_path / "results", log=lambda _: None, wandb=False)
    assert len(results) == 2  # TA needs no exemplars, yet runs once per build seed
    store = read_store(tmp_path / "results")
    test = store[store["split"] == "test"]
    for seed, result in zip((0, 1), results, strict=True):
        suite = get_suite("sweep-toy", {**TOY, "seed": seed})
        pre = test[(test["method"] == "pretrained") & (test["seed"] == seed)].set_index("task")["accuracy"]
        assert pre.to_dict() == pytest.approx(evaluate_merged(suite, None, "test").accuracy)
        ta = test[(test["method"] == "ta") & (test["seed"] == seed)].set_index("task")["accuracy"]
        assert ta.to_dict() == pytest.approx(result.test)
    assert set(test["ablation"]) == {"baselines"} and set(test["experiment"]) == {"toy-baselines"}
    assert results[0].test != results[1].test  # two builds, two sets of checkpoints
