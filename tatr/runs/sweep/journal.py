"""The journal storage (`*.journal`, K workers on one machine): its lock and its repair.

Our own code, because Optuna has no equivalent for either:

* **Repair.** One JSON record per line, appended under a lock file. A writer killed in the middle
  of an append leaves a partial last line; Optuna skips it while it is last, but the next append
  is glued to it and from then on every read raises, so the study is unreadable forever.
  `recover_journal` drops such a record (and, for files damaged that way by older versions, cuts
  the partial prefix off the record glued to it) with one warning.
* **The lock** (`OwnedLock`) is Optuna's lock file `<journal>.lock`, created with O_EXCL like
  `JournalFileOpenLock`, so it excludes Optuna's own symlink lock too. It records its owner (host,
  pid, process start time): a lock left by a dead process on this host is broken at once instead
  of after Optuna's 30-second grace period, and a killed writer is exactly what leaves a lock
  behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError
from tatr.runs.sweep.owners import owner_dead, worker_identity

LOCK_GRACE_SECONDS = 30.0  # a lock whose owner is unknown (another host, Optuna's symlink lock)


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
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
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
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return False


def _salvage(line: bytes) -> bytes | None:
    """The complete record glued after a partial one (`<partial A><B>\\n`), or None."""
    start = line.find(b"{", 1)
    while start != -1:
        try:
            value = json.loads(line[start:])
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
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


# --- opening -------------------------------------------------------------------------------------
def open_journal(path: Path) -> Any:
    """An Optuna `JournalStorage` on `path` under `OwnedLock`, repaired first if a killed writer left it
    half-written."""
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
