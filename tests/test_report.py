"""`tatr report` on synthetic stores: every output exists, the numbers are pandas', bad stores fail clearly."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tatr.cli import main
from tatr.core.errors import TatrError
from tatr.report import build as report
from tatr.store.rows import append_rows, read_store
from tests.report_fixtures import BENCHMARK, TASKS, _run, make_store

TABLES = (
    "main",
    "ablation_components",
    "ablation_trust_region",
    "ablation_sensitivity",
    "ablation_mask_ratio",
    "ablation_exemplar_count",
    "ablation_plugin",
    "ablation_gradient_correlation",
)
FIGURES = (
    "methods_per_task",
    "methods_per_task_all",
    "sweep_heatmap",
    "components",
    "trust_region",
    "sensitivity",
    "mask_ratio",
    "exemplar_count",
    "plugin",
    "gradient_correlation",
)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic store with every kind of row, and its report (built once for the module)."""
    root = make_store(tmp_path_factory.mktemp("store"))
    report.generate(root, published=None)
    return root


def read_table(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / BENCHMARK / "tables" / f"{name}.csv", index_col=0)


def latest_per_seed(rows: pd.DataFrame) -> pd.DataFrame:
    """Independent of tatr.report.tables: the last-written run for each seed."""
    rows = rows.assign(seed=rows["seed"].fillna(-1))
    last = rows.sort_values("timestamp").groupby("seed")["run_id"].last()
    return rows[rows["run_id"].isin(last)]


