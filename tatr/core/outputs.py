"""Where tatr writes: atomic files, checked output paths, names from data kept inside their root.

Every file or folder tatr writes goes through here, so that four promises hold in one place:

* **Atomic.** A result appears complete or not at all: it is written to a temporary sibling and
  renamed into place.
* **Recognisable leftovers.** Temporaries are named `.tatr-tmp-<pid>-<name>.<random>`. They are
  removed on failure, on SIGINT and (through `install_signal_handlers`, which turns SIGTERM into
  an ordinary exit) on SIGTERM. Only SIGKILL can leave one behind; the next write into that folder
  removes leftovers whose process is gone (`sweep_leftovers`).
* **Inputs are never overwritten.** `check_output` compares resolved files, not strings, and runs
  before the long work, as do the checks for a folder given as a file, a read-only folder and a
  full disk.
* **Names read from data stay inside their root** (`safe_name`, `inside`): a store row saying
  `benchmark: ../victim` gets one line, not a deleted folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tatr.core.errors import TatrError

TMP_PREFIX = ".tatr-tmp-"
_LEFTOVER = re.compile(re.escape(TMP_PREFIX) + r"(?P<host>[A-Za-z0-9_.]*)-(?P<pid>\d+)-")
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:32]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,@-]{0,127}$")


def tmp_prefix(name: str) -> str:
    return f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{name[:60]}."


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove temporaries in `folder` left by a killed tatr process on this host; return them.

    A temporary whose process still runs (or that another host wrote, on a shared disk) is kept.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None or match.group("host") != _HOST or _alive(int(match.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    _mkdir(path.parent)
    sweep_leftovers(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=suffix or ".tmp", dir=path.parent)
    except OSError as exc:
        raise TatrError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in _USER_ERRNOS:
            raise TatrError(f"{path}: cannot write ({exc.strerror})") from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    _mkdir(path.parent)
    sweep_leftovers(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name), dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name + ".old"), dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_USER_ERRNOS = {13, 28, 30, 122}  # EACCES, ENOSPC, EROFS, EDQUOT


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TatrError(f"{folder}: exists and is not a folder") from None
    except OSError as exc:
        raise TatrError(f"{folder}: cannot create this folder ({exc.strerror})") from None


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` name one file: same inode if both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_output(
    out: str | Path,
    inputs: Iterable[str | Path] = (),
    *,
    suffix: str | None = None,
    need_bytes: int = 0,
    flag: str = "--out",
) -> Path:
    """Refuse a bad output location before any long work; one line per problem.

    Refused: an output that is one of the inputs (by inode or resolved path, so `./a`, `a` and a
    symlink to `a` are the same file), a folder, a wrong suffix, a missing, read-only or
    non-folder parent, and a disk with less than `need_bytes` free. Nothing is left behind: the
    writability probe is a temporary file removed at once.
    """
    out = Path(out).expanduser()
    if suffix is not None and out.suffix != suffix:
        raise TatrError(f"{out}: {flag} must end in {suffix}")
    if out.is_dir():
        raise TatrError(f"{out}: {flag} is a folder; give a file name inside it")
    for item in inputs:
        if same_file(out, Path(item).expanduser()):
            raise TatrError(f"{out}: {flag} is also an input ({item}); choose another output file")
    parent = out.parent
    if not parent.exists():
        raise TatrError(f"{parent}: output folder does not exist")
    if not parent.is_dir():
        raise TatrError(f"{parent}: not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=tmp_prefix("probe"), dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TatrError(f"{parent}: cannot write here ({exc.strerror})") from None
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise TatrError(
                f"{parent}: {free / 2**20:,.0f} MiB free, but the output needs about {need_bytes / 2**20:,.0f} MiB"
            )
    return out


def safe_name(value: object, what: str) -> str:
    """A name read from data (benchmark, study, run id, task) that is safe as one path component."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise TatrError(
            f"{what} {value!r} is not a safe name (letters, digits and _.+=,@- only, at most 128, no leading dot)"
        )
    return value


def inside(root: Path, *parts: str) -> Path:
    """`root/parts...`, refused with one line if it would leave `root` (symlinks resolved)."""
    root_resolved = Path(root).resolve()
    path = Path(root).joinpath(*parts)
    resolved = path.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise TatrError(f"{path}: leaves {root}; refusing to write there")
    return path


def install_signal_handlers() -> None:
    """Make SIGTERM unwind like SIGINT, so every `finally` removes its temporaries."""

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _terminate)
