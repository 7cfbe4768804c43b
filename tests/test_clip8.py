"""The CLIP benchmark end to end on CPU, without downloads.

A randomly initialised open_clip ViT-B-32 is saved as the "pretrained" file and perturbed copies
of its image tower as the "fine-tuned" files, in two formats (a whole open_clip model, and a
task_vectors pickle converted with `tatr convert`); two tasks get tiny image folders in their real
layouts (EuroSAT's folders, MNIST's idx files). Accuracy is meaningless here;
what is checked is shapes, keys, determinism, caching, and that the merge changes the model
exactly where the trust-region mask allows.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from tatr.cli import main as cli_main
from tatr.core.checkpoints import header, load_state_dict, save_state_dict
from tatr.core.errors import TatrError
from tatr.core.gradients import gradient_stats_loop
from tatr.core.merging import plan_merge
from tatr.core.one_shot import merge
from tatr.suites import evaluation as ev
from tatr.suites import get_suite
from tatr.suites.clip8 import Clip8
from tests.clip_fixtures import (
    EUROSAT_FOLDERS,
    perturbed_visual,
    random_clip,
    random_clip_state,
    save_task_vectors_pickle,
    write_eurosat,
    write_mnist,
)

TASKS = ("EuroSAT", "MNIST")
UNTOUCHED = "visual.ln_pre.bias"  # no task changes it: must stay out of Ω and equal θ_0


@functools.lru_cache(maxsize=1)
def _base() -> dict[str, torch.Tensor]:
    return random_clip_state(copy=False)  # read-only


@functools.lru_cache(maxsize=2)
def _finetuned_state(seed: int) -> dict[str, torch.Tensor]:
    """θ_0 with every image-tower tensor but one moved by seeded noise (read-only: cached)."""
    state = perturbed_visual(_base(), seed=seed, scale=0.02)
    state[UNTOUCHED] = _base()[UNTOUCHED]
    return state


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Data folders, θ_0 and three fine-tuned files in three formats, plus suite options."""
    root = tmp_path_factory.mktemp("clip8")
    data = root / "data"
    write_eurosat(data, classes=EUROSAT_FOLDERS[:2], n_train=5, n_test=1)
    write_mnist(data, n_train=20, n_test=2)
    pretrained = root / "pretrained.safetensors"
    save_state_dict(_base(), pretrained)
    ft = root / "finetuned"
    ft.mkdir()
    # EuroSAT: a whole open_clip model (text tower unchanged) -> normalised to the image tower
    save_state_dict(_finetuned_state(1), ft / "EuroSAT.safetensors")
    # MNIST: a task_vectors pickle of a whole ImageEncoder, converted once with `tatr convert`
    clip = random_clip()
    clip.load_state_dict(_finetuned_state(2))
    save_task_vectors_pickle(ft / "MNIST.pt", clip)
    assert cli_main(["convert", str(ft / "MNIST.pt"), str(ft / "MNIST.safetensors"), "--model", "ViT-B-32"]) == 0
    options = {
        "model": "ViT-B-32",
        "pretrained": str(pretrained),
        "quick_gelu": True,
        "finetuned": str(ft / "{task}.safetensors"),
        "data_root": str(data),
        "tasks": list(TASKS),
        "batch_size": 4,
        "num_workers": 0,
        "device": "cpu",
        "gradient_chunk": 2,
        "progress": False,
    }
    return {"root": root, "data": data, "pretrained": pretrained, "ft": ft, "options": options, "cache": root / "cache"}


@pytest.fixture(scope="module")
def suite(bench: dict) -> Clip8:
    return get_suite("clip8", bench["options"], bench["cache"])


@pytest.fixture(scope="module")
def grads(suite: Clip8):
    return suite.exemplar_gradients(2, seed=0)


def _visual_keys() -> set[str]:
    return {k for k in _base() if k.startswith("visual.")}


