"""Text classification tasks asked of a causal LM as multiple choice: one prompt per text, one verbalizer per class.

The prompt is the text, then a question, then "Answer:" (lm-evaluation-harness's usual `doc_to_text` shape, as
in its `sciq` or `piqa` configs); the choices are the classes' descriptions from the tasks file ("songs and
poems", "German"), scored after lm-eval's " " delimiter (`tatr.suites.causal_lm.scoring`). Texts are put on
one line (runs of whitespace become one space: fortunes are often verse) and cut to `max_chars` characters at a
word boundary, so a prompt's length, and with it the cost of scoring and fine-tuning, stays bounded.

Each fortunes task has its own question (what the labels are: topics, kinds of text, languages); any other
task gets `DEFAULT_QUESTION`, and `suite.questions: {task: "…"}` replaces either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tatr.core.errors import TatrError
from tatr.suites.causal_lm.scoring import Question
from tatr.suites.text_tasks import TextTask

DEFAULT_QUESTION = "What is this text about?"
FORTUNES_QUESTIONS = {
    "en-topic": "What is this quotation about?",
    "en-genre": "What kind of text is this?",
    "de-topic": "What is this quotation about?",
    "es-topic": "What is this quotation about?",
    "it-source": "What kind of text is this?",
    "language": "Which language is this text in?",
}


def question_of(task: str, overrides: Mapping[str, str] | None = None) -> str:
    """The question asked for `task`: the user's, else the fortunes task's own, else the default."""
    if overrides and task in overrides:
        return overrides[task]
    return FORTUNES_QUESTIONS.get(task, DEFAULT_QUESTION)


def one_line(text: str, max_chars: int) -> str:
    """`text` on one line, cut to at most `max_chars` characters at the last space before the limit (mid-word
    only when a single word is longer than the limit)."""
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[: max_chars + 1].rsplit(" ", 1)[0]
    return cut if cut and len(cut) <= max_chars else flat[:max_chars]


def prompt(text: str, question: str, max_chars: int) -> str:
    return f"{one_line(text, max_chars)}\nQuestion: {question}\nAnswer:"


def questions(task: TextTask, indices: Sequence[int], question: str, max_chars: int) -> list[Question]:
    """The multiple-choice questions of `task`'s examples `indices`, in that order."""
    choices = tuple(task.descriptions)
    if len(set(choices)) != len(choices):
        raise TatrError(f"task '{task.name}': two classes share a description, so their verbalizers are the same")
    return [Question(prompt(task.texts[i], question, max_chars), choices, task.labels[i]) for i in indices]


def as_rows(qs: Sequence[Question]) -> list[dict]:
    """Questions as JSON rows (the build's `questions_<task>.json`)."""
    return [{"context": q.context, "choices": list(q.choices), "gold": q.gold} for q in qs]


def from_rows(rows: Sequence[Mapping]) -> list[Question]:
    return [Question(r["context"], tuple(r["choices"]), int(r["gold"])) for r in rows]
