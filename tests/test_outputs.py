"""Where tatr writes: inputs never overwritten, outputs checked first, leftovers recognisable and swept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tatr.core.errors import TatrError
from tatr.core.outputs import (
    TMP_PREFIX,
    atomic_dir,
    atomic_write,
    check_output,
    inside,
    safe_name,
    sweep_leftovers,
    tmp_prefix,
)


def test_output_equal_to_an_input_is_refused_by_file_not_string(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"x")
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    for out in (src, tmp_path / "." / "a.safetensors", link, tmp_path / "sub" / ".." / "a.safetensors"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(TatrError, match="also an input"):
            check_output(out, [src], suffix=".safetensors")
    hard = tmp_path / "hard.safetensors"
    os.link(src, hard)
    with pytest.raises(TatrError, match="also an input"):
        check_output(hard, [src])
    assert check_output(tmp_path / "b.safetensors", [src], suffix=".safetensors") == tmp_path / "b.safetensors"


@pytest.mark.parametrize("case", ["folder", "no-parent", "parent-is-file", "suffix", "disk"])
def test_bad_output_locations_get_one_line_and_leave_nothing(tmp_path: Path, case: str) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    out, kwargs = {
        "folder": (tmp_path / "dir.safetensors", {}),
        "no-parent": (tmp_path / "missing" / "o.safetensors", {}),
        "parent-is-file": (tmp_path / "file" / "o.safetensors", {}),
        "suffix": (tmp_path / "o.pt", {"suffix": ".safetensors"}),
        "disk": (tmp_path / "o.safetensors", {"need_bytes": 1 << 60}),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TatrError) as err:
        check_output(out, **kwargs)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_read_only_folder_is_refused(tmp_path: Path) -> None:
    # /proc refuses new files even to root (CI runs as root, which ignores a folder's mode bits)
    ro = Path("/proc/self")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
    with pytest.raises(TatrError, match="cannot write here"):
        check_output(ro / "o.safetensors")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        assert tmp.name.startswith(TMP_PREFIX)
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and target.read_text() == "whole"


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError
    assert (target / "a").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def _writer(tmp_path: Path, hold: str) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import sys, time
        from tatr.core.outputs import atomic_write, install_signal_handlers
        install_signal_handlers()
        with atomic_write({str(tmp_path / "out.bin")!r}) as tmp:
            tmp.write_bytes(b"x" * 1000)
            print("ready", flush=True)
            time.sleep({hold})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_remove_temporaries(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _writer(tmp_path, "60")
    assert any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())
    proc.send_signal(sig)
    proc.wait(timeout=90)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftover_is_recognisable_and_swept_by_the_next_write(tmp_path: Path) -> None:
    proc = _writer(tmp_path, "60")
    proc.kill()
    proc.wait(timeout=30)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(leftovers) == 1 and str(proc.pid) in leftovers[0].name
    mine = tmp_path / f"{tmp_prefix('x')}tmp"  # a temporary of a live process (this one) is kept
    mine.write_text("in use")
    with atomic_write(tmp_path / "next.txt") as tmp:
        tmp.write_text("ok")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers[0].name not in names
    assert names == sorted(["next.txt", mine.name])
    assert sweep_leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", ["../victim", "..", ".", "a/b", "/abs", "", ".hidden", "x\x00y", 3, None, "a" * 200])
def test_unsafe_names_from_data_are_refused(bad: object) -> None:
    with pytest.raises(TatrError, match="not a safe name"):
        safe_name(bad, "benchmark")


def test_safe_names_pass_and_inside_refuses_escapes(tmp_path: Path) -> None:
    assert safe_name("clip8-ViT-B-32_run.1", "study") == "clip8-ViT-B-32_run.1"
    root = tmp_path / "results"
    root.mkdir()
    assert inside(root, "testbed", "tables") == root / "testbed" / "tables"
    with pytest.raises(TatrError, match="leaves"):
        inside(root, "..", "victim")
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(TatrError, match="leaves"):
        inside(root, "link", "victim")