def test_suite_hands_out_the_tasks_scale_and_splits(suite: Clip8, bench: dict):
    assert suite.tasks == TASKS
    assert suite.logit_scale() == pytest.approx(math.exp(_base()["logit_scale"].item()))
    # EuroSAT as task_vectors' EuroSAT/EuroSATVal: validation is the val folder, train all of train/
    sizes = {s: sum(len(y) for _, y in suite.loader("EuroSAT", s, batch_size=3)) for s in ("train", "validation")}
    assert sizes == {"train": 10, "validation": 2}
    x, y = next(iter(suite.loader("EuroSAT", "validation")))
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]
    val_images = sorted((bench["data"] / "EuroSAT_splits" / "val").rglob("*.jpg"))
    assert [p.name for p, _ in suite.task_data("EuroSAT").split("validation").samples] == [p.name for p in val_images]


def test_checkpoints_hold_only_the_image_tower(suite: Clip8, bench: dict):
    ckpt = suite.checkpoints()
    theta0 = load_state_dict(ckpt.pretrained)
    assert set(theta0) == _visual_keys()
    full = _base()
    assert all(torch.equal(theta0[k], full[k]) for k in theta0)
    assert list(ckpt.finetuned) == list(TASKS)
    assert ckpt.finetuned["MNIST"] == bench["ft"] / "MNIST.safetensors"  # in layout: used in place
    assert bench["cache"] in ckpt.finetuned["EuroSAT"].parents  # whole model: normalised into the cache
    for seed, task in enumerate(TASKS, start=1):
        sd = load_state_dict(ckpt.finetuned[task])
        assert set(sd) == _visual_keys(), task
        expected = _finetuned_state(seed)
        assert all(torch.equal(sd[k], expected[k]) for k in sd), task


def test_heads_are_normalised_cached_and_follow_the_templates(suite: Clip8, bench: dict):
    import open_clip

    from tatr.suites.clip8.templates import TEMPLATES

    assert suite.classes("EuroSAT") == ("annual crop land", "forest")
    assert suite.classes("MNIST") == tuple("0123456789")
    for task, n in (("EuroSAT", 2), ("MNIST", 10)):
        head = suite.head(task)
        assert head.shape == (n, 512) and head.dtype == torch.float32
        assert torch.allclose(head.norm(dim=-1), torch.ones(n), atol=1e-5)
    # the recipe: task_vectors' zero-shot classifier on the pretrained text tower
    clip = random_clip()
    expected = open_clip.build_zero_shot_classifier(
        clip, open_clip.get_tokenizer("ViT-B-32"), suite.classes("EuroSAT"), TEMPLATES["EuroSAT"]
    ).T
    assert torch.allclose(suite.head("EuroSAT"), expected, atol=1e-6)
    # a second suite reads the heads from the cache without loading the text tower
    again = get_suite("clip8", bench["options"], bench["cache"])
    assert torch.equal(again.head("MNIST"), suite.head("MNIST"))
    assert again._full_model is None