def expected_row(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Mean and std over seeds of per-task accuracy, task average and normalized average."""
    rows = latest_per_seed(rows)
    wide = rows.pivot_table(index="seed", columns="task", values="accuracy")[list(TASKS)]
    wide["Average"] = wide.mean(axis=1)
    wide["Normalized"] = rows.groupby("seed")["normalized_accuracy"].mean()
    return wide.mean(), wide.std()


def test_every_table_and_figure_is_written(full: Path) -> None:
    folder = full / BENCHMARK
    for name in TABLES:
        for ext in ("md", "tex", "csv"):
            assert (folder / "tables" / f"{name}.{ext}").stat().st_size > 0, (name, ext)
        assert "\\toprule" in (folder / "tables" / f"{name}.tex").read_text()
    for name in FIGURES:
        png, pdf = folder / "figures" / f"{name}.png", folder / "figures" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000, name
        assert pdf.read_bytes()[:5] == b"%PDF-", name
    page = (folder / "index.html").read_text()
    for name in FIGURES:
        assert f"figures/{name}.png" in page
    assert page.count("<table") == len(TABLES)
    # no temporaries left
    assert sorted(p.name for p in folder.iterdir()) == sorted(report.REPORT_OUTPUTS)


def test_main_table_equals_pandas(full: Path) -> None:
    store = read_store(full)
    test = store[store["split"] == "test"]
    got = read_table(full, "main")
    assert list(got.index) == [
        "Pretrained",
        "Individual",
        "TA",
        "TA+TR",
        "TA+TR (exemplar)",
        "TIES (dis-sum)",
        "TIES (dis-sum)+TR",
    ]
    finals = test[test["job_type"] == "final"]
    cases = {
        "TA": finals[finals["trust_region"] == "off"],
        "TA+TR": finals[finals["trust_region"] == "zero-shot"],
        "Pretrained": test[test["method"] == "pretrained"],
    }
    for label, rows in cases.items():
        mean, std = expected_row(rows)
        for col in [*TASKS, "Average", "Normalized"]:
            assert got.at[label, col] == pytest.approx(mean[col], abs=1e-5), (label, col)
            if label != "Pretrained":
                assert got.at[label, f"{col}_std"] == pytest.approx(std[col], abs=1e-5), (label, col)
    assert got.at["TA", "seeds"] == 3 and got.at["Pretrained", "seeds"] == 1
    # TIES comes from the plug-in ablation (no sweep final for it)
    plugin = test[(test["ablation"] == "plugin") & (test["method"] == "ties-sum") & (test["trust_region"] == "off")]
    assert got.at["TIES (dis-sum)", "Average"] == pytest.approx(plugin["accuracy"].mean(), abs=1e-5)
    # TA+TR with exemplars comes from the trust-region ablation, over its 3 seeds
    tr = test[(test["ablation"] == "trust-region") & (test["trust_region"] == "exemplar")]
    mean, std = expected_row(tr)
    assert got.at["TA+TR (exemplar)", "Average"] == pytest.approx(mean["Average"], abs=1e-5)
    assert got.at["TA+TR (exemplar)", "Average_std"] == pytest.approx(std["Average"], abs=1e-5)
    assert "trust-region ablation: TA+TR (exemplar)" in (full / BENCHMARK / "tables" / "main.md").read_text()


def test_rerun_replaces_the_earlier_run(full: Path) -> None:
    store = read_store(full)
    ta0 = store[(store["job_type"] == "final") & (store["trust_region"] == "off") & (store["seed"] == 0)]
    first, rerun = sorted(ta0["run_id"].unique())
    digits = {
        r: float(ta0[(ta0["run_id"] == r) & (ta0["task"] == "digits")]["accuracy"].iloc[0]) for r in (first, rerun)
    }
    assert digits[first] != digits[rerun]
    ta = store[(store["job_type"] == "final") & (store["trust_region"] == "off") & (store["task"] == "digits")]
    others = ta[ta["seed"] != 0]["accuracy"].tolist()
    got = read_table(full, "main").at["TA", "digits"]
    assert got == pytest.approx(np.mean([digits[rerun], *others]), abs=1e-5)


def test_ablation_tables_equal_pandas(full: Path) -> None:
    store = read_store(full)
    abl = store[(store["job_type"] == "ablation") & (store["split"] == "test")]
    comp = read_table(full, "ablation_components")
    assert list(comp.index) == ["positive", "negative", "orthogonal", "all"]
    positive = abl[(abl["ablation"] == "components") & abl["components"].map(lambda c: c == ["positive"])]
    mean, std = expected_row(positive)
    assert comp.at["positive", "Average"] == pytest.approx(mean["Average"], abs=1e-5)
    assert comp.at["positive", "Average_std"] == pytest.approx(std["Average"], abs=1e-5)

    mask = read_table(full, "ablation_mask_ratio")
    point = abl[(abl["ablation"] == "mask-ratio") & (abl["method"] == "ties-sum") & np.isclose(abl["q"], 0.99)]
    assert mask.at["1%", "TIES (dis-sum)+TR"] == pytest.approx(point["accuracy"].mean(), abs=1e-5)
    assert "0%" in mask.index  # q = 1: the trust region drops nothing

    count = read_table(full, "ablation_exemplar_count")
    at16 = abl[(abl["ablation"] == "exemplar-count") & (abl["exemplars"] == 16)]
    per_seed = at16.groupby("seed")["accuracy"].mean()
    assert count.at[16, "TA+TR (exemplar)"] == pytest.approx(per_seed.mean(), abs=1e-5)
    assert count.at[16, "TA+TR (exemplar)_std"] == pytest.approx(per_seed.std(), abs=1e-5)

    corr = read_table(full, "ablation_gradient_correlation")
    pair = store[(store["ablation"] == "gradient-correlation") & (store["task"] == "shapes|signs")]
    assert corr.at["signs", "shapes"] == corr.at["shapes", "signs"] == pytest.approx(pair["accuracy"].mean(), abs=1e-5)
    assert corr.at["digits", "digits"] == 1.0


def test_markdown_and_latex_show_mean_and_std(full: Path) -> None:
    got = read_table(full, "main")
    md = (full / BENCHMARK / "tables" / "main.md").read_text()
    tex = (full / BENCHMARK / "tables" / "main.tex").read_text()
    m, s = got.at["TA", "Average"], got.at["TA", "Average_std"]
    assert f"{m:.1f} ± {s:.1f}" in md
    assert f"{m:.1f} $\\pm$ {s:.1f}" in tex
    assert f"| Pretrained | {got.at['Pretrained', 'digits']:.1f} |" in md  # one seed: no ±


def test_same_store_gives_identical_files(full: Path, tmp_path: Path) -> None:
    report.generate(full, out=tmp_path, published=None)

    def digests(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    assert digests(tmp_path / BENCHMARK) == digests(full / BENCHMARK)


def test_empty_store_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TatrError, match="no results in"):
        report.generate(tmp_path)
    assert main(["report", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tatr: error: no results in") and "\n" not in err
    assert not (tmp_path / BENCHMARK).exists()


def test_unknown_benchmark_names_the_known_ones(tmp_path: Path) -> None:
    make_store(tmp_path, parts=("final",))
    with pytest.raises(TatrError, match=r"no rows for benchmark 'clip8' .*it has: synthetic"):
        report.generate(tmp_path, benchmarks=["clip8"])


def test_partial_store_reports_what_it_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(tmp_path, parts=("final", "mask-ratio"))
    assert main(["report", "--root", str(tmp_path), "--published", str(tmp_path / "none.csv")]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / BENCHMARK
    assert sorted(p.stem for p in (folder / "tables").glob("*.csv")) == ["ablation_mask_ratio", "main"]
    assert sorted(p.stem for p in (folder / "figures").glob("*.png")) == [
        "mask_ratio",
        "methods_per_task",
        "methods_per_task_all",
    ]
    assert "skipped" in out and "experiments/ablations/components.yaml" in out
    page = (folder / "index.html").read_text()
    assert "Not available" in page and "tatr ablate experiments/ablations/plugin.yaml" in page


def test_learned_lambda_is_shown_as_a_mean_to_three_decimals(tmp_path: Path) -> None:
    """AdaMerging's row carries the mean of its learned coefficients; a grid λ keeps all its digits."""
    make_store(tmp_path, parts=("plugin",))
    rng = np.random.default_rng(0)
    common = {"job_type": "ablation", "experiment": "ablation-plugin", "ablation": "plugin", "seed": 0}
    _run(tmp_path, rng, "ada", **common, method="adamerging-layer", trust_region="off", lam=0.270457, q=None)
    _run(tmp_path, rng, "grid", **common, method="dare", trust_region="off", lam=0.125, q=None)
    report.generate(tmp_path, published=None)
    md = (tmp_path / BENCHMARK / "tables" / "ablation_plugin.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| ")}
    assert rows["AdaMerging (layer-wise)"] == "0.270"
    assert rows["DARE"] == "0.125" and rows["TA"] == "0.3"
    assert "the mean of the learned coefficients" in md


