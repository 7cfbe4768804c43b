"""Optuna storages for `tatr sweep`: resolved URLs, opened with one-line errors, and what happens
to a trial found dead.

* **SQLite** (the default, one machine): checked with `PRAGMA quick_check` before SQLAlchemy sees
  it, so garbage bytes or a truncated file give one line naming the file, not a traceback.
* **Journal** (`*.journal`, K workers on one machine): opened by `tatr.runs.sweep.journal`, which
  repairs what a killed writer left and breaks a dead process's lock at once.
* **PostgreSQL** (several machines): a bad or unreachable URL gives one line after a few seconds,
  not after retries meant for workers racing on schema creation.

Dead workers on other machines are Optuna's own business: RDB storages are opened with heartbeats
(`heartbeat_interval`, `grace_period`) and `RetryHeartbeatStaleTrialCallback` (formerly
`RetryFailedTrialCallback`), so a trial whose worker stopped beating is failed and re-created with
its parameters by whichever process looks next (`optuna.storages.fail_stale_trials`, called by
`study.optimize` and by `tatr.runs.sweep.study.fail_dead_trials`). The same callback re-creates
the trials that same-host PID checks find dead, so a retry looks the same whoever found it.

This module imports no other part of the sweep: `tatr dashboard` needs only this one.
"""

from __future__ import annotations

import copy
import functools
import os
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError
from tatr.runs.sweep.journal import open_journal

_MOVE = "move it away or give another --storage"
MAX_RETRIES = 2  # a trial whose worker died is retried at most twice (per original trial)


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
            "heartbeat_stale_trial_callback": retry_dead_trial,
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
            # two sweeps started at once create the schema together: the loser sees "table … already
            # exists" (or SQLite's lock) and finds the winner's schema on the next try
            racing = any(words in str(exc) for words in ("already exists", "database is locked"))
            if not racing and (attempt >= 2 or url.startswith("sqlite")):
                break
            time.sleep(0.5 * (attempt + 1) if racing else 1.0)
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


def retry_dead_trial(study: Any, trial: Any) -> None:
    """Re-create a trial whose worker died, with its parameters, as Optuna's retry callback does.

    `RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)` adds a WAITING copy (same parameters
    and distributions, `retry_history` in its system attributes). The copy gets the failed trial's
    user attributes less its dead worker's signature (a live worker signs it when it starts it;
    until then nobody must take it for dead) and with `retry_of`, the number of the trial it
    replaces, so the dashboard's table says which trial it retries. A trial that died before its
    parameters were chosen has nothing to retry.
    """
    import optuna

    if not trial.params:
        return
    view = copy.copy(trial)
    attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
    view.user_attrs = {**attrs, "retry_of": trial.number}
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if retry is None:  # Optuna before 4.9
            retry = optuna.storages.RetryFailedTrialCallback
        retry(max_retry=MAX_RETRIES)(study, view)
