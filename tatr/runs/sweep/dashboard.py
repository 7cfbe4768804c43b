"""optuna-dashboard on a sweep's storage: the same storage resolution as `tatr sweep`.

Loopback by default, because the dashboard can rename and delete studies and has no login.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

from tatr.core.errors import TatrError
from tatr.runs.sweep.storage import open_storage, redact, storage_url


def default_storage(root: Path) -> str:
    """The sweep's default storage under `root`: optuna.db, else optuna.journal."""
    for name in ("optuna.db", "optuna.journal"):
        if (root / name).is_file():
            return storage_url(str(root / name), root, 1)
    raise TatrError(
        f"no sweep storage under {root}/ (optuna.db or optuna.journal): run tatr sweep first, or give --storage"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """One line for a port out of range, a host that does not resolve, or a port already taken.

    Why bind here: optuna-dashboard prints "Listening on …" before its own bind fails, so a taken
    port would first be announced as served. Binding (with SO_REUSEADDR, as the server does) and
    closing at once finds the problem before any banner; the window until the server binds is
    milliseconds.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise TatrError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TatrError(f"--host {host!r}: cannot resolve ({getattr(exc, 'strerror', None) or exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TatrError(f"port {port} on {host} is already in use; choose another --port") from None
            raise TatrError(f"cannot serve on {host}:{port} ({exc.strerror or exc})") from None


def serve(storage: str | None, root: Path, host: str, port: int, echo: Callable[[str], None] = print) -> None:
    """Block serving the dashboard until interrupted."""
    check_port(host, port)
    url = storage_url(storage, root, 1) if storage else default_storage(root)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise TatrError(f"storage {url}: no such file")
    if url.startswith("journal:") and not Path(url[len("journal:") :]).is_file():
        raise TatrError(f"storage {url}: no such file")
    if not is_loopback(host):
        warnings.warn(f"serving the dashboard on {host}: anyone who can reach it can edit studies", stacklevel=2)
    from optuna_dashboard import run_server

    backend = open_storage(url, heartbeat=False)
    echo(f"optuna-dashboard for {redact(url)} on http://{host}:{port}/ (Ctrl-C stops it)")
    try:
        run_server(backend, host=host, port=port)
    except OSError as exc:
        raise TatrError(f"cannot serve on {host}:{port} ({exc.strerror or exc})") from None
    except KeyboardInterrupt:
        pass