def test_main_table_never_counts_a_seedless_reference_row_as_a_seed(tmp_path: Path) -> None:
    """A baselines file's seeded Pretrained rows, beside another file's seed-less one: the mean is the seeds'."""
    make_store(tmp_path, parts=("baseline",))  # seed-less Pretrained and Individual
    rng = np.random.default_rng(7)
    for seed in (0, 1, 2):
        _run(tmp_path, rng, f"pre-{seed}", job_type="baseline", method="pretrained", seed=seed)
    report.generate(tmp_path, published=None)
    store = read_store(tmp_path)
    pre = store[(store["method"] == "pretrained") & store["seed"].notna()]
    per_seed = pre.groupby("seed")["accuracy"].mean()
    got = read_table(tmp_path, "main")
    assert got.at["Pretrained", "Average"] == pytest.approx(per_seed.mean(), abs=1e-5)
    assert got.at["Pretrained", "Average_std"] == pytest.approx(per_seed.std(), abs=1e-5)
    individual = store[store["method"] == "individual"]  # seed-less only: still shown
    assert got.at["Individual", "Average"] == pytest.approx(individual["accuracy"].mean(), abs=1e-5)


def test_rows_without_accuracy_are_a_clear_error(tmp_path: Path) -> None:
    append_rows(tmp_path, [{"benchmark": BENCHMARK, "task": "digits", "split": "test"}], "broken")
    with pytest.raises(TatrError, match="no accuracy"):
        report.generate(tmp_path)


