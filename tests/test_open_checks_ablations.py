"""The three checks the paper leaves open as ablations: the committed files, the points' identities, a tiny
run of each kind on the tiny testbed through to its table and figure, and the gap-closed interval against a
literal index bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tatr.core.cache import content_hash
from tatr.report.build import generate
from tatr.report.open_checks import GAP
from tatr.report.paired import gap_bootstrap
from tatr.runs import ablation_spec, ablations
from tatr.store.rows import read_store

REPO = Path(__file__).resolve().parents[1]
KINDS = ("exemplar_selection", "conflict_score", "zero_shot_proxy")


@pytest.mark.parametrize("folder", ["ablations", "text"])
def test_the_files_parse_with_the_sensitivity_grids(folder: str) -> None:
    _, sensitivity = ablation_spec.load_ablation(REPO / "experiments" / folder / "sensitivity.yaml")
    found = {}
    for stem in KINDS:
        config, spec = ablation_spec.load_ablation(REPO / "experiments" / folder / f"{stem}.yaml")
        assert spec.kind == stem.replace("_", "-") and config.benchmark == (
            "testbed" if folder == "ablations" else "text"
        )
        if stem == "exemplar_selection":  # q fixed as in exemplar_count.yaml: the compared axis is the draw
            _, count = ablation_spec.load_ablation(REPO / "experiments" / folder / "exemplar_count.yaml")
            assert (spec.lam, spec.q) == (sensitivity.lam, count.q)
        else:
            assert (spec.lam, spec.q) == (sensitivity.lam, sensitivity.q)
        found[stem] = ablation_spec.points(config, spec)
    selection = found["exemplar_selection"]
    assert sorted({p.exemplars for p in selection}) == [1, 2, 4, 8, 16, 32, 64]
    assert {(p.selection, p.seed) for p in selection} == {(s, d) for s in ("random", "balanced") for d in (0, 1, 2)}
    assert len(selection) == 7 * 2 * 3 and {p.merge.trust_region for p in selection} == {"exemplar"}
    modes = pd.Series([p.merge.trust_region for p in found["conflict_score"]]).value_counts().to_dict()
    assert modes == {"off": 1, "exemplar": 3, "diag-fisher": 3, "gradient-agreement": 3}
    modes = pd.Series([p.merge.trust_region for p in found["zero_shot_proxy"]]).value_counts().to_dict()
    assert modes == {"off": 1, "zero-shot": 1, "zero-shot-per-tensor": 1, "zero-shot-theta0": 1, "exemplar": 3}


def test_a_random_points_identity_is_as_before_the_option() -> None:
    """`--resume` across the change: a point drawing at random hashes as `point_hash` did before selections
    (transcribed below); a balanced point has an identity of its own."""

    def before(config, spec, point) -> str:  # tatr/runs/ablations.py before exemplars.selection
        return content_hash(
            "ablation-point", spec.kind, config.benchmark, config.suite, point.merge.identity(), point.seed,
            point.exemplars, point.qs, point.lams, spec.tune_split, spec.eval_split,
        )[:12]  # fmt: skip

    config, spec = ablation_spec.load_ablation(REPO / "experiments/ablations/exemplar_selection.yaml")
    random, balanced = ablation_spec.points(config, spec)[:6:3]
    assert (random.selection, balanced.selection) == ("random", "balanced") and random.seed == balanced.seed
    assert ablations.point_hash(config, spec, random) == before(config, spec, random)
    assert ablations.point_hash(config, spec, balanced) != before(config, spec, balanced)
    _, count = ablation_spec.load_ablation(REPO / "experiments/ablations/exemplar_count.yaml")
    same = ablation_spec.points(config, count)[0]
    assert ablations.point_hash(config, count, same) == before(config, count, same)


def _run(root: Path, kind: str, merge: dict, block: dict) -> None:
    body = {
        "name": f"tiny-{kind}",
        "benchmark": "testbed",
        "suite": {"preset": "tiny", "progress": False},
        "merge": merge,
        "exemplars": {"n": 6},
        "ablation": {"kind": kind, "lam": [0.3, 1.0], "q": [0.9, 0.99], "seeds": [0, 1], **block},
    }
    path = root / f"{kind}.yaml"
    path.write_text(json.dumps(body))
    config, spec = ablation_spec.load_ablation(path)
    ablations.run(config, spec, root / "results", log=lambda _: None, wandb=False)


def _averages(test: pd.DataFrame) -> pd.Series:
    """Average test accuracy per run (mean over its tasks), from the store's rows."""
    return test.groupby("run_id")["accuracy"].mean()


