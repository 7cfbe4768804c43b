"""Ablations: the committed files load, the grid tunes on validation, rows reach the store and the report.

Runs use the `sweep-toy` suite of `tests/sweep_fixtures.py` (a real `Suite` whose trials cost
milliseconds); the same code runs on the testbed and on CLIP, only the benchmark name differs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import tests.sweep_fixtures  # noqa: F401  (registers the sweep-toy suite)
from tatr.cli import ablate
from tatr.core.errors import TatrError
from tatr.core.merging import plan_merge
from tatr.runs import ablation_spec, ablations, correlation
from tatr.store.rows import read_store
from tatr.suites import get_suite
from tatr.suites.evaluation import evaluate_merged

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "experiments" / "ablations").glob("*.yaml"))
TOY = {"tasks": 3, "n": 48}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def write(folder: Path, name: str, ablation: dict, **experiment: object) -> Path:
    body = {"name": name, "benchmark": "sweep-toy", "suite": TOY, "exemplars": {"n": 8}, **experiment}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({**body, "ablation": ablation}))
    return path


def quiet(_: str) -> None:
    pass


# --- the files ------------------------------------------------------------------------------------
def test_every_committed_ablation_file_loads() -> None:
    kinds = {}
    for path in FILES:
        config, spec = ablation_spec.load_ablation(path)
        assert config.benchmark == "testbed", path  # the testbed by default
        kinds[spec.kind] = ablation_spec.points(config, spec) if spec.kind != "gradient-correlation" else []
    assert set(kinds) == {
        "components",
        "trust-region",
        "sensitivity",
        "mask-ratio",
        "exemplar-count",
        "plugin",
        "gradient-correlation",
        "exemplar-selection",  # the checks the paper leaves open: tests/test_open_checks_ablations.py
        "conflict-score",
        "zero-shot-proxy",
    }
    # mask ratio: log-spaced drops from 0.01% to 20%, q fixed at each point, for TA+TR and TIES+TR
    mask = kinds["mask-ratio"]
    assert {p.merge.method for p in mask} == {"ta", "ties-sum"}
    drops = sorted({round(1 - p.qs[0], 10) for p in mask})
    assert drops[1] == pytest.approx(1e-4) and drops[-1] == pytest.approx(0.2) and drops[0] == 0.0
    # exemplar count: 1 … 256 exemplars with 3 seeds
    counts = kinds["exemplar-count"]
    assert sorted({p.exemplars for p in counts}) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert {p.seed for p in counts} == {0, 1, 2}
    # variants without exemplars run once; with them, once per seed
    sens = kinds["sensitivity"]
    per_mode = pd.Series([p.merge.trust_region for p in sens]).value_counts().to_dict()
    assert per_mode == {"exemplar": 3, "gradient-only": 3, "magnitude-only": 1}
    plugin = kinds["plugin"]
    pairs = [(p.merge.method, p.merge.trust_region) for p in plugin]
    assert pairs[:6] == [
        ("ta", "off"),
        ("ta", "zero-shot"),
        ("ties-sum", "off"),
        ("ties-sum", "zero-shot"),
        ("ties-mean", "off"),
        ("ties-mean", "zero-shot"),
    ]
    for method in ("dare", "dare-ties", "breadcrumbs"):  # each with and without the trust region, once
        assert [mode for m, mode in pairs if m == method] == ["off", "zero-shot"], method
    assert plugin[0].qs == (1.0,)  # no trust region: only λ is tuned
    # components: the negative part with its own λ_neg, tuned on the block's grid (0 leaves it out)
    scaled = [p for p in kinds["components"] if p.lam_negs is not None]
    assert {p.merge.components for p in scaled} == {("orthogonal", "negative")} and len(scaled) == 3
    assert scaled[0].lam_negs[0] == 0.0 and scaled[0].merge.lam_neg is None


def test_overrides_pick_the_benchmark_and_the_block(tmp_path: Path) -> None:
    config, spec = ablation_spec.load_ablation(
        REPO / "experiments/ablations/components.yaml", ["benchmark=clip8", "ablation.seeds=[5]", "exemplars.n=4"]
    )
    assert (config.benchmark, spec.seeds, config.exemplars.n) == ("clip8", (5,), 4)


@pytest.mark.parametrize(
    ("ablation", "overrides", "message"),
    [
        ({"kind": "components", "variants": [{}]}, ["ablation.seed=[1]"], "did you mean 'ablation.seeds'"),
        ({"kind": "mask-ratio", "variants": [{}]}, [], "needs `drops`"),
        ({"kind": "plugin"}, [], "needs `variants`"),
        ({"kind": "plugin", "variants": [{}], "tune_split": "test"}, [], "tuning on the test split is refused"),
        ({"kind": "sizes", "variants": [{}]}, [], "ablation.kind"),
        ({"kind": "plugin", "variants": [{"trust_region": "exemplars"}]}, [], "ablation.variants.0.trust_region"),
        ({"kind": "plugin", "variants": [{}]}, ["merge.lamda=1"], "did you mean 'merge.lam'"),
    ],
)
def test_bad_files_get_one_line(tmp_path: Path, ablation: dict, overrides: list[str], message: str) -> None:
    path = write(tmp_path, "bad", ablation)
    with pytest.raises(TatrError, match=message) as info:
        ablation_spec.load_ablation(path, overrides)
    assert "\n" not in str(info.value)


def test_a_file_without_the_block_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("name: x\nbenchmark: testbed\n")
    with pytest.raises(TatrError, match="needs an `ablation:` block"):
        ablation_spec.load_ablation(path)


# --- running ------------------------------------------------------------------------------------
def test_lambda_is_chosen_on_validation_and_tested_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "plug",
        {
            "kind": "plugin",
            "lam": [0.2, 0.6, 1.0],
            "q": [0.8, 0.95],
            "variants": [{"method": "ta", "trust_region": "zero-shot"}],
        },
    )
    config, spec = ablation_spec.load_ablation(path)
    [result] = ablations.run(config, spec, tmp_path / "results", log=quiet, wandb=False)
    store = read_store(tmp_path / "results")
    val = store[store["split"] == "validation"]
    assert val["run_id"].nunique() == 6 and len(val) == 6 * 3  # 2 q × 3 λ trials, 3 tasks each
    means = val.groupby(["q", "lam"], sort=False)["accuracy"].mean()
    best_q, best_lam = means.idxmax()
    test = store[store["split"] == "test"]
    assert (test["lam"].unique().tolist(), test["q"].unique().tolist()) == ([best_lam], [best_q])
    assert (result.lam, result.q) == (best_lam, best_q)
    assert set(test["job_type"]) == {"ablation"} and set(test["ablation"]) == {"plugin"}
    assert set(test["experiment"]) == {"plug"}  # the experiment's name, never the ablation kind
    assert test["trial"].isna().all() and set(test["study"]) == {"plug"}
    # the test numbers are what an independent merge + evaluation gives
    suite = get_suite("sweep-toy", TOY)
    ckpt = suite.checkpoints()
    plan = plan_merge(ckpt.pretrained, [ckpt.finetuned[t] for t in suite.tasks], method="ta", trust_region="zero-shot")
    expected = evaluate_merged(suite, plan.merged(best_q, best_lam), "test")
    got = test.set_index("task")["accuracy"].to_dict()
    assert got == pytest.approx(expected.accuracy)


def test_all_components_equal_plain_task_arithmetic(tmp_path: Path) -> None:
    """The three components partition τ: merging them all is TA without a mask, at the same λ."""
    path = write(
        tmp_path,
        "comp",
        {
            "kind": "components",
            "lam": [0.3, 0.7],
            "q": [0.9],
            "variants": [{"components": ["orthogonal", "positive", "negative"]}, {"components": ["positive"]}],
        },
        merge={"method": "ta", "trust_region": "exemplar"},
    )
    config, spec = ablation_spec.load_ablation(path)
    results = ablations.run(config, spec, tmp_path / "results", log=quiet, wandb=False)
    everything, _ = results
    suite = get_suite("sweep-toy", TOY)
    ckpt = suite.checkpoints()
    plan = plan_merge(ckpt.pretrained, [ckpt.finetuned[t] for t in suite.tasks], method="ta", trust_region="off")
    assert everything.test == pytest.approx(evaluate_merged(suite, plan.merged(1.0, everything.lam), "test").accuracy)
    store = read_store(tmp_path / "results")
    comps = store[store["split"] == "test"]["components"].map(tuple).unique().tolist()
    assert sorted(comps) == [("orthogonal", "positive", "negative"), ("positive",)]
    assert set(store[store["split"] == "test"]["exemplars"]) == {8}


def test_mask_ratio_fixes_q_and_q_one_is_no_trust_region(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mask",
        {"kind": "mask-ratio", "lam": [0.3, 0.8], "drops": [0.0, 0.05, 0.3], "variants": [{"method": "ta"}]},
        merge={"trust_region": "zero-shot"},
    )
    config, spec = ablation_spec.load_ablation(path)
    results = ablations.run(config, spec, tmp_path / "results", log=quiet, wandb=False)
    assert [r.q for r in results] == [1.0, 0.95, 0.7]
    suite = get_suite("sweep-toy", TOY)
    ckpt = suite.checkpoints()
    plan = plan_merge(ckpt.pretrained, [ckpt.finetuned[t] for t in suite.tasks], method="ta", trust_region="off")
    assert results[0].test == pytest.approx(evaluate_merged(suite, plan.merged(1.0, results[0].lam), "test").accuracy)
    # without a sweep in the store, the report's λ × q heatmap shows this validation grid
    from tatr.report import figures, tables

    grid, source = figures.sweep_grid(tables.prepare(read_store(tmp_path / "results")))
    assert source == "grid of ablation 'mask-ratio' (TA+TR)"
    assert list(grid.index) == [0.3, 0.8] and list(grid.columns) == pytest.approx([0.0, 0.05, 0.3])


def test_resume_skips_finished_points(tmp_path: Path) -> None:
    path = write(tmp_path, "tr", {"kind": "trust-region", "lam": [0.5], "q": [0.9], "seeds": [0, 1],
                                  "variants": [{"trust_region": "off"}, {"trust_region": "exemplar"}]})  # fmt: skip
    config, spec = ablation_spec.load_ablation(path)
    first = ablations.run(config, spec, tmp_path / "results", log=quiet, wandb=False)
    assert len(first) == 3  # off once, exemplar per seed
    files = sorted((tmp_path / "results" / "store").iterdir())
    lines: list[str] = []
    again = ablations.run(config, spec, tmp_path / "results", resume=True, log=lines.append, wandb=False)
    assert again == [] and sum("skipped" in line for line in lines) == 3
    assert sorted((tmp_path / "results" / "store").iterdir()) == files


def test_a_points_identity_is_the_first_stores_and_holds_only_the_options_its_method_reads(tmp_path: Path) -> None:
    """`--resume` across versions: a TA point hashes as `point_hash` did before DARE's and Breadcrumbs'
    options and λ_neg existed (transcribed below from that version), and an option joins a point's
    identity only where its method reads it."""
    from dataclasses import replace

    from tatr.core.cache import content_hash

    def first_point_hash(config, spec, point) -> str:  # tatr/runs/ablations.py at 34ccc00
        return content_hash(
            "ablation-point",
            spec.kind,
            config.benchmark,
            config.suite,
            point.merge.model_dump(mode="json", include={"method", "trust_region", "q", "lam", "ties_k", "components"}),
            point.seed,
            point.exemplars,
            point.qs,
            point.lams,
            spec.tune_split,
            spec.eval_split,
        )[:12]

    path = write(tmp_path, "plug", {"kind": "plugin", "lam": [0.5], "q": [0.9],
                                    "variants": [{"method": "ta"}, {"method": "dare"}]})  # fmt: skip
    config, spec = ablation_spec.load_ablation(path)
    ta, dare = ablation_spec.points(config, spec)
    assert ablations.point_hash(config, spec, ta) == first_point_hash(config, spec, ta)

    def changed(point, **update) -> bool:
        moved = replace(point, merge=point.merge.model_copy(update=update))
        return ablations.point_hash(config, spec, moved) != ablations.point_hash(config, spec, point)

    assert not changed(ta, dare_p=0.3) and not changed(ta, breadcrumbs_beta=0.05)
    assert changed(dare, dare_p=0.3) and changed(dare, dare_seed=1) and not changed(dare, breadcrumbs_density=0.5)
    assert changed(ta, ties_k=10.0) and changed(ta, q=0.5)


def test_points_are_mirrored_to_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    path = write(
        tmp_path, "wb", {"kind": "plugin", "lam": [0.5], "variants": [{"method": "ta", "trust_region": "off"}]}
    )
    config, spec = ablation_spec.load_ablation(path)
    ablations.run(config, spec, tmp_path / "results", log=quiet)
    runs = list((tmp_path / "results" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


# --- gradient correlation -----------------------------------------------------------------------------
def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    gen = torch.Generator().manual_seed(0)
    base = torch.rand(500, generator=gen)
    vectors = [base + 0.5 * torch.rand(500, generator=gen) for _ in range(3)]
    vectors[1][:100] = 0.0  # many ties, like parameters without gradient
    vectors[2] = torch.round(vectors[2] * 5) / 5  # coarse values: ties everywhere
    got = correlation.spearman_matrix(vectors)
    expected = spearmanr(np.stack([v.numpy() for v in vectors]), axis=1).statistic
    assert np.allclose(got.numpy(), expected, atol=1e-10)
    assert correlation.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_gradient_correlation_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "grad", {"kind": "gradient-correlation", "seeds": [0, 1], "max_coordinates": 200})
    config, spec = ablation_spec.load_ablation(path)
    ablations.run(config, spec, tmp_path / "results", log=quiet, wandb=False)
    store = read_store(tmp_path / "results")
    assert sorted(store["task"].unique()) == ["task0|task1", "task0|task2", "task1|task2"]
    assert set(store["split"]) == {"train"} and store.groupby("seed").size().to_dict() == {0: 3, 1: 3}
    # the stored ρ is the Spearman correlation of the suite's gradient files, subsampled alike
    suite = get_suite("sweep-toy", TOY)
    stats = suite.exemplar_gradients(8, 0)
    vectors = correlation.flat_gradients([stats.abs_mean[t] for t in suite.tasks], 200, 0)
    assert len(vectors[0]) == 200  # the toy has 280 coordinates: subsampled
    rho = correlation.spearman_matrix(vectors)
    row = store[(store["seed"] == 0) & (store["task"] == "task0|task2")]
    assert float(row["accuracy"].iloc[0]) == pytest.approx(float(rho[0, 2]))
    assert all(-1 <= v <= 1 and not math.isnan(v) for v in store["accuracy"])


# --- the command ----------------------------------------------------------------------------------
def test_cli_runs_a_folder_then_reports(tmp_path: Path) -> None:
    folder = tmp_path / "abl"
    folder.mkdir()
    methods = ("ta", "ties-sum")
    write(folder, "a", {"kind": "plugin", "lam": [0.4], "q": [0.9], "variants": [{"method": m} for m in methods],
                        "baselines": True}, merge={"trust_region": "zero-shot"})  # fmt: skip
    write(folder, "b", {"kind": "gradient-correlation", "seeds": [0]})
    result = CliRunner().invoke(
        ablate.command,
        [
            str(folder),
            "ablation.seeds=[0]",
            "suite.model=toy-mlp",
            "--root",
            str(tmp_path / "res"),
            "--no-wandb",
            "--report",
        ],
    )
    assert result.exit_code == 0, result.output
    assert set(read_store(tmp_path / "res")["model"]) == {"toy-mlp"}  # the suite's model, for the reference table
    assert "== " in result.output and "index.html" in result.output
    tables = tmp_path / "res" / "sweep-toy" / "tables"
    plugin = pd.read_csv(tables / "ablation_plugin.csv", index_col=0)
    assert list(plugin.index) == ["TA+TR", "TIES (dis-sum)+TR"]
    main = pd.read_csv(tables / "main.csv", index_col=0)
    assert list(main.index) == [
        "Pretrained",
        "Individual",
        "TA+TR",
        "TIES (dis-sum)+TR",
    ]  # plug-in rows fill the main table
    suite = get_suite("sweep-toy", TOY)
    assert main.loc["Individual", ["task0", "task1", "task2"]].tolist() == pytest.approx(
        list(suite.individual_accuracy("test").values())
    )
    assert main.at["Individual", "Normalized"] == pytest.approx(100.0)
    pretrained = evaluate_merged(suite, None, "test")
    assert main.at["Pretrained", "Average"] == pytest.approx(pretrained.mean_accuracy)
    # the plug-in table holds the store's test accuracies of each variant, one row per variant
    store = read_store(tmp_path / "res")
    tasks = ["task0", "task1", "task2"]
    test = store[(store["ablation"] == "plugin") & (store["split"] == "test") & (store["job_type"] == "ablation")]
    assert len(test) == len(methods) * len(tasks) and test["run_id"].nunique() == len(methods)
    assert len(plugin) == len(methods)
    for label, method in zip(plugin.index, methods, strict=True):
        mine = test[test["method"] == method].set_index("task")["accuracy"]
        assert plugin.loc[label, tasks].tolist() == pytest.approx(mine[tasks].tolist(), abs=1e-5), label
        assert plugin.at[label, "Average"] == pytest.approx(mine.mean(), abs=1e-5), label
        assert main.loc[label, tasks].tolist() == pytest.approx(mine[tasks].tolist(), abs=1e-5), label
    # the correlation table is the store's ρ per pair, symmetric, with 1 on the diagonal
    corr = pd.read_csv(tables / "ablation_gradient_correlation.csv", index_col=0)
    pairs = store[store["ablation"] == "gradient-correlation"]
    assert len(pairs) == 3 and list(corr.index) == tasks
    assert list(corr.columns) == [*(c for t in tasks for c in (t, f"{t}_std")), "seeds"]
    for pair in pairs.itertuples():
        a, b = pair.task.split("|")
        assert corr.at[a, b] == corr.at[b, a] == pytest.approx(pair.accuracy, abs=1e-5)
    assert [corr.at[t, t] for t in tasks] == [1.0, 1.0, 1.0]
    # the figure is a real PNG and the page shows it
    png = tmp_path / "res" / "sweep-toy" / "figures" / "plugin.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figures/plugin.png" in (tmp_path / "res" / "sweep-toy" / "index.html").read_text()


def test_cli_refuses_bad_files_before_running_any(tmp_path: Path) -> None:
    good = write(tmp_path, "good", {"kind": "plugin", "lam": [0.4], "variants": [{"method": "ta"}]})
    bad = write(tmp_path, "bad", {"kind": "plugin"})
    result = CliRunner().invoke(ablate.command, [str(good), str(bad), "--root", str(tmp_path / "res"), "--no-wandb"])
    assert isinstance(result.exception, TatrError) and "needs `variants`" in str(result.exception)
    assert not (tmp_path / "res").exists()


def test_a_variant_can_bring_its_own_lambda_grid(tmp_path: Path) -> None:
    """TSV-M defaults to λ = 1, outside a grid tuned for TA: `lam_grid` gives one variant its own grid,
    and leaves the others' points (and their identities, which --resume matches) unchanged."""
    block = {"kind": "plugin", "lam": [0.2, 0.4], "variants": [{"method": "ta", "trust_region": "off"}]}
    config, spec = ablation_spec.load_ablation(write(tmp_path, "a", block))
    before = ablation_spec.points(config, spec)
    block["variants"].append({"method": "tsv-m", "trust_region": "off", "lam_grid": [0.5, 1.0, 1.5]})
    config2, spec2 = ablation_spec.load_ablation(write(tmp_path, "a", block))
    after = ablation_spec.points(config2, spec2)
    assert after[0] == before[0] and after[0].lams == (0.2, 0.4)
    assert ablations.point_hash(config, spec, before[0]) == ablations.point_hash(config2, spec2, after[0])
    assert after[1].lams == (0.5, 1.0, 1.5) and after[1].merge.method == "tsv-m"
    ablations.run(config2, spec2, tmp_path / "results", log=quiet, wandb=False)
    val = read_store(tmp_path / "results").query("split == 'validation' and method == 'tsv-m'")
    assert sorted(val["lam"].unique()) == [0.5, 1.0, 1.5]
    block["variants"][1]["lam_grid"] = []
    with pytest.raises(TatrError, match=r"ablation.variants.1.lam_grid: give at least one λ"):
        ablation_spec.points(*ablation_spec.load_ablation(write(tmp_path, "a", block)))
