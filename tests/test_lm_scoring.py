"""tatr's multiple-choice scorer against lm-evaluation-harness itself, per example (issue 21).

A tiny random Llama and a byte-level BPE tokenizer trained here (nothing downloaded); a local JSONL task run
through `lm_eval.evaluator.evaluate` with one `HFLM` around the model in memory, its per-sample `acc` and
`acc_norm` against `tatr.suites.causal_lm.score`'s. The questions have contexts with and without trailing
spaces (lm-eval moves them into the continuation), choices of different lengths (acc_norm), and tokens that
span the context/continuation boundary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's json dataset: no DNS lookups
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the [lm] extra")
transformers = pytest.importorskip("transformers")

from tatr.suites.causal_lm import Question, encode_pair, score  # noqa: E402
from tests.lm_fixtures import WORDS, tiny_llama, tiny_tokenizer  # noqa: E402


def _questions(n: int = 24) -> list[Question]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        words = [
            WORDS[int(j)]
            for j in torch.randint(len(WORDS), (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        ]
        context = "Q: " + " ".join(words) + ("? A: " if i % 3 == 0 else "? A:")  # every third with a trailing space
        choices = ("cat", "dogs ran", "moonsun", "a")[: 2 + i % 3]
        out.append(Question(context, choices, int(torch.randint(len(choices), (1,), generator=g))))
    return out


def _lm_eval_samples(model, tok, questions: list[Question], folder: Path) -> list[dict]:
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = folder / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": i, "context": q.context, "choices": list(q.choices), "gold": q.gold}) + "\n"
            for i, q in enumerate(questions)
        )
    )
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=5, device="cpu")
    results = evaluator.evaluate(lm=lm, task_dict=manager.load(["tiny_mc"]), log_samples=True, bootstrap_iters=0)
    return sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc"]["id"])


@pytest.mark.parametrize("share_context", [False, True])
@pytest.mark.parametrize("bos", [False, True])
def test_scores_equal_lm_eval_per_example(bos: bool, share_context: bool, tmp_path: Path) -> None:
    """Both of tatr's paths: one full sequence per choice (lm-eval's), and the context once with its cache."""
    tok = tiny_tokenizer(bos)
    model = tiny_llama(len(tok))
    questions = _questions()
    ours = score(model, tok, questions, batch_size=3, share_context=share_context)
    samples = _lm_eval_samples(model, tok, questions, tmp_path)
    assert len(samples) == len(questions)
    assert (tok.encode("a")[0] == tok.bos_token_id) == bos  # the tokenizer's default decides the BOS
    for i, s in enumerate(samples):
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        assert ours.loglikelihoods[i] == pytest.approx(theirs, rel=1e-5, abs=1e-5), i
        assert (float(ours.correct[i]), float(ours.correct_norm[i])) == (s["acc"], s["acc_norm"]), i
    assert 0 < sum(ours.correct) < len(questions)  # a test that can fail either way
    assert ours.predicted != ours.predicted_norm  # the length normalisation changes some choices


def test_trailing_spaces_move_into_the_continuation() -> None:
    """lm-eval's rule, on the tokenizer's own encodings: the context's trailing space belongs to the choice."""
    tok = tiny_tokenizer(bos=True)
    head, tail = encode_pair(tok, "Q: the cat? A: ", " dogs")
    assert head == tok.encode("Q: the cat? A:")
    assert tok.decode(tail).startswith("  dogs") or tok.decode(tail) == "  dogs"
    whole = tok.encode("Q: the cat? A:  dogs")
    assert head + tail == whole
    with pytest.raises(ValueError, match="empty"):
        encode_pair(tok, "", " x")
