"""A private PostgreSQL server on 127.0.0.1 for the tests that share one study between processes
(`tests/test_postgres.py`, `tests/test_sweep_twins.py`): import `postgres_url` into a test module.

The server is started with initdb/pg_ctl in a temporary folder (as the `postgres` user when the
tests run as root: PostgreSQL refuses to run as root), once per test module. Skipped only where no
PostgreSQL binaries exist; `.ci/run` installs them and sets TATR_REQUIRE_SERVICES=1, which turns
that skip into a failure (`tests/conftest.py`).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) + sorted(
        glob.glob("/usr/local/pgsql/bin/initdb")
    )
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bindir = pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine: apt-get install -y postgresql")
    folder = Path(tempfile.mkdtemp(prefix="tatr-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses root: run the server as the `postgres` user
        shutil.chown(folder, user="postgres", group="postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(*args: str | Path) -> None:
        out = subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log = (folder / "log").read_text() if (folder / "log").exists() else ""
            raise RuntimeError(f"{args[0]} failed: {out.stderr[-1500:]} {log[-1500:]}")

    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "tatr", "--no-sync", "-E", "UTF8")
    options = f"-h 127.0.0.1 -p {port} -k {folder} -F -c max_connections=60"
    run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", folder / "log", "-w", "-t", "60", "start")
    try:
        yield f"postgresql://tatr@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
