"""Content-addressed, atomically written, verified-on-read caches (stdlib only).

Everything expensive (testbed checkpoints, exemplar gradients, heads, Ω) lives in a folder named
by a hash of its inputs. A folder is built in a temporary sibling and renamed into place, so a
crash never leaves a half-written entry; a manifest of file digests is checked on every read, so a
corrupted entry is rebuilt instead of trusted.

"Corrupted" includes what a careless hand or a crash can leave: a manifest that is not a mapping of
relative file names to digests (a list, a string, a path leaving the entry), an entry that is a
file or a symlink instead of a folder. Each is removed (the link, not its target) and rebuilt.
`TATR_CACHE` (or a folder on the way to an entry) naming a file is a one-line error, and so is a
disk that fills (or refuses) while an entry is built, whichever library was writing
(`tatr.core.outputs.write_failure`); the half-built temporary folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError
from tatr.core.outputs import atomic_write, make_tmp_dir, sweep_leftovers, writing

__all__ = ["atomic_write", "cached_dir", "content_hash", "default_cache_root", "file_digest", "verify_dir"]

MANIFEST = "manifest.json"


def default_cache_root() -> Path:
    """`$TATR_CACHE` if set (and not empty), else `~/.cache/tatr`: outside the repository, shared across clones."""
    value = os.environ.get("TATR_CACHE", "")
    if not value:
        return Path.home() / ".cache" / "tatr"
    root = Path(value).expanduser()
    if root.exists() and not root.is_dir():
        raise TatrError(f"TATR_CACHE={value}: not a folder; point it at a folder (or unset it for ~/.cache/tatr)")
    return root


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


def cached_dir(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return `root/key`, building it with `build(tmp_dir)` if missing or failing verification."""
    final = Path(root) / key
    if verify_dir(final):
        return final
    _make_folder(final.parent)
    _remove_entry(final)
    sweep_leftovers(final.parent)
    tmp = make_tmp_dir(final)
    try:
        with writing(final, tmp):
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


def _make_folder(folder: Path) -> None:
    """Create the folder holding entries; a file on the way is a one-line error, not a traceback."""
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            raise TatrError(f"{part}: the cache needs a folder here, but this is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TatrError(f"{folder}: cannot create the cache folder ({exc.strerror})") from None


def _remove_entry(entry: Path) -> None:
    """Remove an entry that failed verification: a folder with its files, a file or a link itself."""
    try:
        if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
            entry.unlink()
        elif entry.exists():
            shutil.rmtree(entry)
    except OSError as exc:
        raise TatrError(f"{entry}: corrupted cache entry that cannot be removed ({exc.strerror})") from None


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {str(p.relative_to(folder)): file_digest(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True))


def verify_dir(folder: Path) -> bool:
    """True when `folder` is a real folder and every file of its manifest has its recorded digest.

    A manifest that is not a mapping of relative names to digest strings, or that names a file
    outside the folder, fails verification (the entry is then rebuilt), as does an unreadable file.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if folder.is_symlink() or not folder.is_dir() or not manifest.is_file():
        return False
    try:
        digests = json.loads(manifest.read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bad UTF-8
        return False
    if not isinstance(digests, dict):
        return False
    root = folder.resolve()
    for rel, digest in digests.items():
        if not isinstance(digest, str) or not rel or Path(rel).is_absolute():
            return False
        path = folder / rel
        try:
            if root not in path.resolve().parents or not path.is_file() or file_digest(path) != digest:
                return False
        except OSError:
            return False
    return True
