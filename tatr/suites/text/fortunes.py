"""Real text classification tasks from Debian's fortunes packages (`tatr prepare-text`).

The fortunes packages hold tens of thousands of human-written texts in four languages, filed by
topic or by source collection; every file becomes one class. This module reads such a tree, draws
balanced tasks from it and writes the task folder the `text` suite reads:

* `tasks.yaml`: per task its jsonl file, its classes (name -> description, in class index order)
  and the templates of the zero-shot heads;
* `<task>.jsonl`: one `{"text", "label"}` object per line;
* `DATA.md`: the data card (packages, versions, licenses, what was left out and why, every count).

Why each rule:
* **Entries** are the blocks between lines holding `%`. Each is NFC-normalised, stripped of
  backspace overstriking (old files underline with `_\\b`) and control characters, and its
  whitespace collapsed, so a text is what a reader sees, on one line.
* **Length** 20..1000 characters: shorter ones carry no topic ("Hallo Bausparer!"), longer ones
  are pages of ASCII art or stories that a short-context encoder truncates anyway.
* **Duplicates**: a text counts once per class; a text found in two classes of one task is dropped
  from both (its label is ambiguous); a text that also occurs in an offensive file is dropped.
* **Offensive files** are never read as classes: anything under an `off/` folder (where Debian's
  `*-off` packages install) and fortunes-it's `-o` files (its README marks them offensive).
* **Symlinks are refused** as files: `fortunes-it` links its files into the top folder, where they
  would pass for English. A `.u8` variant (UTF-8) is read instead of its legacy 8-bit file.
* **The draw** takes, per class, the texts with the smallest sha256 of (seed, task, text): a seeded
  draw that depends neither on file order nor on Python's `random`, so the same inputs give
  byte-identical files on any machine. Every class of a task gets the same number of texts.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tatr.core.errors import TatrError

SOURCE = "debian-fortunes"
PACKAGES = ("fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it")
ENGLISH_PACKAGES = ("fortunes", "fortunes-min")
SEED = 0
MIN_CHARS, MAX_CHARS = 20, 1000
MIN_TEXTS = 500  # per task, all classes together
LANGUAGE_FOLDERS = {"en": "", "de": "de", "es": "es", "it": "it"}
# Files of a language that are not prose in it: kept out of the language task's pools.
NOT_PROSE = {
    "ascii-art": "ASCII pictures, no language",
    "de/asciiart": "ASCII pictures, no language",
    "it/banner": "an ASCII banner, no language",
    "de/translations": "an English-German phrase list, two languages",
}


@dataclass(frozen=True)
class Package:
    """One source package as the data card records it."""

    name: str
    version: str
    license: str  # a summary of its copyright file (`summarise_license`)
    copyright: str  # where that file was read, relative to the unpacked root


@dataclass(frozen=True)
class Tree:
    """A fortunes folder (`…/usr/share/games/fortunes`) and what is known of where it came from."""

    folder: Path
    origin: str  # for the data card: how the packages were obtained
    packages: tuple[Package, ...] = ()
    english: frozenset[str] | None = None  # top-level files shipped by fortunes/fortunes-min (dpkg); None: by layout


@dataclass(frozen=True)
class ClassSpec:
    name: str  # the label in the jsonl
    description: str  # what the zero-shot templates say
    files: tuple[str, ...] = ()  # paths relative to the fortunes folder
    language: str | None = None  # instead of files: every prose file of this language


@dataclass(frozen=True)
class TaskSpec:
    name: str
    cap: int  # texts per class at most
    templates: tuple[str, ...]
    classes: tuple[ClassSpec, ...]


def _topic(name: str, pattern: str, table: str) -> TaskSpec:
    """A task of one file per class: `table` is `"class: description; …"`, `pattern` the file with `{}`."""
    pairs = [(n.strip(), d.strip()) for n, d in (item.split(":", 1) for item in table.split(";"))]
    return TaskSpec(name, 150, ABOUT, tuple(ClassSpec(n, d, (pattern.format(n),)) for n, d in pairs))


ABOUT = ("This text is about {label}.", "A quotation about {label}.", "{label}.")
TASKS = (
    _topic(
        "en-topic",
        "{}",
        "computers: computers; science: science; politics: politics; law: law; food: food; sports: sports;"
        " love: love; education: education",
    ),
    _topic(
        "en-genre",
        "{}",
        "definitions: definitions; riddles: riddles; songs-poems: songs and poems; startrek: Star Trek;"
        " zippy: Zippy the Pinhead; humorists: humorists; literature: literature; platitudes: platitudes",
    ),
    _topic(
        "de-topic",
        "de/{}",
        "computer: computers; fussball: football; letzteworte: last words; ms: Microsoft Windows; namen: funny names;"
        " regeln: weather lore and rules; woerterbuch: dictionary definitions; warmduscher: wimps",
    ),
    _topic(
        "es-topic",
        "es/{}.fortunes",
        "amistad: friendship; arte: art; ciencia: science; familia: family; informatica: computers;"
        " libertad: freedom; poder: power; sentimientos: feelings",
    ),
    _topic(
        "it-source",
        "it/{}",
        "computer: computers; definizioni: definitions; formiche: jokes; itatrek: Star Trek; leggi: Murphy's laws;"
        " luke: witty aphorisms; norm: proverbs and famous quotations; paolotedeschi: philosophical quotations",
    ),
    TaskSpec(
        "language",
        300,
        ("This text is written in {label}.", "A text in {label}.", "{label}."),
        tuple(
            ClassSpec(name, name.capitalize(), language=code)
            for name, code in (("english", "en"), ("german", "de"), ("spanish", "es"), ("italian", "it"))
        ),
    ),
)


# ----------------------------------------------------------------------------------------- reading
_SEPARATOR = re.compile(r"^%[ \t\r]*$", re.MULTILINE)
_OVERSTRIKE = re.compile(r"[^\x08]\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def decode(data: bytes) -> tuple[str, str]:
    """UTF-8 when the bytes are valid UTF-8, else latin-1 (the legacy 8-bit files); and which one."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def clean(entry: str) -> str:
    """One entry as a reader sees it, on one line: NFC, no overstriking or control characters."""
    text = unicodedata.normalize("NFC", entry)
    while (stripped := _OVERSTRIKE.sub("", text)) != text:
        text = stripped
    return " ".join(_CONTROL.sub(" ", text).split())


