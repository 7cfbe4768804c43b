"""Text classification tasks from local files, and their fixed splits drawn by seed: shared by the suites on
text (the sentence-encoder suite `text` and the causal-LM suite `lm`), so neither imports the other.

A task is a file of labelled texts: CSV or JSONL with a text and a label column, or a folder with
one sub-folder per class holding one `.txt` file per text. Tasks are listed in a `tasks.yaml`:

    tasks:
      - name: en-topic
        file: en-topic.jsonl          # relative to tasks.yaml
        text_field: text              # CSV/JSONL column names (these are the defaults)
        label_field: label
        labels: {computers: computers, science: science}   # class → description; order = class index
        templates: ["This text is about {label}."]         # the zero-shot head's prompts

`labels` may be omitted (classes sorted, each described by its own name). Task and class names are
plain names (`tatr.core.outputs.safe_name`: letters, digits and `_.+=,@-`, no leading dot), since
task names become file names in the build; a YAML number written as a name (`name: 2024`) is its
text. Every failure to read a file is one line naming the file and line (`tatr.io.text_files`):
CSV fields are limited to 131,072 characters, files to 1 GiB. Splits are drawn per
class by a seeded permutation (stratified, so every split has every class): `n_val` and `n_test`
texts per class for validation and test, up to `n_train` of the rest for training. The draw is a
pure function of (texts, seed), so the same files and seed give the same splits on any machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tatr.core.cache import default_cache_root
from tatr.core.errors import TatrError
from tatr.core.outputs import safe_name
from tatr.io.safe_yaml import name_text, read_yaml_file
from tatr.io.text_files import csv_records, numbered_lines, parse_json, read_text

DEFAULT_TEMPLATES = ("This text is about {label}.", "A text about {label}.", "{label}.")
MAX_TASK_BYTES = 1 << 30  # a task file above 1 GiB is refused before it is read


@dataclass(frozen=True)
class TextTask:
    """One task: its texts and integer labels, class names and descriptions, and head prompts."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    descriptions: tuple[str, ...]
    templates: tuple[str, ...]

    def digest(self) -> str:
        """A content key of everything that shapes the suite's data and heads."""
        blob = json.dumps([self.name, self.texts, self.labels, self.classes, self.descriptions, self.templates])
        return hashlib.sha256(blob.encode()).hexdigest()


def prepared_tasks_file(cache_root: Path | None = None) -> Path:
    """Where `tatr prepare-text` writes the fortunes tasks by default."""
    return (Path(cache_root) if cache_root is not None else default_cache_root()) / "data" / "fortunes" / "tasks.yaml"


def load_tasks(tasks: str | list[dict[str, Any]], only: Sequence[str] | None) -> list[TextTask]:
    """A suite's `tasks` option: a tasks.yaml (or its folder), "fortunes" (what `tatr prepare-text` wrote),
    or the entries inline; `only` a subset, in that order. The one reading of it, for every suite on text tasks."""
    if isinstance(tasks, list):
        entries = [parse_task_entry(e, Path.cwd(), f"suite.tasks[{i}]") for i, e in enumerate(tasks)]
        return select_tasks(entries, only)
    if tasks == "fortunes":
        path = prepared_tasks_file()
        if not path.is_file():
            raise TatrError(f"the fortunes tasks are not prepared ({path} is missing): run `tatr prepare-text` first")
    else:
        path = Path(tasks).expanduser()
        path = path / "tasks.yaml" if path.is_dir() else path
        if not path.is_file():
            raise TatrError(f"suite.tasks: no such tasks file {path}")
    return read_tasks_file(path, only)


def read_tasks_file(path: Path, only: Sequence[str] | None = None) -> list[TextTask]:
    """The tasks of a `tasks.yaml` (all, or the names in `only`, in that order)."""
    raw = read_yaml_file(path, "tasks file")
    entries = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TatrError(f"{path}: a tasks file holds a non-empty list under 'tasks:'")
    return select_tasks([parse_task_entry(e, path.parent, f"{path}: tasks[{i}]") for i, e in enumerate(entries)], only)


def select_tasks(tasks: list[TextTask], only: Sequence[str] | None) -> list[TextTask]:
    """The named tasks in the order given (all when `only` is None); unknown or repeated names are an error."""
    by_name = {t.name: t for t in tasks}
    if len(by_name) != len(tasks):
        raise TatrError("two tasks have the same name")
    if only is None:
        return tasks
    unknown = [n for n in only if n not in by_name]
    if unknown or len(set(only)) != len(only) or not only:
        raise TatrError(f"suite.only must name distinct tasks among {', '.join(by_name)}; got {list(only)}")
    return [by_name[n] for n in only]


