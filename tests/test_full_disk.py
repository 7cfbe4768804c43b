"""Writers on a disk that fills mid-write: one line naming the path, nothing partial left.

The free-space check (`check_output`) runs before the long work; a disk can still fill during it
(another job, a growing log). Then every writer (safetensors, matplotlib, pandas, plain files)
must give `tatr: error: <path>: cannot write (<reason>)`, not the library's traceback, and leave
no output file and no temporary behind.

The disk is a real one where the machine allows it, in this order:

* `tmpfs`: a small tmpfs mounted in a private mount namespace (`unshare --user --map-root-user
  --mount`, or `unshare --mount` as root), so nothing outside the test sees it; the disk is filled
  with a filler file at the chosen moment and writes fail with ENOSPC.
* `fsize`: where namespaces or mounts are refused (a container without CAP_SYS_ADMIN), the file
  size limit `RLIMIT_FSIZE` is lowered to 0 at that moment (SIGXFSZ ignored) and every write of a
  byte fails with EFBIG, for root too.

Both run tatr in a subprocess with the real libraries; nothing in a library is patched. The moment
the disk fills is chosen by wrapping one of tatr's own functions (e.g. the merge's planning, which
starts after the free-space check).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tatr.core.errors import TatrError

ROOT = Path(__file__).resolve().parents[1]
REASONS = {"tmpfs": "No space left on device", "fsize": "File too large"}

# Runs tatr's CLI with FULL_DISK filling at FULL_DISK_AT ("module:attribute", first call) or at
# once; prints what is left on the disk (the filler aside), then exits with the CLI's code.
CHILD = textwrap.dedent(
    """
    import errno, importlib, json, os, resource, signal, sys
    from pathlib import Path

    disk = Path(os.environ["FULL_DISK"])
    filler = disk / "filler"

    def fill():
        if os.environ["FULL_DISK_MECHANISM"] == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, bytes(1 << 16))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def fill_on_first_call(spec):
        module, _, attribute = spec.partition(":")
        owner = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        state = []

        def wrapper(*args, **kwargs):
            if not state:
                state.append(1)
                fill()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    if os.environ.get("FULL_DISK_AT"):
        fill_on_first_call(os.environ["FULL_DISK_AT"])
    else:
        fill()
    from tatr.cli import main

    code = main(sys.argv[1:])
    left = sorted(str(p.relative_to(disk)) + ("/" if p.is_dir() else "") for p in disk.rglob("*") if p != filler)
    print("LEFT " + json.dumps(left))
    sys.exit(code)
    """
)


@functools.cache
def tmpfs_command() -> list[str] | None:
    """The `unshare` prefix that mounts a private tmpfs here, or None when the machine refuses."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None
    candidates = [["unshare", "--user", "--map-root-user", "--mount"]]
    if os.geteuid() == 0:
        candidates.append(["unshare", "--mount"])
    probe = Path(os.environ.get("TMPDIR", "/tmp"))
    for prefix in candidates:
        try:
            proc = subprocess.run(
                [*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1" && touch "$1/x"', "sh", str(probe)],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return prefix
    return None


def mechanism(wanted: str) -> str:
    """`wanted`, or `fsize` where a tmpfs cannot be mounted (never a skip: CI must run these)."""
    return "tmpfs" if wanted == "tmpfs" and tmpfs_command() is not None else "fsize"


@dataclass
class Result:
    code: int
    err: str
    left: list[str]
    mechanism: str

    def one_line(self) -> str:
        assert "Traceback" not in self.err, self.err
        lines = self.err.strip().splitlines()
        assert self.code == 2 and len(lines) == 1 and lines[0].startswith("tatr: error: "), self.err
        return lines[0]


def run_on_full_disk(
    disk: Path, argv: list[str], *, wanted: str = "tmpfs", at: str = "", env: dict[str, str] | None = None
) -> Result:
    """Run `tatr argv` in a subprocess with `disk` full from the first call of `at` (or at once)."""
    how = mechanism(wanted)
    disk.mkdir(parents=True, exist_ok=True)
    child = disk.parent / "full_disk_child.py"
    child.write_text(CHILD)
    command = [sys.executable, str(child), *map(str, argv)]
    if how == "tmpfs":
        mount = 'mount -t tmpfs -o size=4m tmpfs "$1" && shift && exec "$@"'
        command = [*tmpfs_command(), "sh", "-c", mount, "sh", str(disk), *command]
    full_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": str(ROOT),
        "FULL_DISK": str(disk),
        "FULL_DISK_MECHANISM": how,
        "FULL_DISK_AT": at,
    }
    proc = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=600)
    marks = [line for line in proc.stdout.splitlines() if line.startswith("LEFT ")]
    assert marks, f"the child did not finish:\n{proc.stdout}\n{proc.stderr}"
    return Result(proc.returncode, proc.stderr, json.loads(marks[-1][5:]), how)


def files_left(result: Result) -> list[str]:
    """Files (not folders) left on the disk, temporaries included."""
    return [name for name in result.left if not name.endswith("/")]


# --- tatr merge ---------------------------------------------------------------------------------
@pytest.fixture()
def checkpoints(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
    paths = [tmp_path / "pre.safetensors"]
    save_file(pre, paths[0])
    for i in range(2):
        paths.append(tmp_path / f"ft{i}.safetensors")
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}, paths[-1])
    return paths