def split_entries(text: str) -> list[str]:
    """The cleaned, non-empty entries of a fortune file (blocks between `%` lines)."""
    return [entry for raw in _SEPARATOR.split(text) if (entry := clean(raw))]


@dataclass(frozen=True)
class FileTexts:
    texts: tuple[str, ...]  # cleaned entries within the length limits, in file order
    entries: int  # all non-empty entries
    encoding: str  # "utf-8 (.u8)", "utf-8" or "latin-1"


def read_file(folder: Path, rel: str) -> FileTexts:
    """Read `rel`: its `.u8` variant when one exists inside the tree, else the file, decoded."""
    path = folder / rel
    u8 = path.with_name(path.name + ".u8")
    use_u8 = u8.is_file() and folder.resolve() in u8.resolve().parents
    try:
        text, encoding = decode((u8 if use_u8 else path).read_bytes())
    except OSError as exc:
        raise TatrError(f"{path}: cannot read ({exc.strerror})") from None
    entries = split_entries(text)
    kept = tuple(e for e in entries if MIN_CHARS <= len(e) <= MAX_CHARS)
    return FileTexts(kept, len(entries), f"{encoding} (.u8)" if use_u8 else encoding)


def _is_fortune_name(name: str) -> bool:
    return not name.endswith((".dat", ".u8")) and not name.startswith(".")


def language_files(tree: Tree, language: str) -> list[str]:
    """The usable files of a language: regular files (not symlinks) of its folder, not offensive."""
    sub = LANGUAGE_FOLDERS[language]
    base = tree.folder / sub if sub else tree.folder
    if not base.is_dir():
        return []
    found = sorted(
        f"{sub}/{p.name}" if sub else p.name
        for p in base.iterdir()
        if _is_fortune_name(p.name) and not p.is_symlink() and p.is_file() and not p.name.endswith("-o")
    )
    if language == "en" and tree.english is not None:
        found = [rel for rel in found if rel in tree.english]
    return found


def prose_files(tree: Tree, language: str) -> list[str]:
    """A language task's pool: the language's files less those in `NOT_PROSE`."""
    return [rel for rel in language_files(tree, language) if rel not in NOT_PROSE]


def offensive_files(tree: Tree) -> list[str]:
    """Files under any `off/` folder, and fortunes-it's `-o` files: listed, read only to ban their texts."""
    found = {
        str(p.relative_to(tree.folder))
        for p in tree.folder.rglob("*")
        if _is_fortune_name(p.name)
        and (p.is_file() or p.is_symlink())
        and ("off" in p.relative_to(tree.folder).parts[:-1] or p.name.endswith("-o"))
    }
    return sorted(found)


