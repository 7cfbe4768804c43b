"""Who runs where: a process's identity (host, pid, start time) and whether it still runs.

Our own code, because Optuna has no equivalent: its heartbeats (RDB storages only) need a grace
period of missed beats before a trial counts as dead, while on this host the kernel can say at
once whether the recorded process lives. The start time tells a reused pid from its first owner.
Used by the journal lock (`tatr.runs.sweep.journal`) and by dead-worker recovery
(`tatr.runs.sweep.workers`).
"""

from __future__ import annotations

import os
import socket
from typing import Any


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
    """True only for a recorded owner on this host whose process is gone (another host: unknown)."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    try:
        return not process_alive(int(owner["pid"]), float(owner["started"]))
    except (KeyError, TypeError, ValueError):
        return False
