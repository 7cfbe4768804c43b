"""The data card (`DATA.md`) of the fortunes tasks: packages, versions, licenses, and how each task was built.

Kept apart from `tatr.suites.text.fortunes` (which reads, draws and writes) because it is only prose
about what that module did; it reads the same records and decides nothing.
"""

from __future__ import annotations

from tatr.core.resolution import PAIRED_EXAMPLE, level_half_width, resolvable_difference
from tatr.suites.text.fortunes import (
    MAX_CHARS,
    MIN_CHARS,
    NOT_PROSE,
    SEED,
    FileTexts,
    TaskData,
    Tree,
    language_files,
)
from tatr.suites.text.suite import TextSpec


def data_card(
    tree: Tree,
    tasks: list[TaskData],
    files: dict[str, FileTexts],
    offensive: list[str],
    links: list[str],
    min_texts: int,
) -> str:
    """DATA.md: where every text came from and every rule it passed, with the counts."""
    rows = [f"| {p.name} | {p.version} | {p.license} | `{p.copyright}` |" for p in tree.packages]
    latin1 = sorted(rel for rel, f in files.items() if f.encoding == "latin-1")
    prose_out = [f"`{rel}` ({why})" for rel, why in NOT_PROSE.items() if (tree.folder / rel).is_file()]
    lines = [
        "# Debian fortunes: text classification tasks",
        "",
        f"Prepared by `tatr prepare-text` from {tree.origin}. The same packages give byte-identical files.",
        "",
        "## Source packages",
        "",
        "| package | version | license (summary of its copyright file) | copyright file |",
        "|---|---|---|---|",
        *(rows or ["| (not recorded: a bare fortunes folder was given) | | | |"]),
        "",
        "English texts come from the top folder (packages fortunes and fortunes-min), German from `de/`"
        " (fortunes-de), Spanish from `es/` (fortunes-es), Italian from `it/` (fortunes-it).",
        "",
        "## How the tasks were built",
        "",
        "- Entries are the blocks between lines holding `%`. A file's `.u8` (UTF-8) variant is read when present,"
        " else the file itself, as UTF-8 or, failing that, latin-1"
        + (f" (read as latin-1: {', '.join(f'`{r}`' for r in latin1)})." if latin1 else " (none needed latin-1)."),
        "- Each entry is NFC-normalised; backspace overstriking and control characters are removed and its"
        " whitespace collapsed to single spaces (one line per text).",
        f"- Kept: {MIN_CHARS} to {MAX_CHARS} characters. Exact duplicates count once per class; a text found in two"
        " classes of one task is dropped from both; a text that also occurs in an offensive file is dropped.",
        "- Balance: every class of a task gets the same number of texts, the task's cap or, when a class has"
        f" fewer usable texts, that smaller number. A task must hold at least {min_texts} texts.",
        f"- Draw: per class, the texts with the smallest sha256 of `'{SEED}' NUL task NUL text` (seed {SEED}), which"
        " depends neither on file order nor on the platform. The jsonl lists the classes in `tasks.yaml` order.",
        "- Train / validation / test splits are drawn later, by the text suite.",
        "",
        "## Left out",
        "",
        "- Offensive files, never a class (their texts are also removed from every task): anything under an"
        " `off/` folder, where Debian's `*-off` packages install, and fortunes-it's `-o` files, which its README"
        " marks as offensive. Present here: " + (", ".join(f"`{r}`" for r in offensive) or "none") + ".",
        "- Top-level symlinks (fortunes-it links its files there), refused so that no Italian file passes for"
        " English; the files are read under `it/`: " + (", ".join(f"`{r}`" for r in links) or "none") + ".",
        "- Kept out of the `language` task, as not prose in one language: " + (", ".join(prose_out) or "none") + ".",
    ]
    if tree.english is not None:
        others = sorted(set(language_files(Tree(tree.folder, tree.origin), "en")) - tree.english)
        lines.append(
            "- Top-level files that dpkg says fortunes and fortunes-min do not ship: "
            + (", ".join(f"`{r}`" for r in others) or "none")
            + "."
        )
    lines += ["", "## Tasks"]
    for task in tasks:
        spec = task.spec
        lines += [
            "",
            f"### `{spec.name}`: {len(task.classes)} classes x {task.per_class} = {task.total} texts (cap {spec.cap})",
            "",
            "Templates: " + " · ".join(f'"{t}"' for t in spec.templates),
            "",
            "| class | description | source files | entries | within length | usable | taken |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in task.classes:
            entries = sum(files[rel].entries for rel in c.files)
            within = sum(len(files[rel].texts) for rel in c.files)
            sources = ", ".join(f"`{rel}`" for rel in c.files)
            cells = (c.spec.name, c.spec.description, sources, entries, within, c.usable, len(c.texts))
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines += ["", f"Texts dropped for occurring in two classes: {task.shared}."]
    return "\n".join([*lines, *resolution_lines(tasks)]) + "\n"


def resolution_lines(tasks: list[TaskData]) -> list[str]:
    """What the text suite's default splits can resolve (`tatr.core.resolution`), so a reader knows
    which differences of its tables can be told from noise at all."""
    defaults = TextSpec.model_fields
    per_class = {"test": defaults["n_test"].default, "validation": defaults["n_val"].default}
    lines = [
        "",
        "## What the splits can resolve",
        "",
        f"The text suite draws {per_class['validation']} validation and {per_class['test']} test texts per class"
        " (`suite.n_val`, `suite.n_test`). Half-widths of 95% intervals of the average accuracy over the"
        " tasks, in points, from the binomial variance (`tatr/core/resolution.py`): one accuracy at p = ½;"
        " a difference of two methods measured independently; a paired difference of two methods that"
        f" disagree on {PAIRED_EXAMPLE:.0%} of the examples (the report's intervals are paired).",
        "",
        "| split | examples per task | seeds | one accuracy ± | unpaired difference ± | paired difference ± |",
        "|---|---|---|---|---|---|",
    ]
    for split, k in per_class.items():
        sizes = [k * len(t.classes) for t in tasks]
        shown = f"{min(sizes)}–{max(sizes)}" if min(sizes) != max(sizes) else str(sizes[0])
        for seeds in (1, 3):
            cells = (
                level_half_width(sizes, seeds),
                resolvable_difference(sizes, seeds=seeds),
                resolvable_difference(sizes, PAIRED_EXAMPLE, seeds),
            )
            lines.append(f"| {split} | {shown} | {seeds} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return lines