def test_a_second_report_replaces_the_first_and_keeps_other_files(tmp_path: Path) -> None:
    make_store(tmp_path, parts=("final", "components"))
    report.generate(tmp_path, published=None)
    (tmp_path / BENCHMARK / "baselines.md").write_text("someone else's file")
    shutil.rmtree(tmp_path / "store")
    make_store(tmp_path, parts=("final",))
    report.generate(tmp_path, published=None)
    assert not (tmp_path / BENCHMARK / "tables" / "ablation_components.csv").exists()
    assert (tmp_path / BENCHMARK / "baselines.md").read_text() == "someone else's file"


def test_reference_table_compares_averages(tmp_path: Path) -> None:
    make_store(tmp_path, parts=("final", "plugin"))
    published = tmp_path / "published.csv"
    published.write_text(
        "benchmark,model,method,task,accuracy,source\n"
        f"{BENCHMARK},ViT-B/32,Task Arithmetic,average,69.1,paper\n"
        f"{BENCHMARK},ViT-B/32,Task Arithmetic,digits,70.0,paper\n"
        f"{BENCHMARK},ViT-B/32,TATR,average,72.8,paper\n"
        "clip8,ViT-B/32,TATR,average,1.0,elsewhere\n"
    )
    report.generate(tmp_path, published=published)
    ref = read_table(tmp_path, "reference")
    main_table = read_table(tmp_path, "main")
    assert list(ref.index) == ["ViT-B/32 TA", "ViT-B/32 TA+TR"]
    assert ref.at["ViT-B/32 TA", "Published"] == 69.1
    assert ref.at["ViT-B/32 TA+TR", "Ours"] == pytest.approx(main_table.at["TA+TR", "Average"], abs=1e-5)
    assert ref.at["ViT-B/32 TA+TR", "Δ"] == pytest.approx(main_table.at["TA+TR", "Average"] - 72.8, abs=1e-5)


def test_reference_matches_models_and_never_mixes_them(tmp_path: Path) -> None:
    """The store's model (open_clip's 'ViT-B-32') matches the paper's 'ViT-B/32'; two models stay apart."""
    rng = np.random.default_rng(0)
    for model, shift in (("ViT-B-32", 0.0), ("ViT-L-14", 20.0)):
        for seed in (0, 1):
            common = {"benchmark": BENCHMARK, "model": model, "job_type": "final", "method": "ta"}
            rows = [
                {**common, "trust_region": "zero-shot", "seed": seed, "split": "test", "task": t,
                 "accuracy": float(rng.uniform(50, 70) + shift), "normalized_accuracy": 90.0, "timestamp": float(seed)}
                for t in TASKS
            ]  # fmt: skip
            append_rows(tmp_path, rows, f"{model}-{seed}")
    published = tmp_path / "published.csv"
    published.write_text(
        "benchmark,model,method,task,accuracy,source\n"
        f"{BENCHMARK},ViT-B/32,TATR,average,72.8,paper\n"
        f"{BENCHMARK},ViT-L/14,TATR,average,85.3,paper\n"
        f"{BENCHMARK},ViT-B/16,TATR,average,77.0,paper\n"
    )
    report.generate(tmp_path, published=published)
    main_table = read_table(tmp_path, "main")
    assert list(main_table.index) == ["TA+TR [ViT-B-32]", "TA+TR [ViT-L-14]"]
    store = read_store(tmp_path)
    for model in ("ViT-B-32", "ViT-L-14"):
        mine = store[store["model"] == model].groupby("seed")["accuracy"].mean().mean()
        assert main_table.at[f"TA+TR [{model}]", "Average"] == pytest.approx(mine, abs=1e-5)
    ref = read_table(tmp_path, "reference")
    assert list(ref.index) == ["ViT-B/32 TA+TR", "ViT-L/14 TA+TR"]  # no ViT-B/16 results here: not listed
    assert ref.at["ViT-L/14 TA+TR", "Ours"] == pytest.approx(main_table.at["TA+TR [ViT-L-14]", "Average"], abs=1e-5)
    assert ref.at["ViT-B/32 TA+TR", "Ours"] == pytest.approx(main_table.at["TA+TR [ViT-B-32]", "Average"], abs=1e-5)


