"""Optuna storages for `tatr sweep`: resolved URLs, opened with one-line errors, repaired when a
killed writer left them half-written.

* **SQLite** (the default, one machine): checked with `PRAGMA quick_check` before SQLAlchemy sees
  it, so garbage bytes or a truncated file give one line naming the file, not a traceback.
* **Journal** (`*.journal`, K workers on one machine): one JSON record per line, appended under a
  lock file. A writer killed in the middle of an append leaves a partial last line; Optuna skips
  it while it is last, but the next append is glued to it and from then on every read raises, so
  the study is unreadable forever. `recover_journal` drops such a record (and, for files damaged
  that way by older versions, cuts the partial prefix off the record glued to it) with one warning.
* **PostgreSQL** (several machines): a bad or unreachable URL gives one line after a few seconds,
  not after retries meant for workers racing on schema creation.

The journal lock (`OwnedLock`) is Optuna's lock file `<journal>.lock`, created with O_EXCL like
`JournalFileOpenLock`, so it excludes Optuna's own symlink lock too. It records its owner (host,
pid, process start time): a lock left by a dead process on this host is broken at once instead of
after Optuna's 30-second grace period, and a killed writer is exactly what leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError

_MOVE = "move it away or give another --storage"
LOCK_GRACE_SECONDS = 30.0  # a lock whose owner is unknown (another host, Optuna's symlink lock)


# --- URLs ------------------------------------------------------------------------------------------
def storage_url(storage: str | None, results: Path, workers: int) -> str:
    """Canonical storage URL: SQLite under results/ by default, a journal file for K workers."""
    if storage is None:
        if workers > 1:
            return f"journal:{(results / 'optuna.journal').resolve()}"
        return f"sqlite:///{(results / 'optuna.db').resolve()}"
    if storage.startswith("sqlite:///"):
        return f"sqlite:///{Path(storage[len('sqlite:///') :]).resolve()}"
    if storage.startswith("journal:"):
        return f"journal:{Path(storage[len('journal:') :]).resolve()}"
    if "://" in storage:
        return storage
    path = Path(storage)
    if path.suffix in (".journal", ".log"):
        return f"journal:{path.resolve()}"
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return f"sqlite:///{path.resolve()}"
    raise TatrError(
        f"--storage: '{storage}' is neither a URL (sqlite:///FILE, postgresql://USER@HOST:PORT/DB) "
        "nor a .db or .journal file"
    )


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for printing."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


# --- processes -------------------------------------------------------------------------------------
def worker_identity() -> dict[str, Any]:
    """Who this process is, so a later start on this host can tell whether it still runs."""
    import psutil

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def process_alive(pid: int, started: float) -> bool:
    """True if `pid` runs and is the process that started at `started` (not a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def owner_dead(owner: Any) -> bool:
    """True only for a recorded owner on this host whose process is gone."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    try:
        return not process_alive(int(owner["pid"]), float(owner["started"]))
    except (KeyError, TypeError, ValueError):
        return False


# --- the journal lock ------------------------------------------------------------------------------
class OwnedLock:
    """Optuna's `<journal>.lock`, created with O_EXCL and holding its owner's identity (see module).

    It has the two methods `JournalFileBackend` calls (`acquire`, `release`) of Optuna's
    `BaseJournalFileLock`, which is not exported and is not checked for.
    """

    def __init__(self, journal: str | Path) -> None:
        self.lock_file = f"{journal}.lock"
        self._owner = json.dumps(worker_identity())

    def acquire(self) -> bool:
        sleep, seen_mtime, since = 0.001, None, time.monotonic()
        while True:
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner(self.lock_file)
                if owner_dead(owner):
                    self._break(owner)
                    continue
                try:
                    mtime = os.lstat(self.lock_file).st_mtime
                except FileNotFoundError:
                    continue
                if mtime != seen_mtime:
                    seen_mtime, since = mtime, time.monotonic()
                elif time.monotonic() - since > LOCK_GRACE_SECONDS:
                    self._break(owner)
                    continue
                time.sleep(sleep)
                sleep = min(2 * sleep, 0.1)
                continue
            try:
                os.write(fd, self._owner.encode())
            finally:
                os.close(fd)
            return True

    def release(self) -> None:
        moved = f"{self.lock_file}{uuid.uuid4()}.rename"
        try:
            os.rename(self.lock_file, moved)
        except OSError:
            raise RuntimeError(f"{self.lock_file}: not held") from None
        os.unlink(moved)

    @staticmethod
    def _read_owner(path: str) -> Any:
        """The owner recorded in a lock file; None for Optuna's symlink lock or a half-written one."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            return json.loads(os.read(fd, 4096) or b"null")
        except ValueError:
            return None
        finally:
            os.close(fd)

    def _break(self, expected: Any) -> None:
        """Remove a dead owner's lock. If another process broke it and locked again in between, the
        lock moved aside is not the one judged dead: it is put back."""
        moved = f"{self.lock_file}{uuid.uuid4()}.rename"
        try:
            os.rename(self.lock_file, moved)
        except FileNotFoundError:
            return
        if expected is not None and self._read_owner(moved) != expected:
            with contextlib.suppress(OSError):
                os.link(moved, self.lock_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(moved)


# --- journal recovery ------------------------------------------------------------------------------
def _record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _salvage(line: bytes) -> bytes | None:
    """The complete record glued after a partial one (`<partial A><B>\\n`), or None."""
    start = line.find(b"{", 1)
    while start != -1:
        try:
            value = json.loads(line[start:])
        except ValueError:
            value = None
        if isinstance(value, dict) and "op_code" in value:
            return line[start:]
        start = line.find(b"{", start + 1)
    return None


def repair_journal_bytes(data: bytes, path: Path) -> tuple[bytes, list[str]]:
    """The journal without the partial records a killed writer left, and what was done.

    A record that is not the last one and cannot be salvaged means other damage: one line error.
    """
    lines = data.splitlines(keepends=True)
    kept: list[bytes] = []
    notes: list[str] = []
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if line.endswith(b"\n") and _record(line):
            kept.append(line)
        elif last:
            what = "partial" if not line.endswith(b"\n") else "undecodable"
            notes.append(f"dropped a {what} last record ({len(line)} bytes, line {number}) left by a killed writer")
        else:
            salvaged = _salvage(line)
            if salvaged is None:
                raise TatrError(
                    f"{path}: line {number} is not a journal record; the file is damaged beyond a killed "
                    "writer's partial record (restore a copy or give another --storage)"
                )
            kept.append(salvaged)
            notes.append(f"cut a partial record off line {number} ({len(line) - len(salvaged)} bytes)")
    return b"".join(kept), notes


def recover_journal(path: Path, lock: OwnedLock) -> list[str]:
    """Repair `path` in place if a killed writer left it half-written; return the notes (warned).

    Safe beside live writers: the file is read without the lock first (cheap, the common case is
    clean), and repaired only under the journal's own lock, after reading it again. Optuna appends
    only under that lock, so while we hold it no append is in flight and an unterminated last line
    can only be a dead writer's. A tail cut is one `truncate`; a repair inside the file (older
    damage) writes a temporary sibling and renames it over the journal.
    """
    try:
        if not path.is_file() or _clean(path.read_bytes()):
            return []
        with _held(lock):
            data = path.read_bytes()
            fixed, notes = repair_journal_bytes(data, path)
            if fixed != data:
                if data.startswith(fixed):
                    os.truncate(path, len(fixed))
                else:
                    from tatr.core.outputs import atomic_write

                    with atomic_write(path) as tmp:
                        tmp.write_bytes(fixed)
                        os.chmod(tmp, path.stat().st_mode & 0o777)
    except OSError as exc:
        raise TatrError(f"{path}: cannot read or repair this journal ({exc.strerror or exc})") from None
    for note in notes:
        warnings.warn(f"{path}: {note}", RuntimeWarning, stacklevel=3)
    return notes


def _clean(data: bytes) -> bool:
    return (not data or data.endswith(b"\n")) and all(_record(line) for line in data.splitlines())


@contextlib.contextmanager
def _held(lock: OwnedLock) -> Any:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --- SQLite ----------------------------------------------------------------------------------------
def _sqlite_connect(path: str) -> Any:
    """SQLite in WAL mode with synchronous=NORMAL: a commit no longer waits for an fsync.

    A trial makes ~25 small commits; with the default rollback journal each one fsyncs (~10 ms on
    a busy disk, a quarter of a toy trial). WAL+NORMAL stays consistent across a killed process
    (only a power loss can drop the last commits) and lets readers (the dashboard) run alongside.
    """
    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def check_sqlite(path: Path) -> None:
    """One line naming the file for anything that is not a sound SQLite database (or absent)."""
    if path.is_dir():
        raise TatrError(f"{path}: is a folder, not an SQLite storage file")
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        conn = sqlite3.connect(str(path), timeout=60)
        try:
            result = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise TatrError(f"{path}: not a readable SQLite database ({exc}); {_MOVE}") from None
    if result != [("ok",)]:
        first = result[0][0] if result else "no answer"
        raise TatrError(f"{path}: damaged SQLite database (quick_check: {first}); {_MOVE}")


# --- opening ---------------------------------------------------------------------------------------
def heartbeat_interval() -> int:
    """Seconds between heartbeats of a running trial (RDB storages); `TATR_HEARTBEAT` overrides."""
    try:
        return max(1, int(os.environ.get("TATR_HEARTBEAT", "20")))
    except ValueError:
        raise TatrError("TATR_HEARTBEAT must be a whole number of seconds") from None


def open_journal(path: Path) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TatrError(f"{path.parent}: cannot create this folder ({exc.strerror})") from None
    if path.is_dir():
        raise TatrError(f"{path}: is a folder, not a journal file")
    lock = OwnedLock(path)
    recover_journal(path, lock)
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    except OSError as exc:
        raise TatrError(f"{path}: cannot open this journal ({exc.strerror or exc})") from None
    except Exception as exc:  # a record Optuna cannot replay: JSON of the wrong shape
        raise TatrError(f"{path}: not an Optuna journal ({type(exc).__name__}: {exc})") from None


def open_storage(url: str, heartbeat: bool = True) -> Any:
    """An Optuna storage for `url`; RDB schemas are created here, retried if another process races."""
    import optuna
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

    if url.startswith("journal:"):
        return open_journal(Path(url[len("journal:") :]))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TatrError(f"{path.parent}: cannot create this folder ({exc.strerror})") from None
        check_sqlite(path)
        engine_kwargs: dict[str, Any] = {"creator": functools.partial(_sqlite_connect, str(path))}
    else:
        from sqlalchemy.engine import make_url

        try:
            make_url(url)
        except (ArgumentError, ValueError) as exc:  # e.g. a port that is not a number
            raise TatrError(f"storage {redact(url)}: not a valid database URL ({_first_line(exc)})") from None
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith("postgres"):
            engine_kwargs["connect_args"] = {"connect_timeout": 5}
    interval = heartbeat_interval()
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": interval,
            "grace_period": 3 * interval,
            "heartbeat_stale_trial_callback": _retry_callback,
        }
    last: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                try:
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
                except TypeError:  # Optuna before the callback's rename
                    if "heartbeat_stale_trial_callback" not in kwargs:
                        raise
                    kwargs["failed_trial_callback"] = kwargs.pop("heartbeat_stale_trial_callback")
        except (ArgumentError, NoSuchModuleError) as exc:  # a malformed URL or an unknown database
            raise TatrError(f"storage {redact(url)}: {_first_line(exc)}") from None
        except OperationalError as exc:  # cannot connect: a server starting gets a few seconds, no more
            last = exc
            if attempt >= 2 or url.startswith("sqlite"):
                break
            time.sleep(1.0)
        except SQLAlchemyError as exc:  # concurrent schema creation
            last = exc
            time.sleep(0.5 * (attempt + 1))
        except ImportError as exc:
            cause = exc.__cause__ or exc
            hint = " (for PostgreSQL: pip install 'psycopg[binary]')" if url.startswith("postgres") else ""
            raise TatrError(f"storage {redact(url)}: missing database driver: {cause}{hint}") from None
    raise TatrError(f"storage {redact(url)}: cannot open ({_first_line(last)})")


def _first_line(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split("\n")[:2]) if exc is not None else "unknown error"
    return text.replace("\r", " ").strip()[:300]


def _retry_callback(study: Any, trial: Any) -> None:
    from tatr.runs.sweep.workers import retry_failed_trial

    retry_failed_trial(study, trial)
