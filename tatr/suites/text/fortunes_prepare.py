"""`tatr prepare-text`'s work: build every fortunes task in memory, write its data card, then the folder at once.

Apart from `tatr.suites.text.fortunes` (reading, cleaning and drawing the texts) and
`tatr.suites.text.fortunes_card` (the prose of `DATA.md`), which both read the same records: this
module joins them, so neither imports the other's caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from tatr.core.outputs import atomic_dir, writing
from tatr.suites.text.fortunes import (
    MIN_TEXTS,
    TASKS,
    FileTexts,
    TaskData,
    TaskSpec,
    Tree,
    build_task,
    check_out,
    offensive_files,
    read_file,
    refused_links,
    task_jsonl,
    tasks_yaml,
)
from tatr.suites.text.fortunes_card import data_card


def _write(path: Path, text: str) -> None:
    with writing(path), open(path, "w", encoding="utf-8", newline="\n") as fh:  # a full disk names this file
        fh.write(text)


def prepare(
    tree: Tree,
    out: Path,
    log: Callable[[str], None] = lambda _: None,
    tasks: Iterable[TaskSpec] = TASKS,
    min_texts: int = MIN_TEXTS,
) -> list[TaskData]:
    """Build every task in memory, then write the folder at once (atomically): never half-written."""
    out = Path(out)
    check_out(out)
    cache: dict[str, FileTexts] = {}

    def read(rel: str) -> FileTexts:
        if rel not in cache:
            cache[rel] = read_file(tree.folder, rel)
        return cache[rel]

    offensive = offensive_files(tree)
    banned = {t for rel in offensive if (tree.folder / rel).is_file() for t in read(rel).texts}
    built = []
    for spec in tasks:
        built.append(build_task(tree, spec, read, banned, min_texts))
        log(f"  {spec.name}: {len(spec.classes)} classes x {built[-1].per_class} = {built[-1].total} texts")
    files = {"tasks.yaml": tasks_yaml(built), **{f"{t.spec.name}.jsonl": task_jsonl(t) for t in built}}
    files["DATA.md"] = data_card(tree, built, cache, offensive, refused_links(tree), min_texts)
    with atomic_dir(out) as tmp:
        for name, text in files.items():
            _write(tmp / name, text)
    return built
