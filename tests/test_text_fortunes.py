"""`tatr prepare-text`: real text tasks from Debian's fortunes packages.

Most tests run on a generated fortunes tree laid out as Debian installs it (English at the top,
`de/`, `es/`, `it/`, `.u8` variants, `.dat` indexes, fortunes-it's top-level symlinks, `off/` folders)
whose counts are known by construction, so every expected number below is computed from the
generator's parameters, not read back from the code under test. One test runs on the installed
packages when they are present (CI installs them).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tatr.cli import main as cli_main
from tatr.cli.prepare_text import FORTUNES, installed_tree, source_tree, summarise_license, unpack_debs
from tatr.core.errors import TatrError
from tatr.suites.text import fortunes as tf
from tatr.suites.text import fortunes_prepare as tfp

N = 160  # distinct usable entries per class file, unless a quirk below says otherwise
SPORTS = 140  # the one small English class: en-topic is capped at it
WORD = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian"}
SHARED = "This exact sentence appears in both the law file and the politics file."
BANNED = "A Spanish sentence that also sits in an offensive file under es/off."
CLASS_FILES = {rel: lang for lang, rels in {
    "en": "computers science politics law food sports love education definitions riddles songs-poems startrek "
          "zippy humorists literature platitudes",
    "de": "de/computer de/fussball de/letzteworte de/ms de/namen de/regeln de/woerterbuch de/warmduscher",
    "es": "es/amistad.fortunes es/arte.fortunes es/ciencia.fortunes es/familia.fortunes es/informatica.fortunes "
          "es/libertad.fortunes es/poder.fortunes es/sentimientos.fortunes",
    "it": "it/computer it/definizioni it/formiche it/itatrek it/leggi it/luke it/norm it/paolotedeschi",
}.items() for rel in rels.split()}  # fmt: skip


def _entries(rel: str, n: int) -> list[str]:
    lang = CLASS_FILES.get(rel, "en")
    return [f"{WORD[lang]} text number {i} from the file {rel}, long enough to keep." for i in range(n)]


def _fortune(entries: list[str]) -> str:
    return "".join(f"{e}\n%\n" for e in entries)


def make_tree(top: Path, riddles: int = N) -> Path:
    """An unpacked root `top/usr/share/games/fortunes` with every class file and each quirk once."""
    root = top / FORTUNES
    for rel in CLASS_FILES:
        n = SPORTS if rel == "sports" else riddles if rel == "riddles" else N
        entries = _entries(rel, n)
        if rel in ("law", "politics"):
            entries.insert(3, SHARED)  # in two classes of en-topic: dropped from both
        if rel == "computers":
            entries[5] = "A café in the latin-1 file, decoded without its .u8 variant."
            entries.append(entries[7])  # an exact duplicate: counted once
        if rel == "food":
            entries += ["Too short.", "word " * 201]  # 10 and 1005 characters: both dropped
        if rel == "love":
            entries[0] = "".join(f"_\b{c}" for c in "Underlined") + " with\tbackspace\x0b overstriking, in love."
        if rel == "es/amistad.fortunes":
            entries.append(BANNED)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "computers":  # legacy 8-bit file, no .u8
            path.write_bytes(_fortune(entries).encode("latin-1"))
        elif rel == "science":  # legacy file differs from its real .u8 variant: the .u8 must win
            path.write_bytes(_fortune([f"LEGACY {e}" for e in entries]).encode("latin-1"))
            path.with_name("science.u8").write_text(_fortune(entries).replace("file science", "file science (naïve)"))
        else:
            path.write_text(_fortune(entries), encoding="utf-8")
            os.symlink(path.name, path.with_name(path.name + ".u8"))  # as Debian ships them
        path.with_name(path.name + ".dat").write_bytes(b"\x00\x02\xff\xfe binary index")
    (root / "ascii-art").write_text(_fortune([f"  /\\_/\\  ( o.o ) ASCII picture number {i} ####" for i in range(50)]))
    os.symlink("it/computer", root / "computer")  # fortunes-it's top-level links: must not count as English
    os.symlink("it/computer.dat", root / "computer.dat")
    for rel in ("off/rude", "es/off/misogino.fortunes", "it/luke-o"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        entries = [f"OFFENSIVE text number {i} in {rel}, never to be used." for i in range(30)]
        (root / rel).write_text(_fortune(entries + ([BANNED] if "es/" in rel else [])))
    return top


def _read_out(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def tree(tmp_path: Path) -> tf.Tree:
    return source_tree(make_tree(tmp_path / "src"))


def test_entries_are_cleaned_split_and_decoded() -> None:
    assert tf.clean("_\bH_\bi  there\x07\n\tyou ") == "Hi there you"
    assert tf.clean("Cafe\u0301") == "Café"  # NFC
    assert tf.split_entries("one\n%\n\ntwo\r\n%\r\nthree\n%\n%\n") == ["one", "two", "three"]
    assert tf.decode("é".encode("latin-1")) == ("é", "latin-1")
    assert tf.decode("é".encode()) == ("é", "utf-8")


def test_read_file_prefers_u8_and_filters_length(tree: tf.Tree) -> None:
    science = tf.read_file(tree.folder, "science")
    assert science.encoding == "utf-8 (.u8)" and len(science.texts) == N
    assert not any("LEGACY" in t for t in science.texts) and "naïve" in science.texts[0]
    computers = tf.read_file(tree.folder, "computers")
    assert computers.encoding == "latin-1" and "A café in the latin-1 file" in computers.texts[5]
    food = tf.read_file(tree.folder, "food")
    assert food.entries == N + 2 and len(food.texts) == N  # "Too short." and the 1005-character entry dropped
    assert tf.read_file(tree.folder, "love").texts[0] == "Underlined with backspace overstriking, in love."


def test_tasks_and_counts_are_exact(tree: tf.Tree, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tasks = {t.spec.name: t for t in tfp.prepare(tree, out)}
    expected = {
        "en-topic": SPORTS,
        "en-genre": 150,
        "de-topic": 150,
        "es-topic": 150,
        "it-source": 150,
        "language": 300,
    }
    assert {name: t.per_class for name, t in tasks.items()} == expected
    en_topic = {c.spec.name: c.usable for c in tasks["en-topic"].classes}
    assert en_topic == {**dict.fromkeys(en_topic, N), "sports": SPORTS} and tasks["en-topic"].shared == 1
    assert {c.spec.name: c.usable for c in tasks["es-topic"].classes}["amistad"] == N  # BANNED left out
    # English pool: 15 files of N, sports, and SHARED once (one class here); not ascii-art, not it/computer via link
    language = {c.spec.name: c.usable for c in tasks["language"].classes}
    assert language == {"english": 15 * N + SPORTS + 1, "german": 8 * N, "spanish": 8 * N, "italian": 8 * N}

    doc = yaml.safe_load((out / "tasks.yaml").read_text(encoding="utf-8"))
    assert doc["source"] == "debian-fortunes" and [t["name"] for t in doc["tasks"]] == list(expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(["DATA.md", "tasks.yaml", *(f"{n}.jsonl" for n in expected)])
    for entry in doc["tasks"]:
        rows = _jsonl(out / entry["file"])
        counts = Counter(r["label"] for r in rows)
        assert list(counts) == list(entry["labels"])  # class index order = labels order
        assert set(counts.values()) == {expected[entry["name"]]}, entry["name"]  # balanced
        assert len(rows) == len({r["text"] for r in rows})  # no text twice in a task
        assert 2 <= len(entry["templates"]) <= 4 and all("{label}" in t for t in entry["templates"])
        assert all(tf.MIN_CHARS <= len(r["text"]) <= tf.MAX_CHARS for r in rows)
    assert doc["tasks"][2]["labels"]["fussball"] == "football"


def test_offensive_files_and_links_are_left_out(tree: tf.Tree, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tfp.prepare(tree, out)
    rows = [r for p in out.glob("*.jsonl") for r in _jsonl(p)]
    assert not any("OFFENSIVE" in r["text"] or r["text"] == BANNED for r in rows)
    by_label = {label: [r["text"] for r in rows if r["label"] == label] for label in ("english", "italian")}
    assert all(t.startswith("English text") for t in by_label["english"])  # no Italian file through `computer`
    assert not any("ASCII picture" in r["text"] for r in rows)
    assert tf.language_files(tree, "it") == sorted(r for r, lang in CLASS_FILES.items() if lang == "it")  # no luke-o
    assert tf.offensive_files(tree) == ["es/off/misogino.fortunes", "it/luke-o", "off/rude"]
    card = (out / "DATA.md").read_text(encoding="utf-8")
    for rel in ("off/rude", "es/off/misogino.fortunes", "it/luke-o"):
        assert f"`{rel}`" in card
    assert "the files are read under `it/`: `computer`." in card


def test_output_is_deterministic(tree: tf.Tree, tmp_path: Path) -> None:
    tfp.prepare(tree, tmp_path / "a")
    tfp.prepare(tree, tmp_path / "b")
    first = _read_out(tmp_path / "a")
    assert first == _read_out(tmp_path / "b")
    tfp.prepare(tree, tmp_path / "a")  # again over its own output
    assert _read_out(tmp_path / "a") == first
    moved = source_tree(shutil.copytree(tree.folder.parents[3], tmp_path / "elsewhere", symlinks=True))
    tfp.prepare(moved, tmp_path / "c")
    assert _read_out(tmp_path / "c") == first


def _no_leftovers(folder: Path) -> bool:
    return not any(p.name.startswith(".tatr-tmp") for p in folder.iterdir())


def test_missing_file_leaves_previous_output_whole(tree: tf.Tree, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tfp.prepare(tree, out)
    before = _read_out(out)
    (tree.folder / "de" / "fussball").unlink()
    with pytest.raises(TatrError, match=r"de/fussball: missing, but task de-topic \(class fussball\) needs it"):
        tfp.prepare(tree, out)
    assert _read_out(out) == before and _no_leftovers(tmp_path)


def test_failure_while_writing_leaves_nothing_half_written(
    tree: tf.Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    tfp.prepare(tree, out)
    before = _read_out(out)
    calls = []
    real_write = tfp._write

    def failing_write(path: Path, text: str) -> None:
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(tfp, "_write", failing_write)
    with pytest.raises(OSError):
        tfp.prepare(tree, out)
    assert len(calls) == 3 and _read_out(out) == before and _no_leftovers(tmp_path)
    calls.clear()
    with pytest.raises(OSError):
        tfp.prepare(tree, tmp_path / "new")
    assert not (tmp_path / "new").exists() and _no_leftovers(tmp_path)


def test_refuses_a_folder_it_did_not_write(tree: tf.Tree, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(TatrError, match="holds files prepare-text did not write"):
        tfp.prepare(tree, mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_too_small_task_is_one_line(tmp_path: Path) -> None:
    small = source_tree(make_tree(tmp_path / "src", riddles=50))  # 8 x 50 = 400 < 500
    with pytest.raises(
        TatrError, match=r"task en-genre: class riddles has 50 usable texts, .* hold 400 < 500; check riddles"
    ):
        tfp.prepare(small, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top = make_tree(tmp_path / "src")
    assert cli_main(["prepare-text", "--source", str(top), "--out", str(tmp_path / "out")]) == 0
    total = 8 * SPORTS + 4 * 8 * 150 + 4 * 300
    assert f"6 tasks, {total} texts" in capsys.readouterr().out
    assert cli_main(["prepare-text", "--source", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tatr: error: {tmp_path / 'nowhere'}: --source is not a folder"]
    assert cli_main(["prepare-text", "--source", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a fortunes tree" in capsys.readouterr().err


def test_no_packages_and_no_download_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tatr.cli import prepare_text

    monkeypatch.setattr(prepare_text, "installed_tree", lambda: None)
    failed = subprocess.CompletedProcess([], 100, "", "E: Unable to locate package fortunes-de")
    monkeypatch.setattr(prepare_text, "_run", lambda *a, **k: failed)
    assert cli_main(["prepare-text", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tatr: error: the fortunes packages are not installed")
    assert err.endswith("run: sudo apt-get install fortunes fortunes-de fortunes-es fortunes-it")
    assert not (tmp_path / "out").exists()


def test_license_summary() -> None:
    dep5 = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nLicense: GPL-2+\n"
    assert summarise_license(dep5 + "Files: debian/*\nLicense: GPL-2+\n") == "GPL-2+"
    bsd = "This program falls under the BSD copyright:\nRedistribution and use in source and binary forms, with"
    assert summarise_license(bsd) == "BSD-style (Regents of the University of California)"
    assert summarise_license("Consider this package freeware (public\ndomain).") == "texts stated to be public domain"
    assert summarise_license("nothing here") == "no license named; read the copyright file"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed (not a Debian system)")
def test_unpacked_debs_give_the_same_tasks(tree: tf.Tree, tmp_path: Path) -> None:
    """The `apt-get download` route without the network: real .debs built here, unpacked with dpkg-deb -x."""
    parts = {"fortunes": lambda r: "/" not in r, "fortunes-de": "de/", "fortunes-es": "es/", "fortunes-it": "it/"}
    debs = []
    for i, (name, keep) in enumerate(parts.items()):
        build = tmp_path / "build" / name
        for src in sorted(tree.folder.rglob("*")):
            rel = str(src.relative_to(tree.folder))
            if (src.is_file() or src.is_symlink()) and (keep(rel) if callable(keep) else rel.startswith(keep)):
                (build / FORTUNES / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, build / FORTUNES / rel, follow_symlinks=False)
        doc = build / "usr/share/doc" / name
        doc.mkdir(parents=True)
        (doc / "copyright").write_text("Files: *\nLicense: GPL-2+\n")
        (doc / "changelog.Debian.gz").write_bytes(gzip.compress(f"{name} (1.{i}-1) unstable; urgency=low\n".encode()))
        (build / "DEBIAN").mkdir()
        control = (
            f"Package: {name}\nVersion: 1.{i}-1\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: t\n"
        )
        (build / "DEBIAN" / "control").write_text(control)
        deb = tmp_path / f"{name}.deb"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(build), str(deb)],
            check=True,
            capture_output=True,
        )
        debs.append(deb)
    top = tmp_path / "unpacked"
    packages = unpack_debs(debs, top)
    assert [(p.name, p.version, p.license) for p in packages] == [
        (n, f"1.{i}-1", "GPL-2+") for i, n in enumerate(parts)
    ]
    tfp.prepare(tf.Tree(top / FORTUNES, "debs", packages), tmp_path / "from-debs")
    tfp.prepare(tree, tmp_path / "from-tree")
    data = {k: v for k, v in _read_out(tmp_path / "from-debs").items() if k != "DATA.md"}
    assert data == {k: v for k, v in _read_out(tmp_path / "from-tree").items() if k != "DATA.md"}
    # an unpacked root given with --source: versions from the changelogs
    assert [(p.name, p.version) for p in source_tree(top).packages] == [(p.name, p.version) for p in packages]


REAL = installed_tree()


@pytest.mark.skipif(REAL is None, reason="fortunes fortunes-min fortunes-de fortunes-es fortunes-it not all installed")
def test_real_packages(tmp_path: Path) -> None:
    assert REAL is not None
    out = tmp_path / "fortunes"
    tasks = tfp.prepare(REAL, out)
    assert len(tasks) >= 6
    for task in tasks:
        rows = _jsonl(out / f"{task.spec.name}.jsonl")
        counts = Counter(r["label"] for r in rows)
        assert len(counts) >= 4 and len(rows) >= 500 and len(set(counts.values())) == 1, task.spec.name
    # English = exactly the top-level files dpkg lists for fortunes and fortunes-min
    listing = subprocess.run(["dpkg-query", "-L", "fortunes", "fortunes-min"], capture_output=True, text=True).stdout
    shipped = {
        Path(p).name for p in listing.splitlines()
        if Path(p).parent == Path("/") / FORTUNES and not p.endswith((".dat", ".u8"))
    }  # fmt: skip
    assert set(tf.language_files(REAL, "en")) == shipped
    assert "computer" not in shipped and "computers" in shipped  # fortunes-it's link is not English
    off = {t for rel in tf.offensive_files(REAL) for t in tf.read_file(REAL.folder, rel).texts}
    assert off and not off & {r["text"] for p in out.glob("*.jsonl") for r in _jsonl(p)}
    versions = subprocess.run(["dpkg-query", "-W", "fortunes-de"], capture_output=True, text=True).stdout.split()[1]
    assert f"| fortunes-de | {versions} |" in (out / "DATA.md").read_text(encoding="utf-8")
