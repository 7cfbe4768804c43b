"""Content-addressed, atomically written, verified-on-read caches (stdlib only).

Everything expensive (testbed checkpoints, exemplar gradients, heads, Ω) lives in a folder named
by a hash of its inputs. A folder is built in a temporary sibling and renamed into place, so a
crash never leaves a half-written entry; a manifest of file digests is checked on every read, so a
corrupted entry is rebuilt instead of trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def default_cache_root() -> Path:
    """`$TATR_CACHE` if set, else `~/.cache/tatr`: outside the repository, shared across clones."""
    return Path(os.environ.get("TATR_CACHE", Path.home() / ".cache" / "tatr"))


def content_hash(*parts: Any) -> str:
    """Hash JSON-able inputs; `Path` parts contribute their file digest, not their name."""

    def encode(obj: Any) -> Any:
        if isinstance(obj, Path):
            return {"file_sha256": file_digest(obj)}
        if isinstance(obj, dict):
            return {str(k): encode(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
        if isinstance(obj, list | tuple):
            return [encode(v) for v in obj]
        return obj

    blob = json.dumps(encode(list(parts)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def cached_dir(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return `root/key`, building it with `build(tmp_dir)` if missing or failing verification."""
    final = Path(root) / key
    if verify_dir(final):
        return final
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        build(tmp)
        write_manifest(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first; keep theirs if it verifies
            if not verify_dir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {str(p.relative_to(folder)): file_digest(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True))


def verify_dir(folder: Path) -> bool:
    """True when every file of the manifest exists with its recorded digest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        digests = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for rel, digest in digests.items():
        path = folder / rel
        if not path.is_file() or file_digest(path) != digest:
            return False
    return True
