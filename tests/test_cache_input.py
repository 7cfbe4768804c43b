"""Caches in a careless state: wrong-typed manifests, entries that are files or links, TATR_CACHE a file.

A corrupted entry is rebuilt (to the same bytes, by the same build); only a cache location that
cannot hold folders is a one-line error. Nothing outside the cache is touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tatr.core.cache import MANIFEST, cached_dir, default_cache_root, verify_dir
from tatr.core.errors import TatrError

REPO = Path(__file__).resolve().parents[1]


class Builder:
    """A build that writes two files and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        (folder / "sub").mkdir()
        (folder / "a.bin").write_bytes(b"alpha")
        (folder / "sub" / "b.bin").write_bytes(b"beta")


def built(root: Path) -> tuple[Path, Builder]:
    build = Builder()
    entry = cached_dir(root, "k1", build)
    assert build.calls == 1
    return entry, build


def contents(entry: Path) -> dict[str, bytes]:
    return {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("*.bin"))}


@pytest.mark.parametrize(
    "manifest",
    [
        "[1, 2, 3]",
        '"a.bin"',
        "42",
        "null",
        '{"a.bin": 5}',
        '{"a.bin": ["x"]}',
        '{"": "00"}',
        '{"../outside.bin": "00"}',
        '{"/etc/hostname": "00"}',
        "[" * 100_000,
        "\udcff",
    ],
)
def test_a_wrong_typed_manifest_is_rebuilt(tmp_path: Path, manifest: str) -> None:
    entry, build = built(tmp_path / "cache")
    (entry / MANIFEST).write_bytes(manifest.encode("utf-8", "surrogateescape"))
    assert not verify_dir(entry)
    again = cached_dir(tmp_path / "cache", "k1", build)
    assert build.calls == 2 and again == entry
    assert contents(again) == {"a.bin": b"alpha", "sub/b.bin": b"beta"} and verify_dir(again)


def test_a_manifest_naming_a_file_outside_the_entry_does_not_verify(tmp_path: Path) -> None:
    """Even with the right digest: an entry vouches only for its own files."""
    entry, _ = built(tmp_path / "cache")
    outside = tmp_path / "cache" / "elsewhere.bin"
    outside.write_bytes(b"alpha")
    digests = json.loads((entry / MANIFEST).read_text())
    digests["../elsewhere.bin"] = digests["a.bin"]
    (entry / MANIFEST).write_text(json.dumps(digests))
    assert not verify_dir(entry)
    assert outside.read_bytes() == b"alpha"


def test_an_entry_that_is_a_file_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "k1").write_text("not a folder")
    build = Builder()
    entry = cached_dir(root, "k1", build)
    assert build.calls == 1 and entry.is_dir() and contents(entry)["a.bin"] == b"alpha"


def test_an_entry_that_is_a_link_is_replaced_and_its_target_kept(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (root / "k1").symlink_to(elsewhere, target_is_directory=True)
    build = Builder()
    entry = cached_dir(root, "k1", build)
    assert build.calls == 1 and not entry.is_symlink() and contents(entry)["a.bin"] == b"alpha"
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "mine"


def test_a_file_on_the_way_to_the_cache_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    with pytest.raises(TatrError, match="the cache needs a folder here, but this is a file") as info:
        cached_dir(blocker / "gradients", "k1", Builder())
    assert str(info.value).startswith(str(blocker)) and "\n" not in str(info.value)
    assert blocker.read_text() == "a file"


def test_tatr_cache_pointing_at_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "oops.txt"
    target.write_text("x")
    monkeypatch.setenv("TATR_CACHE", str(target))
    with pytest.raises(TatrError, match=r"TATR_CACHE=.*oops\.txt: not a folder"):
        default_cache_root()
    monkeypatch.setenv("TATR_CACHE", "")  # empty: the default, not the current folder
    assert default_cache_root() == Path.home() / ".cache" / "tatr"
    monkeypatch.setenv("TATR_CACHE", str(tmp_path / "new"))  # not there yet: fine, created on first write
    assert default_cache_root() == tmp_path / "new"


def test_tatr_cache_a_file_through_the_cli(tmp_path: Path) -> None:
    target = tmp_path / "oops.txt"
    target.write_text("x")
    env = {"PATH": "/usr/bin:/bin", "TATR_CACHE": str(target), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "tatr", "evaluate", str(REPO / "experiments" / "testbed.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("tatr: error: TATR_CACHE=") and "\n" not in err and "Traceback" not in err
    assert target.read_text() == "x"