def test_published_numbers_without_a_benchmark_are_the_papers(tmp_path: Path) -> None:
    make_store(tmp_path, parts=("final",))
    published = tmp_path / "published.csv"
    published.write_text("model,method,task,accuracy,source\nViT-B/32,TATR,average,72.8,paper\n")
    [done] = report.generate(tmp_path, published=published)
    assert "reference" not in done.tables  # a synthetic (or testbed) store is not compared to CLIP numbers


def test_malformed_published_csv_is_one_line(tmp_path: Path) -> None:
    """Issue 17 §5: a broken file the user points at is one line, not a silently missing reference table."""
    make_store(tmp_path, parts=("final",))
    published = tmp_path / "published.csv"
    published.write_bytes(b"\xff\xfe not a csv \x00")
    with pytest.raises(TatrError, match="published numbers are not a readable CSV"):
        report.generate(tmp_path, published=published)


class FakeFile:
    def __init__(self, content: str, path: str) -> None:
        self.content, self.path = content, path

    def download(self, root: str, replace: bool = False) -> None:
        target = Path(root) / self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.content)


class FakeRun:
    """What `wandb.Api().runs()` yields for a run logged by `tatr.runs.tracking`."""

    def __init__(self, run_id: str, rows: pd.DataFrame, table_file: bool) -> None:
        first = rows.iloc[0]
        value = lambda c: None if not isinstance(first[c], list) and pd.isna(first[c]) else first[c]  # noqa: E731
        self.id, self.group, self.job_type = run_id, value("study"), value("job_type")
        self.created_at = pd.Timestamp(rows["timestamp"].max(), unit="s").isoformat()
        self.commit = value("git_commit")
        self.config = {
            "name": "some-experiment-file",
            "experiment": value("experiment"),
            "ablation": {"kind": value("ablation")} if value("ablation") else None,
            "benchmark": value("benchmark"),
            "merge": {k: value(k) for k in ("method", "trust_region", "q", "lam", "ties_k", "components")},
            "exemplars": {"n": value("exemplars") or 32, "seed": value("seed")},
            "seed": value("seed"),
            "study": value("study"),
            "trial": value("trial"),
            "config_hash": value("config_hash"),
        }
        self.summary = {f"{r.split}/accuracy/{r.task}": r.accuracy for r in rows.itertuples()}
        self.files = {}
        if table_file:
            path = f"media/table/accuracy_table_0_{run_id}.table.json"
            data = [[r.task, r.split, r.accuracy, r.normalized_accuracy] for r in rows.itertuples()]
            content = json.dumps({"columns": ["task", "split", "accuracy", "normalized_accuracy"], "data": data})
            self.files[path] = FakeFile(content, path)
            self.summary["accuracy_table"] = {"_type": "table-file", "path": path}
        else:
            self.summary.update(
                {f"{r.split}/normalized_accuracy/{r.task}": r.normalized_accuracy for r in rows.itertuples()}
            )

    def file(self, path: str) -> FakeFile:
        return self.files[path]


class FakeApi:
    def __init__(self, runs: list[FakeRun]) -> None:
        self._runs = runs

    def runs(self, path: str) -> list[FakeRun]:
        assert path == "team/tatr"
        return self._runs


def test_from_wandb_rebuilds_the_same_tables(full: Path, tmp_path: Path) -> None:
    """Runs mirrored to W&B (normalized accuracy in the summary, or in the logged table) give the same tables."""
    store = read_store(full)
    runs = [FakeRun(run_id, rows, i % 2 == 1) for i, (run_id, rows) in enumerate(store.groupby("run_id", sort=True))]
    rows = report.rows_from_wandb("team/tatr", api=FakeApi(runs))
    assert len(rows) == len(store)
    report.generate(full, out=tmp_path, published=None, rows=rows, figures=False)
    assert not list((tmp_path / BENCHMARK / "figures").iterdir())
    for name in TABLES:
        a = (tmp_path / BENCHMARK / "tables" / f"{name}.csv").read_text()
        assert a == (full / BENCHMARK / "tables" / f"{name}.csv").read_text(), name