def parse_task_entry(entry: Any, base: Path, where: str) -> TextTask:
    """One `tasks:` entry of a tasks file → a `TextTask` (files read and checked)."""
    if not isinstance(entry, Mapping):
        raise TatrError(f"{where}: a task must be a mapping with at least 'name' and 'file'")
    known = {"name", "file", "text_field", "label_field", "labels", "templates"}
    unknown = sorted(str(k) for k in set(entry) - known)
    if unknown:
        raise TatrError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    name, file = name_text(entry.get("name")), entry.get("file")
    if not isinstance(name, str) or not name or not isinstance(file, str) or not file:
        raise TatrError(f"{where}: a task needs a 'name' and a 'file' (strings)")
    _plain(name, "task name", where)  # it names files in the build folder: refused before any file is read
    source = (base / file).resolve() if not Path(file).is_absolute() else Path(file)
    rows = read_rows(source, str(entry.get("text_field", "text")), str(entry.get("label_field", "label")))
    names = sorted({label for _, label in rows})
    labels = entry.get("labels")
    if labels is None:
        labels = {c: c for c in names}
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) and v for v in labels.values()):
        raise TatrError(f"{where}: 'labels' must map each class to a description (a non-empty string)")
    classes = tuple(str(c) for c in labels)
    for c in classes:
        _plain(c, "class", where if entry.get("labels") is not None else str(source))
    missing = sorted(set(names) - set(classes))
    if missing:
        raise TatrError(f"{source}: label '{missing[0]}' is not listed under 'labels' of task '{name}'")
    templates = entry.get("templates", DEFAULT_TEMPLATES)
    if (
        isinstance(templates, str)
        or not templates
        or not all(isinstance(t, str) and t.count("{label}") == 1 for t in templates)
    ):
        raise TatrError(f"{where}: 'templates' must be a list of strings, each with one {{label}}")
    if len(classes) < 2:
        raise TatrError(f"{source}: task '{name}' needs at least 2 classes, found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return TextTask(
        name,
        tuple(t for t, _ in rows),
        tuple(index[label] for _, label in rows),
        classes,
        tuple(str(labels[c]) for c in classes),
        tuple(templates),
    )


def read_rows(source: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    """(text, label) pairs of a CSV, JSONL or class-folder task; empty texts are an error."""
    if source.is_dir():
        rows = _read_folder(source)
    elif not source.is_file():
        raise TatrError(f"{source}: no such task file or folder")
    elif source.stat().st_size > MAX_TASK_BYTES:
        raise TatrError(f"{source}: larger than {MAX_TASK_BYTES >> 20} MiB; split the task")
    elif source.suffix.lower() == ".csv":
        rows = _read_csv(source, text_field, label_field)
    elif source.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _read_jsonl(source, text_field, label_field)
    else:
        raise TatrError(f"{source}: a task file is .csv or .jsonl, or a folder with one sub-folder per class")
    if not rows:
        raise TatrError(f"{source}: no texts")
    for i, (text, _) in enumerate(rows):
        if not text.strip():
            raise TatrError(f"{source}: text {i + 1} is empty")
    return rows


def _plain(value: str, what: str, where: str) -> None:
    try:
        safe_name(value, what)
    except TatrError as exc:
        raise TatrError(f"{where}: {exc}") from None


def _read_text(path: Path) -> str:
    return read_text(path, "task file", MAX_TASK_BYTES)


def _read_csv(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    fields, records = csv_records(_read_text(path), path)
    for need in (text_field, label_field):
        if need not in fields:
            shown = ", ".join(f[:40] for f in fields[:20])
            raise TatrError(f"{path}: no column '{need}' (columns: {shown or 'none'})")
    return [(str(row[text_field] or ""), str(row[label_field] or "")) for row in records]


def _read_jsonl(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    rows = []
    for number, line in numbered_lines(_read_text(path)):
        item = parse_json(line, path, number)
        if not isinstance(item, dict) or not isinstance(item.get(text_field), str) or label_field not in item:
            raise TatrError(f"{path}:{number}: needs a string '{text_field}' and a '{label_field}'")
        rows.append((item[text_field], str(item[label_field])))
    return rows


def _read_folder(folder: Path) -> list[tuple[str, str]]:
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        for file in sorted(p for p in sub.iterdir() if p.suffix == ".txt" and p.is_file() and not p.is_symlink()):
            rows.append((_read_text(file), sub.name))
    return rows


def draw_splits(task: TextTask, seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, list[int]]:
    """Indices of train / validation / test, stratified per class, drawn by a seeded permutation.

    Each class gives `n_val` validation and `n_test` test texts and up to `n_train` training texts
    of what is left; a class with fewer than `n_val + n_test + 1` texts is an error (a split without
    it would make accuracies incomparable across splits)."""
    key = int(hashlib.sha256(f"{seed}:{task.name}".encode()).hexdigest()[:15], 16)
    gen = torch.Generator().manual_seed(key)
    out: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    labels = torch.tensor(task.labels)
    for c, name in enumerate(task.classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < n_val + n_test + 1:
            raise TatrError(
                f"task '{task.name}': class '{name}' has {len(members)} texts; it needs more than "
                f"n_val + n_test = {n_val + n_test}"
            )
        order = members[torch.randperm(len(members), generator=gen)].tolist()
        out["validation"] += order[:n_val]
        out["test"] += order[n_val : n_val + n_test]
        out["train"] += order[n_val + n_test :][:n_train]
    return {split: sorted(idx) for split, idx in out.items()}