@pytest.mark.parametrize("wanted", ["tmpfs", "fsize"])
def test_merge_onto_a_disk_that_fills_after_the_check(tmp_path: Path, checkpoints: list[Path], wanted: str) -> None:
    disk = tmp_path / "disk"
    out = disk / "merged.safetensors"
    before = {p: p.read_bytes() for p in checkpoints}
    argv = ["merge", "-p", checkpoints[0], "-f", *checkpoints[1:], "--quiet", "-o", out]
    result = run_on_full_disk(disk, argv, wanted=wanted, at="tatr.cli.merge:merge_once")
    assert result.one_line() == f"tatr: error: {out}: cannot write ({REASONS[result.mechanism]})"
    assert result.left == []  # no output file, no temporary
    assert {p: p.read_bytes() for p in checkpoints} == before


# --- tatr report: tables (atomic_dir) and figures (matplotlib through atomic_write) --------------
@pytest.mark.parametrize(
    ("wanted", "at"),
    [
        ("tmpfs", "tatr.report.render:Table.to_markdown"),  # the first table, inside tables/ being built
        ("fsize", "tatr.report.render:Table.to_markdown"),
        ("fsize", "tatr.report.figures:save"),  # the first figure (png via Pillow)
    ],
)
def test_report_onto_a_disk_that_fills(tmp_path: Path, wanted: str, at: str) -> None:
    from report_fixtures import BENCHMARK, make_store

    make_store(tmp_path / "results", parts=("final", "mask-ratio"))
    disk = tmp_path / "disk"
    argv = ["report", "--root", tmp_path / "results", "--out", disk, "--published", tmp_path / "none.csv"]
    result = run_on_full_disk(disk, argv, wanted=wanted, at=at)
    line = result.one_line()
    reason = REASONS[result.mechanism]
    folder = disk / BENCHMARK
    if at.endswith("to_markdown"):
        assert line.startswith(f"tatr: error: {folder}/tables/") and line.endswith(f": cannot write ({reason})")
    else:
        assert line.startswith(f"tatr: error: {folder}/figures/") and line.endswith(f".png: cannot write ({reason})")
    assert files_left(result) == []
    assert not (tmp_path / "results" / BENCHMARK).exists()


# --- a cache folder (cached_dir): the tiny testbed's build --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("wanted", ["tmpfs", "fsize"])
def test_cache_build_onto_a_disk_that_fills(tmp_path: Path, wanted: str) -> None:
    disk = tmp_path / "disk"
    argv = ["evaluate", ROOT / "experiments" / "testbed.yaml", "suite.preset=tiny", "suite.progress=false"]
    env = {"TATR_CACHE": str(disk / "cache")}
    result = run_on_full_disk(disk, argv, wanted=wanted, at="tatr.suites.testbed.build:save_file", env=env)
    line = result.one_line()
    entry = disk / "cache" / "testbed"
    assert line.startswith(f"tatr: error: {entry}/"), line
    assert line.endswith(f": cannot write ({REASONS[result.mechanism]})"), line
    assert files_left(result) == []  # the half-built entry is gone


# --- the rule itself, on the errors real libraries raise ----------------------------------------
ENOSPC_ERRORS = [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EFBIG, "File too large"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    # safetensors 0.4 and 0.5+ (a SafetensorError is an Exception with the Rust io::Error's text)
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
    # pyarrow keeps errno but puts its own text in strerror
    OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
    RuntimeError("could not write: Disk quota exceeded"),
]


@pytest.mark.parametrize("exc", ENOSPC_ERRORS, ids=range(len(ENOSPC_ERRORS)))
def test_disk_failures_of_any_library_are_recognised(tmp_path: Path, exc: Exception) -> None:
    from tatr.core.outputs import write_failure

    failure = write_failure(exc, tmp_path / "out.bin")
    assert isinstance(failure, TatrError) and str(failure).startswith(f"{tmp_path / 'out.bin'}: cannot write (")


def test_the_chain_is_searched_and_bugs_stay_bugs(tmp_path: Path) -> None:
    from tatr.core.outputs import write_failure

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("the writer gave up") from inner
    except ValueError as outer:
        chained = outer
    assert str(write_failure(chained, tmp_path / "x")) == f"{tmp_path / 'x'}: cannot write (No space left on device)"
    for bug in (ValueError("bad shape"), OSError(errno.EBADF, "Bad file descriptor"), TatrError("user input")):
        assert write_failure(bug, tmp_path / "x") is None


def test_folders_name_the_file_as_it_would_be_and_leave_nothing(tmp_path: Path) -> None:
    from tatr.core.cache import cached_dir
    from tatr.core.outputs import atomic_dir

    def full(folder: Path) -> None:
        (folder / "a.txt").write_text("a")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "b.txt"))

    with pytest.raises(TatrError) as err, atomic_dir(tmp_path / "out") as tmp:
        full(tmp)
    assert str(err.value) == f"{tmp_path / 'out' / 'b.txt'}: cannot write (No space left on device)"
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC  # callers catching OSError still do
    with pytest.raises(TatrError) as err:
        cached_dir(tmp_path / "cache", "k", full)
    assert str(err.value) == f"{tmp_path / 'cache' / 'k' / 'b.txt'}: cannot write (No space left on device)"
    assert [str(p.relative_to(tmp_path)) for p in sorted(tmp_path.rglob("*"))] == ["cache"]
