"""Where tatr writes: atomic files, checked output paths, names from data kept inside their root.

Every file or folder tatr writes goes through here, so that five promises hold in one place:

* **Atomic.** A result appears complete or not at all: it is written to a temporary sibling and
  renamed into place.
* **Recognisable leftovers.** Temporaries are named `.tatr-tmp-<pid>-<name>.<random>`. They are
  removed on failure, on SIGINT and (through `install_signal_handlers`, which turns SIGTERM into
  an ordinary exit) on SIGTERM. Only SIGKILL can leave one behind; the next write into that folder
  removes leftovers whose process is gone (`sweep_leftovers`).
* **A full disk is one line.** A write that fails on the user's side (no space, a quota, a file
  size limit, a read-only or forbidden folder) is reported as `<path>: cannot write (<reason>)`,
  whichever library wrote: `write_failure` finds the errno in an `OSError` anywhere in the
  exception's chain or in a library's own message (safetensors' `os error 28`). It holds when the
  disk fills during the write, after the free-space check passed, and the temporaries are removed
  as on any failure, so nothing partial is left. Every writer goes through `atomic_write`,
  `atomic_dir` or `tatr.core.cache.cached_dir`, which apply it (`writing` names one file among
  several written in one block); other failures stay tracebacks: they are bugs.
* **Inputs are never overwritten.** `check_output` compares resolved files, not strings, and runs
  before the long work, as do the checks for a folder given as a file, a read-only folder and a
  full disk.
* **Names read from data stay inside their root** (`safe_name`, `inside`): a store row saying
  `benchmark: ../victim` gets one line, not a deleted folder.
"""

from __future__ import annotations

import contextlib
import errno
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
        raise WriteFailed(path.parent, exc.errno or 0, exc.strerror or str(exc), "cannot write here") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(path, tmp_path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    _mkdir(path.parent)
    sweep_leftovers(path.parent)
    tmp = make_tmp_dir(path)
    try:
        with writing(path, tmp):
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


def make_tmp_dir(path: Path) -> Path:
    """A temporary folder beside `path` for building it; a folder refusing it is one line."""
    try:
        return Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name), dir=path.parent))
    except OSError as exc:
        raise WriteFailed(path.parent, exc.errno or 0, exc.strerror or str(exc), "cannot write here") from None


# --- write failures: the user's disk, not a bug ---------------------------------------------------
# No space, a quota, a file size limit (`ulimit -f`, FAT32), a read-only or forbidden place.
_USER_ERRNOS = frozenset({errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})
# How libraries that wrap the OSError quote its errno: Rust's io::Error (safetensors) as
# "os error 28" or "Os { code: 28, kind: StorageFull, .. }", C++ and C libraries as "[errno 28]".
_ERRNO_TEXT = re.compile(r"\b(?:os error|code:|errno)\s*(\d+)", re.IGNORECASE)
_STRERROR = {os.strerror(code).lower(): code for code in _USER_ERRNOS}


class WriteFailed(TatrError, OSError):
    """A write refused by the disk (full, over quota or a size limit, read-only, forbidden).

    One line for the CLI (a `TatrError`), and still an `OSError` with the errno and the file, so
    code that caught the library's `OSError` before catches this too.
    """

    def __init__(self, path: str | Path, code: int, reason: str | None = None, what: str = "cannot write") -> None:
        super().__init__(code, reason or os.strerror(code), str(path))
        self.path, self.what = Path(path), what

    def __str__(self) -> str:
        return f"{self.path}: {self.what} ({self.strerror})"

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.errno, self.strerror, self.what)

    def moved(self, tmp: Path, final: Path) -> WriteFailed | None:
        """The same failure named by the path it would have had: `tmp/...` becomes `final/...`."""
        where = _relocate(self.path, tmp, final)
        return None if where is None else WriteFailed(where, self.errno, self.strerror, self.what)


def disk_errno(exc: BaseException) -> int | None:
    """The user-side errno behind `exc`, from any library, or None when the disk is not the cause.

    Looked for in every exception of the chain (`__cause__`, `__context__`): an `OSError`'s errno,
    an errno quoted in a message (`os error 28`, `code: 28`, `[errno 28]`), or its `strerror` text.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen or isinstance(item, TatrError):
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in _USER_ERRNOS:
            return item.errno
        text = str(item)
        for match in _ERRNO_TEXT.finditer(text):
            if int(match.group(1)) in _USER_ERRNOS:
                return int(match.group(1))
        lowered = text.lower()
        for message, code in _STRERROR.items():
            if message in lowered:
                return code
        stack += [item.__context__, item.__cause__]
    return None


def write_failure(exc: BaseException, path: str | Path, tmp: Path | None = None) -> TatrError | None:
    """The one-line error for `exc` raised while writing `path`, or None when it is not the disk's.

    The one owner of the rule "a write failure is the user's disk, not a bug" (`disk_errno`). The
    line names `path`, or the file the error names; a file inside `tmp` (the temporary folder being
    built into `path`) is named as it would be inside `path`. A `WriteFailed` from a nested writer
    is renamed the same way; any other `TatrError`, and every other failure, is left as it is.
    """
    path = Path(path)
    if isinstance(exc, WriteFailed):
        return exc.moved(tmp, path) if tmp is not None else None
    if isinstance(exc, TatrError) or not isinstance(exc, Exception):
        return None
    code = disk_errno(exc)
    if code is None:
        return None
    named = exc.filename if isinstance(exc, OSError) else None
    if isinstance(named, str | bytes | os.PathLike) and tmp is not None:
        named = Path(os.fsdecode(named))
        inside_tmp = _relocate(named, tmp, path)
        if inside_tmp is None and named != path:  # a file outside what is being written: a read, most likely
            return TatrError(f"{named}: {os.strerror(code)}")
        path = inside_tmp or path
    return WriteFailed(path, code)


@contextlib.contextmanager
def writing(path: str | Path, tmp: Path | None = None) -> Iterator[None]:
    """Turn a disk-side failure in the block (`write_failure`) into one line naming `path`.

    A library's error rarely names its file, so a failure is put down to the innermost writer
    around it: a block that holds several writers (`with atomic_dir(a) as d, atomic_write(b) as
    t:` writing files into `d`) wraps each write in `writing(<its file>)` to be named right.
    """
    try:
        yield
    except Exception as exc:
        failure = write_failure(exc, path, tmp)
        if failure is None:
            raise
        raise failure from exc


def _relocate(where: Path, tmp: Path | None, final: Path) -> Path | None:
    """`where` inside `tmp` as the same path inside `final`; None when it is not inside `tmp`."""
    if tmp is None:
        return None
    if where == tmp:
        return final
    try:
        return final / where.relative_to(tmp)
    except ValueError:
        return None


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