def test_from_wandb_bad_path_is_one_line() -> None:
    with pytest.raises(TatrError, match="ENTITY/PROJECT"):
        report.rows_from_wandb("just-a-project", api=FakeApi([]))
    with pytest.raises(TatrError, match="no runs with per-task accuracies"):
        report.rows_from_wandb("team/tatr", api=FakeApi([]))


# --- the page in a real browser ----------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  document.body.dataset.broken = bad.map(i => i.getAttribute('src')).join(',');
});</script></body>"""


def chromium(args: list[str], profile: Path) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def broken_images(folder: Path, profile: Path) -> tuple[int, list[str]]:
    """Load a copy of index.html (same folder, plus a probe script) and read what the probe saw."""
    probe = folder / "_probe.html"
    probe.write_text((folder / "index.html").read_text().replace("</body>", PROBE))
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], profile)
    probe.unlink()
    body = dom[dom.index("<body") : dom.index(">", dom.index("<body"))]
    count = int(body.split('data-images="')[1].split('"')[0])
    broken = body.split('data-broken="')[1].split('"')[0]
    return count, [b for b in broken.split(",") if b]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_index_html_renders_in_chromium(full: Path, tmp_path: Path) -> None:
    folder = tmp_path / BENCHMARK
    shutil.copytree(full / BENCHMARK, folder)
    shot = tmp_path / "screenshot.png"
    chromium(["--window-size=1200,3000", f"--screenshot={shot}", (folder / "index.html").as_uri()], tmp_path / "p1")
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (3000, 1200) and pixels.std() > 0.05  # a page, not a blank canvas

    count, broken = broken_images(folder, tmp_path / "p2")
    assert count == len(FIGURES) and broken == []
    (folder / "figures" / "mask_ratio.png").unlink()  # the probe must notice a missing image
    count, broken = broken_images(folder, tmp_path / "p3")
    assert broken == ["figures/mask_ratio.png"]


def test_sweep_heatmap_bins_continuous_samples() -> None:
    """Optuna samples λ and q continuously: the grid bins them and keeps the best trial per cell."""
    from tatr.report import figures, tables

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        lam, q = float(rng.uniform(0.05, 1.0)), float(1 - 10 ** rng.uniform(-4, -0.7))
        for task in TASKS:
            rows.append(
                {"run_id": f"t{i}", "study": "s", "job_type": "trial", "split": "validation", "task": task,
                 "lam": lam, "q": q, "accuracy": float(rng.uniform(40, 90)), "method": "ta",
                 "trust_region": "zero-shot", "timestamp": float(i)}
            )  # fmt: skip
    df = tables.prepare(pd.DataFrame(rows))
    grid, source = figures.sweep_grid(df)
    assert grid.shape[0] <= 10 and grid.shape[1] <= 10 and "binned" in source
    best = df.groupby("run_id")["accuracy"].mean().max()
    assert np.nanmax(grid.to_numpy()) == pytest.approx(best)
    assert figures.sweep_heatmap(df) is not None


def test_a_store_from_before_the_ablation_column_reports_the_same(full: Path, tmp_path: Path) -> None:
    """Older stores kept the ablation kind in `experiment` and had no `ablation` column: same tables."""
    store = read_store(full)
    kind = store["job_type"] == "ablation"
    legacy = store.assign(experiment=store["experiment"].where(~kind, store["ablation"])).drop(columns="ablation")
    assert set(legacy.loc[kind, "experiment"]) >= {"plugin", "trust-region", "components"}
    report.generate(full, out=tmp_path, published=None, rows=legacy, figures=False)
    for name in TABLES:
        a = (tmp_path / BENCHMARK / "tables" / f"{name}.csv").read_text()
        assert a == (full / BENCHMARK / "tables" / f"{name}.csv").read_text(), name


def test_every_ablation_kind_has_one_table_and_its_file_exists() -> None:
    from tatr.report import tables
    from tatr.store.schema import ABLATION_KINDS

    assert set(tables.ABLATION_TITLES) == set(ABLATION_KINDS)
    assert set(report.ABLATION_FILES) <= set(ABLATION_KINDS)
    repo = Path(__file__).resolve().parents[1]
    for kind, path in report.ABLATION_FILES.items():
        assert (repo / path).is_file(), (kind, path)
    empty = tables.prepare(pd.DataFrame({"run_id": [], "task": [], "split": [], "accuracy": []}))
    for kind in ABLATION_KINDS:
        table = tables.ablation_table(empty, kind)
        assert table.empty and table.name == f"ablation_{kind.replace('-', '_')}"


def test_labels_are_the_methods_and_modes_own() -> None:
    from tatr.core.methods import METHODS
    from tatr.core.trust_region import MODES, TR_MODES
    from tatr.report.labels import method_label, method_rank

    for method in METHODS.values():
        for mode in TR_MODES.values():
            assert method_label(method.name, mode.name) == method.label + mode.label
            assert method_label(method.name.upper(), mode.name) == method.label + mode.label
        assert method_label(method.name, float("nan")) == method.label
    assert method_label("ties", "zero-shot") == METHODS.get("ties-mean").label + "+TR"  # rows before the split
    assert method_label("pretrained") == method_label("zeroshot") == "Pretrained"
    assert method_label("fine-tuned") == "Individual"
    assert method_label("new-method", "new-mode") == "new-method+TR (new-mode)"  # unknown names shown as stored
    assert method_label(None) == "?"
    pairs = [(m, t) for m in ("ties-mean", "ta", "individual", "ties-sum", "average", "pretrained") for t in MODES]
    order = [method_label(*p) for p in sorted(pairs, key=lambda p: method_rank(*p))]
    assert order[:2] == ["Pretrained", "Pretrained+TR"] and order[len(MODES)] == "Individual"
    merges = list(dict.fromkeys(label.split("+", 1)[0] for label in order[2 * len(MODES) :]))
    assert merges == ["Averaging", "TA", "TIES (dis-sum)", "TIES (dis-mean)"]  # METHODS' registration order
    assert order[2 * len(MODES) : 3 * len(MODES)] == ["Averaging" + m.label for m in TR_MODES.values()]


def test_the_baselines_file_is_a_source_of_the_main_table_and_has_its_table(full: Path) -> None:
    """Rows of `tatr ablate experiments/baselines/...` (kind "baselines") rank with the baselines, before
    the plug-in ablation, and get a table of their own with the λ chosen on validation."""
    from tatr.report import tables

    store = read_store(full)
    plugin = store[(store["ablation"] == "plugin") & (store["method"] == "ties-sum") & (store["trust_region"] == "off")]
    assert not plugin.empty
    copy = plugin.assign(
        run_id=plugin["run_id"] + "-b",
        experiment="testbed-baselines",
        ablation="baselines",
        accuracy=plugin["accuracy"] + 1.0,
        lam=0.7,
    )
    rows = tables.prepare(pd.concat([store, copy], ignore_index=True))
    main = tables.main_table(rows)
    want = plugin[plugin["split"] == "test"]["accuracy"].mean() + 1.0
    assert main.mean.at["TIES (dis-sum)", "Average"] == pytest.approx(want, abs=1e-5)
    assert "baselines: Pretrained, Individual, TIES (dis-sum)" in main.note
    own = tables.ablation_table(rows, "baselines")
    assert list(own.mean.index) == ["TIES (dis-sum)"] and list(own.info["λ"]) == ["0.7"]
    assert own.mean.at["TIES (dis-sum)", "Average"] == pytest.approx(want, abs=1e-5)


def test_baselines_csv_is_the_long_form_of_the_baselines_rows(full: Path, tmp_path: Path) -> None:
    """`baselines.csv`: one line per (seed, row, task) of the baselines file's test rows and the reference
    models, each number the store's own (rounded to 3 places), the rows in the main table's order."""
    from tatr.report import tables
    from tatr.report.labels import method_label

    store = read_store(full)
    plugin = store[(store["ablation"] == "plugin") & (store["trust_region"] == "off")]
    copy = plugin.assign(run_id=plugin["run_id"] + "-b", experiment="testbed-baselines", ablation="baselines")
    rows = pd.concat([store, copy], ignore_index=True)
    report.generate(full, out=tmp_path, published=None, rows=rows, figures=False)
    long = pd.read_csv(tmp_path / BENCHMARK / "baselines.csv")
    assert tuple(long.columns) == tables.BASELINES_LONG
    tested = copy[copy["split"] == "test"]
    labels = {method_label(m, t) for m, t in zip(tested["method"], tested["trust_region"], strict=True)}
    assert set(long["row"]) == {"Pretrained", "Individual", *labels}
    assert list(dict.fromkeys(long["row"]))[:2] == ["Pretrained", "Individual"]
    for _, line in tested.iterrows():
        label = method_label(line["method"], line["trust_region"])
        got = long[(long["row"] == label) & (long["seed"] == line["seed"]) & (long["task"] == line["task"])]
        assert len(got) == 1 and got["test_accuracy"].iloc[0] == pytest.approx(line["accuracy"], abs=1e-3)
    assert len(long) == long.groupby(["seed", "row", "task"], dropna=False).ngroups
    # with seeded reference rows (a baselines file with suite seeds), the seed-less ones of other ablations go
    refs = store[store["job_type"] == "baseline"]
    seeded = pd.concat([refs.assign(run_id=refs["run_id"] + f"-s{s}", seed=s) for s in sorted(set(tested["seed"]))])
    report.generate(full, out=tmp_path, published=None, rows=pd.concat([rows, seeded]), figures=False)
    long = pd.read_csv(tmp_path / BENCHMARK / "baselines.csv")
    refs_long = long[long["row"].isin(["Pretrained", "Individual"])]
    assert refs_long["seed"].notna().all() and set(refs_long["seed"]) == set(tested["seed"])


def test_two_fisher_estimators_are_two_rows_not_a_rerun() -> None:
    """A non-default estimator is named in the label, so the latest run does not replace the other's row."""
    from tatr.report import tables

    rows = []
    for i, estimator in enumerate(["fusionbench", "per-sample", None]):
        for task in TASKS:
            rows.append(
                {"run_id": f"r{i}", "job_type": "evaluate", "split": "test", "task": task, "accuracy": 50.0 + i,
                 "method": "fisher", "trust_region": "off", "fisher_estimator": estimator, "timestamp": float(i)}
            )  # fmt: skip
    df = tables.prepare(pd.DataFrame(rows))
    assert df.drop_duplicates("run_id")["label"].tolist() == ["Fisher", "Fisher [per-sample Fisher]", "Fisher"]


