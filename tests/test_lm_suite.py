"""The causal-LM suite (`benchmark: lm`) on a tiny random Llama with tied embeddings and a real BPE tokenizer, made
here: its build (checkpoints with Hugging Face names, the tied head once), the same bytes for any number of
build workers, the answer-token loss against transformers' own `labels` loss, the exemplar gradients against
a per-example autograd loop written here, evaluation through the scorer and its cache, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from tatr.core.errors import TatrError
from tatr.suites import get_suite
from tatr.suites.causal_lm.scoring import score
from tatr.suites.causal_lm.training import answer_loss, encode_examples
from tests.lm_fixtures import tiny_llama, tiny_tokenizer
from tests.text_fixtures import make_tasks

TINY = {
    "max_chars": 60,
    "max_length": 120,
    "n_train": 12,
    "n_val": 3,
    "n_test": 5,
    "finetune_steps": 4,
    "finetune_batch": 4,
    "finetune_lr": 1e-3,
    "progress": False,
}


def _model_folder(folder: Path) -> Path:
    tok = tiny_tokenizer(bos=True)
    model = tiny_llama(len(tok), seed=5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm")
    return _model_folder(root / "llama"), make_tasks(root / "tasks", per_class=20)


@pytest.fixture(scope="module")
def tiny_lm(inputs, tmp_path_factory: pytest.TempPathFactory):
    model, tasks = inputs
    options = {"model": str(model), "tasks": str(tasks), **TINY, "build_workers": 1}
    suite = get_suite("lm", options, tmp_path_factory.mktemp("cache"))
    _ = suite.folder
    return suite


def test_build_writes_hugging_face_checkpoints_with_the_tied_head_once(tiny_lm) -> None:
    assert tiny_lm.tasks == ("colors", "animals", "sizes")
    ckpts = tiny_lm.checkpoints()
    theta0 = load_file(str(ckpts.pretrained))
    assert "model.embed_tokens.weight" in theta0 and "lm_head.weight" not in theta0
    for task in tiny_lm.tasks:
        theta_t = load_file(str(ckpts.finetuned[task]))
        assert theta_t.keys() == theta0.keys()
        key = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(theta_t[key], theta0[key])
    meta = json.loads((tiny_lm.folder / "meta.json").read_text())
    assert set(meta["accuracy"]["individual"]["test"]) == set(tiny_lm.tasks)
    assert meta["questions"]["colors"] == "What is this text about?"
    q = tiny_lm.questions("colors", "test")[0]
    assert q.context.endswith("\nQuestion: What is this text about?\nAnswer:") and q.choices == (
        "blue",
        "green",
        "red",
        "yellow",
    )


def test_parallel_workers_build_the_same_bytes(inputs, tiny_lm, tmp_path: Path) -> None:
    model, tasks = inputs
    options = {"model": str(model), "tasks": str(tasks), **TINY, "build_workers": 2}
    parallel = get_suite("lm", options, tmp_path)
    assert parallel.key == tiny_lm.key
    log = json.loads((parallel.folder / "build_log.json").read_text())
    assert log["workers"] == 2
    for name in ["pretrained.safetensors", *(f"finetuned/{t}.safetensors" for t in tiny_lm.tasks)]:
        assert (parallel.folder / name).read_bytes() == (tiny_lm.folder / name).read_bytes(), name
    meta = [json.loads((suite.folder / "meta.json").read_text()) for suite in (parallel, tiny_lm)]
    assert meta[0] == meta[1]


def test_answer_loss_is_transformers_labels_loss(tiny_lm) -> None:
    model = tiny_lm.encoder()
    tokenizer = tiny_lm._model_and_tokenizer()[1]
    qs = tiny_lm.questions("animals", "train")[:3]
    examples = encode_examples(tokenizer, qs, tiny_lm.spec.max_length)
    width = max(len(t) for t, _ in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for row, (tokens, n) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, len(tokens) - n : len(tokens)] = torch.tensor(tokens[-n:])  # the answer's tokens only
    reference = model(input_ids=ids, labels=labels).loss  # transformers shifts and averages over them
    torch.testing.assert_close(answer_loss(model, examples), reference, rtol=1e-5, atol=1e-6)


def test_exemplar_gradients_equal_a_per_example_autograd_loop(tiny_lm) -> None:
    grads = tiny_lm.exemplar_gradients(n=4, seed=1, squared=True)
    model = tiny_lm.encoder()
    tokenizer = tiny_lm._model_and_tokenizer()[1]
    exemplars = tiny_lm.exemplar_loader("sizes", 4, 1)[0]
    params = dict(model.named_parameters())
    abs_sum = {k: torch.zeros_like(v) for k, v in params.items()}
    sq_sum = {k: torch.zeros_like(v) for k, v in params.items()}
    for q in exemplars:  # the loss written out: −mean log p(answer tokens | prompt), full forward pass
        head = tokenizer.encode(q.context)
        whole = tokenizer.encode(q.context + " " + q.choices[q.gold])
        tail = whole[len(head) :]
        tokens = torch.tensor([head + tail])
        logp = torch.log_softmax(model(input_ids=tokens[:, :-1]).logits[0], -1)
        n = len(tail)
        picked = logp[-n:].gather(1, tokens[0, -n:, None])
        loss = -picked.mean()
        for (k, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            abs_sum[k] += g.abs()
            sq_sum[k] += g.square()
    ours = load_file(str(grads.abs_mean["sizes"]))
    squares = load_file(str(grads.sq_mean["sizes"]))
    assert set(ours) == set(load_file(str(tiny_lm.checkpoints().pretrained)))
    for k, v in ours.items():
        torch.testing.assert_close(v, abs_sum[k] / 4, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(squares[k], sq_sum[k] / 4, rtol=1e-4, atol=1e-9)


def test_balanced_exemplars_take_the_classes_in_turn(tiny_lm) -> None:
    golds = [q.gold for q in tiny_lm.exemplar_loader("colors", 8, 3, selection="balanced")[0]]
    assert sorted(golds) == [0, 0, 1, 1, 2, 2, 3, 3]
    random = tiny_lm.exemplar_loader("colors", 8, 3)[0]
    assert random == tiny_lm.exemplar_loader("colors", 8, 3)[0]  # seeded
    balanced = tiny_lm.exemplar_gradients(2, 3, selection="balanced").abs_mean["colors"]
    assert balanced != tiny_lm.exemplar_gradients(2, 3).abs_mean["colors"]  # its own exemplars, its own cache


def test_evaluation_scores_the_questions_and_caches_by_the_models_bytes(tiny_lm, monkeypatch) -> None:
    theta_t = load_file(str(tiny_lm.checkpoints().finetuned["colors"]))
    preds = tiny_lm.evaluate_predictions(theta_t, "test", ("colors",))["colors"]
    model = tiny_lm.encoder(theta_t)
    direct = score(model, tiny_lm._model_and_tokenizer()[1], tiny_lm.questions("colors", "test"), share_context=True)
    assert preds.correct.tolist() == direct.correct_norm and preds.predicted.tolist() == direct.predicted_norm
    meta = json.loads((tiny_lm.folder / "meta.json").read_text())
    assert preds.accuracy == pytest.approx(meta["accuracy"]["individual"]["test"]["colors"])

    def fail(*args, **kwargs):
        raise AssertionError("scored again: the cache was not read")

    monkeypatch.setattr("tatr.suites.causal_lm.suite.score", fail)
    again = tiny_lm.evaluate_predictions(theta_t, "test", ("colors",))["colors"]
    assert again.correct.tolist() == preds.correct.tolist()


def test_refusals_are_one_line(tiny_lm, inputs, tmp_path: Path) -> None:
    refused = (lambda: tiny_lm.head("colors"), tiny_lm.logit_scale, lambda: tiny_lm.unlabeled_loader("colors", "test"))
    for call in refused:
        with pytest.raises(TatrError, match="without a classification head") as err:
            call()
        assert "\n" not in str(err.value)
    model, tasks = inputs
    with pytest.raises(TatrError, match=r"did you mean 'suite\.n_test'"):
        get_suite("lm", {"model": str(model), "tasks": str(tasks), "n_tset": 3}, tmp_path)
    with pytest.raises(TatrError, match="neither 'smollm2'"):
        get_suite("lm", {"model": str(tmp_path), "tasks": str(tasks)}, tmp_path)
    with pytest.raises(TatrError, match="tatr prepare-lm"):
        get_suite("lm", {"tasks": str(tasks)}, tmp_path)


def test_a_trust_region_ablation_runs_on_the_suite_and_its_test_rows_are_a_plain_merge(
    inputs, tiny_lm, tmp_path: Path, monkeypatch
) -> None:
    """The run path end to end (plan → tune on validation → test once → store) on the causal LM, exemplar
    gradients included; the stored test accuracy is what `merge` + `evaluate` give independently."""
    import yaml

    from tatr.core.one_shot import merge
    from tatr.runs import ablation_spec, ablations
    from tatr.store.rows import read_store

    monkeypatch.setenv("TATR_CACHE", str(tiny_lm.cache_root))  # the fixture's build, not a new one
    model, tasks = inputs
    body = {
        "name": "lm-tiny",
        "benchmark": "lm",
        "suite": {"model": str(model), "tasks": str(tasks), **TINY, "build_workers": 1},
        "merge": {"method": "ta"},
        "exemplars": {"n": 4},
        "ablation": {
            "kind": "trust-region",
            "baselines": True,  # θ_0's row: the suite's own scoring, since it has no heads
            "seeds": [0],
            "lam": [0.3, 1.0],
            "q": [0.9],
            "variants": [{"trust_region": "off"}, {"trust_region": "exemplar"}],
        },
    }
    path = tmp_path / "lm-tiny.yaml"
    path.write_text(yaml.safe_dump(body))
    config, spec = ablation_spec.load_ablation(path)
    ablations.run(config, spec, tmp_path / "results", log=lambda *_: None, wandb=False)
    store = read_store(tmp_path / "results")
    test = store[(store["split"] == "test") & (store["trust_region"] == "exemplar")]
    assert set(test["task"]) == set(tiny_lm.tasks) and set(test["benchmark"]) == {"lm"}
    [lam] = test["lam"].unique().tolist()
    ckpts = tiny_lm.checkpoints()
    grads = tiny_lm.exemplar_gradients(4, 0)
    merged = merge(
        ckpts.pretrained,
        [ckpts.finetuned[t] for t in tiny_lm.tasks],
        gradients=[grads.abs_mean[t] for t in tiny_lm.tasks],
        trust_region="exemplar",
        q=0.9,
        lam=lam,
    )
    expected = tiny_lm.evaluate(merged, "test")
    assert dict(zip(test["task"], test["accuracy"], strict=True)) == pytest.approx(expected)
    meta = json.loads((tiny_lm.folder / "meta.json").read_text())
    pretrained = store[(store["job_type"] == "baseline") & (store["method"] == "pretrained")]
    assert dict(zip(pretrained["task"], pretrained["accuracy"], strict=True)) == pytest.approx(
        meta["accuracy"]["pretrained"][spec.eval_split]
    )


def _lm_eval_task(folder: Path, name: str, words: tuple[str, ...], seed: int) -> None:
    """A local multiple-choice lm-eval task with train, validation and test documents (JSONL)."""
    import random

    rng = random.Random(seed)
    for split, n in (("train", 24), ("validation", 8), ("test", 10)):
        rows = []
        for i in range(n):
            gold = rng.randrange(len(words))
            filler = " ".join(rng.choice(["the", "a", "sat", "on", "mat"]) for _ in range(rng.randint(2, 5)))
            rows.append({"q": f"{filler} {words[gold]} {i}?", "choices": list(words), "gold": gold})
        (folder / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = "".join(f"    {s}: {folder / f'{name}_{s}.jsonl'}\n" for s in ("train", "validation", "test"))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{files}"
        "training_split: train\nvalidation_split: validation\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_named_lm_eval_tasks_build_and_score_their_test_documents_through_lm_eval(inputs, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is the [lm] extra")
    model, _ = inputs
    include = tmp_path / "lm_eval_tasks"
    include.mkdir()
    _lm_eval_task(include, "tiny_colors", ("red", "green", "blue"), 1)
    _lm_eval_task(include, "tiny_pets", ("cat", "dog"), 2)
    options = {**TINY, "n_train": 4, "n_val": 2, "n_test": 3, "build_workers": 1}
    suite = get_suite(
        "lm",
        {"model": str(model), "tasks": "lm-eval:tiny_colors,tiny_pets", "lm_eval_include": str(include), **options},
        tmp_path / "cache",
    )
    assert suite.tasks == ("tiny_colors", "tiny_pets")
    colors = suite.questions("tiny_colors", "test")
    assert len(colors) == 9 and colors[0].context.startswith("Q: ") and colors[0].choices == ("red", "green", "blue")
    assert len(suite.questions("tiny_pets", "train")) == 8 and len(suite.questions("tiny_pets", "validation")) == 4
    theta_t = load_file(str(suite.checkpoints().finetuned["tiny_colors"]))
    through_lm_eval = suite.evaluate_predictions(theta_t, "test", ("tiny_colors",))["tiny_colors"]
    ours = score(suite.encoder(theta_t), suite._model_and_tokenizer()[1], colors, share_context=True)
    assert through_lm_eval.correct.tolist() == ours.correct_norm
    assert through_lm_eval.predicted.tolist() == ours.predicted_norm
    with pytest.raises(TatrError, match="lm-eval knows no task 'tiny_nope'"):
        get_suite("lm", {"model": str(model), "tasks": "lm-eval:tiny_nope", "lm_eval_include": str(include)}, tmp_path)