def test_a_tiny_run_of_each_kind_gives_its_table_and_figure(
    tiny_testbed, tiny_testbed_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TATR_CACHE", str(tiny_testbed_cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    _run(
        tmp_path,
        "exemplar-selection",
        {"method": "ta", "trust_region": "exemplar"},
        {"exemplars": [1, 4], "variants": [{}]},
    )
    modes = ("off", "exemplar", "diag-fisher", "gradient-agreement")
    _run(tmp_path, "conflict-score", {"method": "ta"}, {"variants": [{"trust_region": m} for m in modes]})
    proxies = ("off", "zero-shot", "zero-shot-per-tensor", "zero-shot-theta0", "exemplar")
    _run(tmp_path, "zero-shot-proxy", {"method": "ta"}, {"variants": [{"trust_region": m} for m in proxies]})
    generate(tmp_path / "results", figures=True)
    out = tmp_path / "results" / "testbed"
    store = read_store(tmp_path / "results")
    test = store[(store["split"] == "test") & (store["job_type"] == "ablation")]

    # exemplar selection: counts × selections; balanced − random paired by seed, from the store's numbers
    table = pd.read_csv(out / "tables" / "ablation_exemplar_selection.csv", index_col=0)
    assert list(table.index) == [1, 4] and {"Random", "Balanced"} <= set(table.columns)
    sel = test[test["ablation"] == "exemplar-selection"]
    assert set(sel["exemplar_selection"]) == {"random", "balanced"}
    for n in (1, 4):
        runs = sel[sel["exemplars"] == n]
        avg = _averages(runs)
        by = runs.drop_duplicates("run_id").set_index("run_id")
        mean = {s: avg[by.index[by["exemplar_selection"] == s]].mean() for s in ("random", "balanced")}
        assert table.at[n, "Random"] == pytest.approx(mean["random"], abs=1e-5)
        assert table.at[n, "Balanced"] == pytest.approx(mean["balanced"], abs=1e-5)
        assert table.at[n, "Δ Balanced vs Random"] == pytest.approx(mean["balanced"] - mean["random"], abs=1e-5)

    # conflict score: one row per score, each against the paper's exemplar Ω
    table = pd.read_csv(out / "tables" / "ablation_conflict_score.csv", index_col=0)
    assert list(table.index) == ["TA", "TA+TR (exemplar)", "TA+TR (diagonal Fisher)", "TA+TR (gradient sign)"]
    assert set(table["reference vs exemplar"].dropna()) == {"TA+TR (exemplar)"}
    assert set(test[test["ablation"] == "conflict-score"]["trust_region"]) == set(modes)

    # zero-shot proxies: the gap closed is (proxy − zero-shot)/(exemplar − zero-shot) of the store's averages,
    # the exemplar row's over its draws, the data-free rows' once
    table = pd.read_csv(out / "tables" / "ablation_zero_shot_proxy.csv", index_col=0)
    prox = test[test["ablation"] == "zero-shot-proxy"]
    avg = _averages(prox)
    mode_of = prox.drop_duplicates("run_id").set_index("run_id")["trust_region"]
    level = {m: avg[mode_of.index[mode_of == m]].mean() for m in proxies}
    assert table.at["TA+TR", GAP] == "0 (reference)" and table.at["TA+TR (exemplar)", GAP] == "1 (reference)"
    for mode, label in (("zero-shot-per-tensor", "TA+TR (zero-shot, per tensor)"),
                        ("zero-shot-theta0", "TA+TR (zero-shot, pretrained-weighted)")):  # fmt: skip
        gap = level["exemplar"] - level["zero-shot"]
        text = str(table.at[label, GAP])
        if gap == 0:
            assert text == "–"
        else:
            assert float(text.split(" ")[0]) == pytest.approx((level[mode] - level["zero-shot"]) / gap, abs=0.006)
    for stem in KINDS:
        assert (out / "figures" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{stem}.png" in (out / "index.html").read_text()


def test_gap_interval_matches_a_literal_index_bootstrap() -> None:
    """The joint multinomial of `gap_bootstrap` is the index bootstrap's distribution: its point value is the
    literal ratio, and its interval agrees with resampling example indices per task (two seeds: the seeds
    first, with replacement) up to Monte-Carlo error."""
    rng = np.random.default_rng(3)
    seeds, tasks, size = 2, 3, 120
    strata = [np.repeat(np.arange(tasks), size) for _ in range(seeds)]
    z = [rng.random(tasks * size) < 0.55 for _ in range(seeds)]
    e = [zs | (rng.random(tasks * size) < 0.5) for zs in z]  # exemplar well above zero-shot: a stable ratio
    p = [np.where(rng.random(tasks * size) < 0.5, es, zs) for es, zs in zip(e, z, strict=True)]

    task_of = strata[0]  # every seed (and every resample below) lists the tasks' examples in this order

    def ratio(ps: list, zs: list, es: list) -> float:
        mean = [np.mean([[np.mean(x[task_of == t]) for t in range(tasks)] for x in row]) for row in (ps, zs, es)]
        return (mean[0] - mean[1]) / (mean[2] - mean[1])

    gap, low, high = gap_bootstrap(p, z, e, strata)
    assert gap == pytest.approx(ratio(p, z, e), abs=1e-12)
    literal = []
    for _ in range(3000):
        picks = rng.integers(0, seeds, seeds)
        rows = ([], [], [])
        for s in picks:
            idx = np.concatenate([rng.choice(np.flatnonzero(strata[s] == t), size) for t in range(tasks)])
            for k, x in enumerate((p, z, e)):
                rows[k].append(x[s][idx])
        literal.append(ratio(*rows))
    want_low, want_high = np.percentile(literal, [2.5, 97.5])
    assert low == pytest.approx(want_low, abs=0.05) and high == pytest.approx(want_high, abs=0.05)
    assert low < gap < high