def test_missing_ablation_hints_name_the_benchmarks_own_files() -> None:
    from tatr.report.build import ABLATION_FOLDERS, ablation_command

    repo = Path(__file__).resolve().parents[1]
    assert ablation_command("sensitivity", "testbed") == "tatr ablate experiments/ablations/sensitivity.yaml"
    assert (
        ablation_command("mask-ratio", "clip8") == "tatr ablate experiments/ablations/mask_ratio.yaml benchmark=clip8"
    )
    assert ablation_command("sensitivity", "text") == "tatr ablate experiments/text/sensitivity.yaml"
    assert ablation_command("sensitivity", "lm") == "tatr ablate experiments/lm/sensitivity.yaml"
    assert ablation_command("plugin", "lm") == "tatr ablate experiments/lm/plugin.yaml"
    assert ablation_command("mask-ratio", "lm") == "tatr ablate experiments/ablations/mask_ratio.yaml benchmark=lm"
    for benchmark, folder in ABLATION_FOLDERS.items():
        for kind in ("components", "trust-region", "sensitivity", "mask-ratio", "exemplar-count", "plugin"):
            command = ablation_command(kind, benchmark).split()
            assert (repo / command[2]).is_file(), (benchmark, kind, folder)
            assert command[3:] == ([] if command[2].startswith(folder) else [f"benchmark={benchmark}"])