def refused_links(tree: Tree) -> list[str]:
    """Top-level symlinks (fortunes-it's links to `it/…`): refused, so they never pass for English."""
    return sorted(p.name for p in tree.folder.iterdir() if p.is_symlink() and _is_fortune_name(p.name))


# ------------------------------------------------------------------------------------------ drawing
@dataclass(frozen=True)
class ClassData:
    spec: ClassSpec
    files: tuple[str, ...]
    usable: int  # distinct texts left after every filter
    texts: tuple[str, ...]  # the drawn ones


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    per_class: int
    shared: int  # texts found in two classes, dropped from both
    classes: tuple[ClassData, ...]

    @property
    def total(self) -> int:
        return self.per_class * len(self.classes)


def draw(texts: Iterable[str], k: int, salt: str, seed: int = SEED) -> list[str]:
    """The `k` texts with the smallest sha256(seed, salt, text): seeded, independent of order and platform.

    The salt (the task's name) keeps two tasks sharing a pool from drawing the same texts.
    """
    return sorted(texts, key=lambda t: hashlib.sha256(f"{seed}\0{salt}\0{t}".encode()).digest())[:k]


def build_task(
    tree: Tree, spec: TaskSpec, read: Callable[[str], FileTexts], banned: set[str], min_texts: int = MIN_TEXTS
) -> TaskData:
    """Pool each class's texts, drop shared and banned ones, draw the same number from every class."""
    pools: list[tuple[tuple[str, ...], dict[str, None]]] = []
    for cls in spec.classes:
        files = tuple(prose_files(tree, cls.language) if cls.language else cls.files)
        for rel in files:
            if not (tree.folder / rel).is_file() or (tree.folder / rel).is_symlink():
                raise TatrError(f"{tree.folder / rel}: missing, but task {spec.name} (class {cls.name}) needs it")
        if not files:
            raise TatrError(f"{tree.folder}: no {cls.language} files found for task {spec.name}")
        pools.append((files, dict.fromkeys(t for rel in files for t in read(rel).texts if t not in banned)))
    counts = Counter(t for _, texts in pools for t in texts)
    shared = {t for t, n in counts.items() if n > 1}
    kept = [[t for t in texts if t not in shared] for _, texts in pools]
    per_class = min(spec.cap, *(len(texts) for texts in kept))
    if per_class * len(spec.classes) < min_texts:
        small = min(range(len(kept)), key=lambda i: len(kept[i]))
        raise TatrError(
            f"task {spec.name}: class {spec.classes[small].name} has {per_class} usable texts, so the balanced "
            f"task would hold {per_class * len(spec.classes)} < {min_texts}; check {', '.join(pools[small][0])}"
        )
    classes = tuple(
        ClassData(cls, files, len(texts), tuple(draw(texts, per_class, spec.name)))
        for cls, (files, _), texts in zip(spec.classes, pools, kept, strict=True)
    )
    return TaskData(spec, per_class, len(shared), classes)


# ------------------------------------------------------------------------------------------ writing
def tasks_yaml(tasks: Iterable[TaskData]) -> str:
    doc = {
        "source": SOURCE,
        "tasks": [
            {
                "name": t.spec.name,
                "file": f"{t.spec.name}.jsonl",
                "labels": {c.spec.name: c.spec.description for c in t.classes},
                "templates": list(t.spec.templates),
            }
            for t in tasks
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=200)


def task_jsonl(task: TaskData) -> str:
    return "".join(
        json.dumps({"text": text, "label": c.spec.name}, ensure_ascii=False) + "\n"
        for c in task.classes
        for text in c.texts
    )


OUTPUT_NAME = re.compile(r"^(tasks\.yaml|DATA\.md|[a-z0-9-]+\.jsonl)$")


def check_out(out: Path) -> None:
    """Refuse an output that is a file, or a folder holding anything `prepare` did not write.

    The folder is replaced whole, so pointing `--out` at a folder of one's own must not delete it.
    """
    if out.exists() and not out.is_dir():
        raise TatrError(f"{out}: --out is a file; give a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not OUTPUT_NAME.match(p.name) or not p.is_file())
        if foreign:
            raise TatrError(
                f"{out}: holds files prepare-text did not write ({foreign[0]}, …); choose an empty or new folder"
            )
