"""The embedded testbed at reduced size: determinism, the cache, the Suite interface, evaluation."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tatr.core.checkpoints import load_state_dict
from tatr.core.errors import TatrError
from tatr.core.one_shot import merge
from tatr.suites import get_suite
from tatr.suites import testbed as testbed_mod
from tatr.suites.base import BUILD_THREADS
from tatr.suites.testbed import build as tb
from tatr.suites.testbed import data

pytestmark = pytest.mark.slow
TINY = {"preset": "tiny", "progress": False}


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes except the build log (wall-clock timings) and the manifest that hashes it."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("build_log.json", "manifest.json")
    }


# --- data -------------------------------------------------------------------------------------
def test_eight_domains_with_their_own_label_spaces() -> None:
    assert len(data.TASKS) == 8
    assert len({data.CLASSES[t] for t in data.TASKS}) == 8
    for task in data.TASKS:
        x, y = data.icons(task)
        assert x.dtype == torch.uint8 and x.shape == (len(data.CLASSES[task]), 3, data.SIZE, data.SIZE)
        assert torch.equal(y, torch.arange(len(data.CLASSES[task])))
        # icons of different classes differ (a head built from them can separate the classes)
        assert len({bytes(img.numpy()) for img in x}) == len(x)
        if task != "digits":
            x1, y1 = data.generate(task, 64, seed=5)
            x2, y2 = data.generate(task, 64, seed=5)
            x3, _ = data.generate(task, 64, seed=6)
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
            assert x1.float().std() > 10  # not blank


def test_splits_are_disjoint() -> None:
    spec = testbed_mod.spec_from_options({"preset": "tiny", "tasks": ["digits", "shapes"]})
    pools = tb.build_data(spec)
    for task, split in pools.items():
        seen: dict[bytes, str] = {}
        for name in ("train", "validation", "test"):
            for img in split[f"x_{name}"]:
                key = bytes(img.numpy())
                assert seen.get(key, name) == name, task
                seen[key] = name
    batch = tb.pretrain_batch(spec, pools, step=0, per_task=64)
    for task, (x, _) in batch.items():
        held_out = {bytes(img.numpy()) for s in ("validation", "test") for img in pools[task][f"x_{s}"]}
        assert not held_out & {bytes(img.numpy()) for img in x}, task


# --- build, determinism and cache ----------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    """b runs its fine-tunes in two worker processes, a in this one: the same bytes (issue 21)."""
    spec = testbed_mod.spec_from_options({"preset": "tiny", "tasks": ["shapes", "flags"]})
    folders = [tmp_path / name for name in ("a", "b", "c")]
    specs = (spec, spec, tb.TestbedSpec(**{**spec.to_json(), "seed": 1}))
    for folder, s, workers in zip(folders, specs, (1, 2, 1), strict=True):
        folder.mkdir()
        tb.build(s, folder, workers=workers)
    assert json.loads((folders[1] / "build_log.json").read_text())["workers"] == 2
    a, b, c = (_files(f) for f in folders)
    assert a.keys() == b.keys() and a == b
    assert a["pretrained.safetensors"] != c["pretrained.safetensors"]


def test_built_bytes_do_not_depend_on_the_callers_thread_count(tmp_path: Path) -> None:
    """Without pinning, the icon heads (5–11-row matrix products) and the fine-tunes differ."""
    spec = testbed_mod.spec_from_options({"preset": "tiny"})
    before = torch.get_num_threads()
    digests = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            folder = tmp_path / f"t{threads}"
            folder.mkdir()
            tb.build(spec, folder)
            assert torch.get_num_threads() == threads  # the caller's setting is restored
            assert json.loads((folder / "build_log.json").read_text())["threads"] == BUILD_THREADS == 1
            digests[threads] = {k: hashlib.sha256(v).hexdigest() for k, v in _files(folder).items()}
    finally:
        torch.set_num_threads(before)
    assert "heads.safetensors" in digests[1] and len(digests[1]) == 11
    assert digests[1] == digests[2]


def test_cache_hit_miss_and_corruption(tiny_testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    shutil.copytree(tiny_testbed.cache_root / "testbed", root / "testbed")
    builds: list[Path] = []
    real_build = tb.build

    def counting_build(spec, folder, progress=False, log=None, workers=1):
        builds.append(folder)
        return real_build(spec, folder, progress, log, workers)

    monkeypatch.setattr(tb, "build", counting_build)

    hit = get_suite("testbed", TINY, root)
    assert hit.folder.name == tiny_testbed.folder.name and builds == []  # hit: nothing built
    original = _files(hit.folder)

    miss = get_suite("testbed", {**TINY, "seed": 7}, root)
    assert miss.folder != hit.folder and len(builds) == 1  # miss: another spec, another folder

    victim = hit.folder / "finetuned" / "shapes.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF  # flip one byte of a tensor
    victim.write_bytes(bytes(raw))
    rebuilt = get_suite("testbed", TINY, root)
    assert rebuilt.folder == hit.folder and len(builds) == 2  # detected, rebuilt in place
    assert _files(rebuilt.folder) == original

    (hit.folder / "heads.safetensors").unlink()  # a missing file is corruption too
    assert get_suite("testbed", TINY, root).folder == hit.folder and len(builds) == 3
    assert _files(hit.folder) == original


def test_unknown_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TatrError, match=r"did you mean 'suite\.width'"):
        get_suite("testbed", {"widht": 3}, tmp_path)
    with pytest.raises(TatrError, match="preset"):
        get_suite("testbed", {"preset": "huge"}, tmp_path)
    with pytest.raises(TatrError, match=r"suite\.tasks"):
        get_suite("testbed", {"tasks": ["digits", "mnist"]}, tmp_path)
    with pytest.raises(TatrError, match="did you mean 'testbed'"):
        get_suite("testbd", {}, tmp_path)


# --- the Suite interface ------------------------------------------------------------------------
def test_suite_interface(tiny_testbed) -> None:
    suite = tiny_testbed
    assert suite.tasks == ("digits", "shapes", "counts", "flags")
    ckpts = suite.checkpoints()
    pre = load_state_dict(ckpts.pretrained)
    assert set(ckpts.finetuned) == set(suite.tasks)
    for task in suite.tasks:
        ft = load_state_dict(ckpts.finetuned[task])
        assert ft.keys() == pre.keys()
        assert any(not torch.equal(ft[k], pre[k]) for k in pre)  # fine-tuning moved it
        head = suite.head(task)
        assert head.shape == (len(suite.classes(task)), suite.spec.embed_dim)
        torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(head)))
        x, y = next(iter(suite.loader(task, "validation", batch_size=16)))
        assert x.shape == (16, 3, data.SIZE, data.SIZE) and x.dtype == torch.float32 and y.dtype == torch.long
        assert sum(len(b[1]) for b in suite.loader(task, "test")) == suite.spec.n_test
        # the loaders hand out exactly the stored split, in order, normalised like the build
        stored = tb.load_split(suite.folder, task)
        xs, ys = zip(*suite.loader(task, "validation", batch_size=16), strict=True)
        assert torch.equal(torch.cat(ys), stored["y_validation"])
        assert torch.equal(torch.cat(xs), tb.preprocess(stored["x_validation"]))
        # a known input: θ_0 classifies each class's gray icon (the head row built from it) as that class
        icons, labels = data.icons(task)
        gray = icons.float().mean(1, keepdim=True).round().to(torch.uint8).expand_as(icons).contiguous()
        with torch.no_grad():
            feats = suite.encoder(None)(tb.preprocess(gray))
        assert torch.equal((torch.nn.functional.normalize(feats, dim=-1) @ head.T).argmax(-1), labels)
    # encoder(None) is θ_0; the encoder's parameters are exactly the checkpoint keys
    enc = suite.encoder()
    assert dict(enc.named_parameters()).keys() == pre.keys()
    with pytest.raises(TatrError, match="unknown split"):
        suite.loader("digits", "dev")
    with pytest.raises(TatrError, match="unknown testbed task"):
        suite.head("cars")


def test_exemplar_loader_is_seeded(tiny_testbed) -> None:
    a = torch.cat([x for x, _ in tiny_testbed.exemplar_loader("shapes", 10, seed=1)])
    b = torch.cat([x for x, _ in tiny_testbed.exemplar_loader("shapes", 10, seed=1)])
    c = torch.cat([x for x, _ in tiny_testbed.exemplar_loader("shapes", 10, seed=2)])
    assert a.shape[0] == 10 and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(TatrError, match=r"exemplars\.n"):
        tiny_testbed.exemplar_loader("shapes", 10_000, seed=1)


def test_exemplar_gradients_are_keyed_like_the_checkpoint(tiny_testbed) -> None:
    grads = tiny_testbed.exemplar_gradients(n=6, seed=0)
    pre = load_state_dict(tiny_testbed.checkpoints().pretrained)
    for task in tiny_testbed.tasks:
        s = load_state_dict(grads.abs_mean[task])
        g = load_state_dict(grads.signed_mean[task])
        assert s.keys() == g.keys() == pre.keys()
        assert all(torch.all(s[k] >= g[k].abs() - 1e-7) for k in s)
    assert tiny_testbed.exemplar_gradients(n=6, seed=0) == grads  # cached: same files


# --- evaluation ---------------------------------------------------------------------------------
def test_build_time_accuracies_match_the_evaluation_path(tiny_testbed) -> None:
    suite = tiny_testbed
    ckpts = suite.checkpoints()
    assert suite.evaluate(load_state_dict(ckpts.pretrained), "validation") == suite.pretrained_accuracy("validation")
    individual = suite.individual_accuracy("test")
    for task in suite.tasks:
        got = suite.evaluate(load_state_dict(ckpts.finetuned[task]), "test", (task,))
        assert got == {task: individual[task]}


def test_evaluation_of_a_merged_model(tiny_testbed) -> None:
    from tatr.suites.evaluation import evaluate_merged

    suite = tiny_testbed
    ckpts = suite.checkpoints()
    finetuned = [ckpts.finetuned[t] for t in suite.tasks]
    # λ = 0 is θ_0 exactly, whatever the trust region
    zero = merge(ckpts.pretrained, finetuned, method="ta", trust_region="zero-shot", q=0.9, lam=0.0)
    assert suite.evaluate(zero, "validation") == suite.pretrained_accuracy("validation")
    # a real merge: per-task accuracies in range, normalized by the individual accuracies
    merged = merge(ckpts.pretrained, finetuned, method="ta", trust_region="zero-shot", q=0.99, lam=0.3)
    seen: list[str] = []
    result = evaluate_merged(suite, merged, "validation", on_task=lambda t, a: seen.append(t))
    assert seen == list(suite.tasks)
    individual = suite.individual_accuracy("validation")
    for task, acc in result.accuracy.items():
        assert 0.0 <= acc <= 100.0
        assert result.normalized[task] == pytest.approx(100.0 * acc / individual[task])
    # and it is a different model from θ_0: some task's accuracy moved, or the weights did
    pre = load_state_dict(ckpts.pretrained)
    assert any(not torch.equal(merged[k], pre[k]) for k in pre)


def test_baselines_file_writes_the_table_rows(tiny_testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The baselines are an ablation file (`tatr ablate experiments/baselines/testbed.yaml`): every row of
    the table reaches the store, tuned on the grid it was given, θ_0 as the suite measures it."""
    from click.testing import CliRunner

    from tatr.cli import ablate
    from tatr.store.rows import read_store

    monkeypatch.setenv("TATR_CACHE", str(tiny_testbed.cache_root))
    root = tmp_path / "out"
    overrides = ["ablation.seeds=[0]", "ablation.lam=[0.3,1.0]", "ablation.q=[0.9,0.99]", "exemplars.n=4",
                 "suite.preset=tiny", "suite.progress=false"]  # fmt: skip
    path = Path(__file__).resolve().parents[1] / "experiments" / "baselines" / "testbed.yaml"
    result = CliRunner().invoke(ablate.command, [str(path), *overrides, "--root", str(root), "--no-wandb"])
    assert result.exit_code == 0, result.output
    store = read_store(root)
    test = store[store["split"] == "test"]
    labels = set(zip(test["method"], test["trust_region"].fillna("-"), strict=True))
    assert labels == {("pretrained", "-"), ("individual", "-"), ("ta", "off"), ("ta", "zero-shot"),
                      ("ta", "exemplar"), ("ties-sum", "off"), ("ties-sum", "zero-shot"), ("ties-mean", "off"),
                      ("ties-mean", "zero-shot")}  # fmt: skip
    assert len(test) == 9 * len(tiny_testbed.tasks)
    ta = test[(test["method"] == "ta") & (test["trust_region"] == "off")]
    assert set(ta["lam"]) <= {0.3, 1.0} and ta["q"].isna().all()
    pre = test[test["method"] == "pretrained"].set_index("task")["accuracy"].to_dict()
    assert pre == pytest.approx(tiny_testbed.pretrained_accuracy("test"), abs=1e-3)
    # every evaluation keeps its predictions, the Individual rows' too (each θ_t on its own task)
    from tatr.store.predictions import predictions_from_row

    own = test[test["method"] == "individual"]
    assert own["n_examples"].notna().all() and test["n_examples"].notna().all()
    for _, row in own.iterrows():
        p = predictions_from_row(row.to_dict())
        assert p is not None and p.accuracy == pytest.approx(row["accuracy"], abs=1e-9)
        assert row["accuracy"] == pytest.approx(tiny_testbed.individual_accuracy("test")[row["task"]], abs=1e-3)
