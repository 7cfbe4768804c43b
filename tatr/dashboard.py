"""optuna-dashboard on a sweep's storage: the same storage resolution as `tatr sweep`.

Loopback by default, because the dashboard can rename and delete studies and has no login.
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Callable
from pathlib import Path

from tatr.errors import TatrError
from tatr.sweep import open_storage, redact, storage_url


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


def serve(storage: str | None, root: Path, host: str, port: int, echo: Callable[[str], None] = print) -> None:
    """Block serving the dashboard until interrupted."""
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