def test_loaders_split_like_task_vectors(suite: Clip8):
    data = suite.task_data("MNIST")
    train, val, test = (data.split(s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 2)  # 10% of 20 train images, official test
    assert sorted(train.indices + val.indices) == list(range(20))
    x, y = next(iter(suite.loader("EuroSAT", "test")))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert y.tolist() == [0, 1]
    x2, _ = next(iter(suite.loader("EuroSAT", "test")))
    assert torch.equal(x, x2)
    ex = [y for _, y in suite.exemplar_loader("MNIST", 5, seed=3)]
    assert sum(len(b) for b in ex) == 5
    with pytest.raises(TatrError, match=r"exemplars\.n must be between 1 and 18"):
        suite.exemplar_loader("MNIST", 19, seed=0)


def test_exemplar_gradients_match_the_per_sample_loop(suite: Clip8, grads, bench: dict):
    assert list(grads.abs_mean) == list(TASKS)
    for task in TASKS:
        abs_mean = load_state_dict(grads.abs_mean[task])
        assert set(abs_mean) == _visual_keys()
        assert all(torch.isfinite(v).all() for v in abs_mean.values())
    # the vectorised estimator agrees with one backward pass per exemplar (on the last layers,
    # so that the reference backward stays short; tests/test_gradients.py covers all layers)
    keys = ["visual.proj", "visual.ln_post.weight", "visual.transformer.resblocks.11.mlp.c_proj.weight"]
    batches = list(suite.exemplar_loader("EuroSAT", 2, seed=0))
    ref_abs, ref_signed = gradient_stats_loop(
        suite.encoder(None), suite.head("EuroSAT"), suite.logit_scale(), batches, names=keys
    )
    abs_mean = load_state_dict(grads.abs_mean["EuroSAT"])
    signed = load_state_dict(grads.signed_mean["EuroSAT"])
    for key in keys:
        assert torch.allclose(abs_mean[key], ref_abs[key], rtol=1e-3, atol=1e-7), key
        assert torch.allclose(signed[key], ref_signed[key], rtol=1e-3, atol=1e-7), key
    # cached: the same files come back, and a fresh cache recomputes the same numbers
    assert suite.exemplar_gradients(2, seed=0) == grads


def test_bf16_gradient_precision_has_its_own_encoder_and_cache_key(suite: Clip8):
    from tatr.suites.clip8.suite import _GradientView

    bf16, fp32 = _GradientView(suite, "bf16"), _GradientView(suite, "fp32")
    assert bf16.name != fp32.name  # the generic gradient cache keys on the name: no sharing
    encoder = bf16.encoder(None)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    x, _ = next(iter(suite.loader("EuroSAT", "test")))
    with torch.no_grad():
        low, full = encoder(x), fp32.encoder(None)(x)
    assert low.dtype == torch.float32 and low.device == x.device  # fp32 features back on the input's device
    assert torch.nn.functional.cosine_similarity(low, full).min() > 0.99


def test_merge_changes_the_model_exactly_where_the_mask_allows(suite: Clip8, grads):
    ckpt = suite.checkpoints()
    finetuned = [ckpt.finetuned[t] for t in TASKS]
    gradients = [grads.abs_mean[t] for t in TASKS]
    q, lam = 0.9, 0.3
    plan = plan_merge(ckpt.pretrained, finetuned, method="ta", trust_region="exemplar", gradients=gradients)
    merged = plan.merged(q, lam)
    theta0 = load_state_dict(ckpt.pretrained)
    assert set(merged) == set(theta0)
    assert UNTOUCHED not in plan.space.keys and set(plan.space.keys) == _visual_keys() - {UNTOUCHED}
    keep = plan.keep_mask(q)
    dropped = int((~keep).sum())
    assert dropped == math.ceil((1 - q) * plan.num_coordinates) > 0
    assert torch.equal(merged[UNTOUCHED], theta0[UNTOUCHED])
    tau_sum = {k: torch.zeros_like(theta0[k]) for k in plan.space.keys}
    for path in finetuned:
        sd = load_state_dict(path)
        for key in plan.space.keys:
            tau_sum[key] += sd[key] - theta0[key]
    moved_total = 0
    for i, key in enumerate(plan.space.keys):
        m = plan.space.view(keep, i)
        moved = merged[key] != theta0[key]
        assert not moved[~m].any(), key  # dropped coordinates stay at θ_0 exactly
        assert not moved[tau_sum[key] == 0].any(), key  # nothing moves where no task moved it
        assert torch.allclose(merged[key], theta0[key] + lam * m * tau_sum[key], atol=1e-6), key
        moved_total += int(moved.sum())
    # every kept coordinate moves, except where λ·Στ is below half an ulp of θ_0 (fp32 rounding)
    kept = plan.num_coordinates - dropped
    assert 0.999 * kept <= moved_total <= kept
    again = plan.merged(q, lam)
    assert all(torch.equal(again[k], merged[k]) for k in merged)  # deterministic
    del again, plan
    # features: merged ≠ θ_0, and the mask matters (≠ the unmasked task-arithmetic model)
    x, _ = next(iter(suite.loader("EuroSAT", "test")))
    with torch.no_grad():
        f0 = suite.encoder(None)(x)
        fm = suite.encoder(merged)(x)
        del merged
        unmasked = {k: theta0[k] + lam * tau_sum.pop(k) if k in tau_sum else theta0[k] for k in list(theta0)}
        fu = suite.encoder(unmasked)(x)
    assert fm.shape == (2, 512)
    assert not torch.allclose(fm, f0) and not torch.allclose(fm, fu)


def test_evaluate_reports_accuracy_and_normalized_accuracy(suite: Clip8, monkeypatch):
    ckpt = suite.checkpoints()
    merged = merge(ckpt.pretrained, [ckpt.finetuned[t] for t in TASKS], method="ta", trust_region="zero-shot", lam=0.3)
    seen = []
    acc = suite.evaluate(merged, "test", on_task=lambda t, a: seen.append(t))
    assert seen == list(TASKS) and set(acc) == set(TASKS)
    assert all(a in (0.0, 50.0, 100.0) for a in acc.values())  # k of 2 test images
    result = ev.evaluate_merged(suite, merged, "test")
    assert result.accuracy == acc  # a second evaluation gives the same numbers
    individual = suite.individual_accuracy("test")
    assert set(individual) == set(TASKS)
    for task in TASKS:
        expected = 100 * acc[task] / individual[task] if individual[task] > 0 else float("nan")
        assert result.normalized[task] == pytest.approx(expected, nan_ok=True)
    assert "average" in result.table()
    # individual accuracies are cached: no evaluation the second time
    monkeypatch.setattr(Clip8, "evaluate", lambda *a, **k: pytest.fail("individual accuracy was recomputed"))
    assert suite.individual_accuracy("test") == individual


def test_cli_evaluate_runs_on_the_clip_benchmark(suite: Clip8, bench: dict, tmp_path: Path, capsys):
    """`tatr evaluate` (and so sweeps and ablations) drive this suite through the config alone."""
    import json

    import yaml

    config = tmp_path / "clip.yaml"
    config.write_text(yaml.safe_dump({"name": "clip-test", "benchmark": "clip8", "suite": bench["options"]}))
    argv = ["evaluate", str(config), "split=test", "--model", "pretrained", "--json"]
    argv += ["--cache-dir", str(bench["cache"])]
    assert cli_main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["accuracy"] == suite.evaluate(None, "test")
    individual = suite.individual_accuracy("test")
    for task, acc in payload["accuracy"].items():
        assert payload["normalized_accuracy"][task] == pytest.approx(100 * acc / individual[task], nan_ok=True)


def test_text_tower_and_unchanged_keys_never_enter_omega(bench: dict, tmp_path: Path):
    """Whole CLIP files (text tower unchanged) merged directly: only changed image keys count."""
    full = _base()
    second = tmp_path / "ft2.safetensors"
    save_state_dict(_finetuned_state(2), second)
    files = [bench["ft"] / "EuroSAT.safetensors", second]  # both whole models, text tower = θ_0's
    plan = plan_merge(bench["pretrained"], files, method="ta", trust_region="zero-shot")
    expected_keys = _visual_keys() - {UNTOUCHED}
    assert set(plan.space.keys) == expected_keys
    n_visual = sum(math.prod(shape) for k, (shape, _) in header(bench["pretrained"]).items() if k in expected_keys)
    assert plan.num_coordinates == n_visual
    assert plan.drop_count(0.99) == math.ceil(0.01 * n_visual)
    merged = plan.merged(0.99, 0.3)
    assert set(merged) == set(full)
    for key, value in full.items():
        if not key.startswith("visual.") or key == UNTOUCHED:
            assert torch.equal(merged[key], value), key  # text tower, logit scale, ... untouched


# --- bad inputs --------------------------------------------------------------------------------


def _options(bench: dict, **changes) -> dict:
    return {**bench["options"], **changes}


def test_wrong_layout_and_missing_class_folders(bench: dict, tmp_path: Path):
    data = tmp_path / "data"
    (data / "eurosat" / "2750" / "Forest").mkdir(parents=True)  # torchvision's unsplit EuroSAT
    suite = get_suite("clip8", _options(bench, data_root=str(data), tasks=["EuroSAT"]), tmp_path / "c")
    with pytest.raises(TatrError, match=r"EuroSAT: expected the layout EuroSAT_splits/\{train,val,test\}/<class>/"):
        suite.head("EuroSAT")
    write_eurosat(data)
    import shutil

    shutil.rmtree(data / "EuroSAT_splits" / "test" / "Forest")
    suite = get_suite("clip8", _options(bench, data_root=str(data), tasks=["EuroSAT"]), tmp_path / "c")
    with pytest.raises(TatrError, match=r"class folder 'Forest' is missing from .*EuroSAT_splits/test"):
        suite.loader("EuroSAT", "test")


def test_checkpoint_of_another_architecture(bench: dict, tmp_path: Path):
    visual = {k: v for k, v in _finetuned_state(4).items() if k.startswith("visual.")}
    visual["visual.conv1.weight"] = torch.zeros(768, 3, 16, 16)  # ViT-B/16's patch embedding
    visual["visual.positional_embedding"] = torch.zeros(197, 768)
    save_state_dict(visual, tmp_path / "EuroSAT.safetensors")
    ft = {"EuroSAT": str(tmp_path / "EuroSAT.safetensors"), "MNIST": str(bench["ft"] / "MNIST.safetensors")}
    suite = get_suite("clip8", _options(bench, finetuned=ft, tasks=["EuroSAT", "MNIST"]), bench["cache"])
    with pytest.raises(TatrError, match=r"conv1.weight' has shape \(768, 3, 16, 16\) but ViT-B-32 expects"):
        suite.checkpoints()


def test_pickles_point_to_tatr_convert(bench: dict):
    ft = {"EuroSAT": str(bench["ft"] / "MNIST.pt"), "MNIST": str(bench["ft"] / "MNIST.safetensors")}
    suite = get_suite("clip8", _options(bench, finetuned=ft, tasks=["EuroSAT", "MNIST"]), bench["cache"])
    with pytest.raises(TatrError, match=r"pickled whole-module checkpoint .*tatr convert"):
        suite.checkpoints()


def test_missing_files_and_bad_options(bench: dict, tmp_path: Path, monkeypatch):
    missing = tmp_path / "nope.pt"
    suite = get_suite("clip8", _options(bench, pretrained=str(missing)), bench["cache"])
    with pytest.raises(TatrError, match=f"neither a pretrained tag of ViT-B-32 .* nor a file: looked for {missing}"):
        suite.checkpoints()
    suite = get_suite("clip8", _options(bench, finetuned=str(tmp_path / "{task}.pt")), bench["cache"])
    with pytest.raises(TatrError, match="fine-tuned checkpoint for EuroSAT not found"):
        suite.checkpoints()
    with pytest.raises(TatrError, match=r"suite.finetuned_pattern: Extra inputs are not permitted"):
        get_suite("clip8", _options(bench, finetuned_pattern="x"), bench["cache"])
    with pytest.raises(TatrError, match="unknown task 'Eurosat'; did you mean 'EuroSAT'"):
        get_suite("clip8", _options(bench, tasks=["Eurosat"]), bench["cache"])
    with pytest.raises(TatrError, match=r"data_root .* does not exist"):
        get_suite("clip8", _options(bench, data_root=str(tmp_path / "none")), bench["cache"])
    with pytest.raises(TatrError, match="unknown open_clip model 'ViT-B-31'"):
        get_suite("clip8", _options(bench, model="ViT-B-31"), bench["cache"]).checkpoints()
    # offline with an empty Hugging Face cache: a clear error naming where it looked, no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = get_suite("clip8", _options(bench, pretrained="openai", hf_cache_dir=str(tmp_path / "hf")), bench["cache"])
    with pytest.raises(TatrError, match=r"HF_HUB_OFFLINE is set .* ViT-B-32/openai .*looked for timm/"):
        suite.checkpoints()
