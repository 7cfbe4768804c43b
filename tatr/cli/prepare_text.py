"""`tatr prepare-text`: the text suite's real tasks, drawn from Debian's fortunes packages, in seconds.

Where the packages come from, in this order:
1. `--source DIR`: an unpacked tree (`dpkg-deb -x` output holding `usr/share/games/fortunes`) or a
   fortunes folder itself;
2. the installed packages, when dpkg says all of them are installed;
3. `apt-get download` into a temporary folder, each `.deb` unpacked with `dpkg-deb -x` (no root);
4. else one line saying what to install.
The parsing, the draw and the writing live in `tatr.suites.text.fortunes`; this module finds the
files and records each package's version and license for the data card.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click

from tatr.core.cache import default_cache_root
from tatr.core.errors import TatrError
from tatr.suites.text.fortunes import ENGLISH_PACKAGES, PACKAGES, Package, Tree
from tatr.suites.text.fortunes_prepare import prepare

FORTUNES = Path("usr/share/games/fortunes")
INSTALL_HINT = "sudo apt-get install " + " ".join(p for p in PACKAGES if p != "fortunes-min")


def summarise_license(text: str) -> str:
    """The license names a copyright file states: DEP-5 `License:` fields, else the BSD text; plus public domain.

    A summary for the data card, which also names the file; it never replaces reading the file.
    """
    names = list(dict.fromkeys(m.strip() for m in re.findall(r"^License:[ \t]*(\S[^\n]*)$", text, re.MULTILINE)))
    if not names and "Redistribution and use in source and binary forms" in text:
        names.append("BSD-style (Regents of the University of California)")
    if re.search(r"public\s+domain", text, re.IGNORECASE):
        names.append("texts stated to be public domain")
    return "; ".join(names) or "no license named; read the copyright file"


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, 127, "", str(exc))


def _package(name: str, version: str, top: Path) -> Package:
    rel = Path("usr/share/doc") / name / "copyright"
    try:
        text = (top / rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return Package(name, version, "copyright file not found", "not found")
    return Package(name, version, summarise_license(text), str(rel))


def _changelog_version(top: Path, name: str) -> str:
    """A package's version from the first line of its Debian changelog, when an unpacked tree keeps one."""
    for log in ("changelog.Debian.gz", "changelog.gz"):
        with contextlib.suppress(OSError, EOFError):
            with gzip.open(top / "usr/share/doc" / name / log, "rt", encoding="utf-8", errors="replace") as fh:
                match = re.match(r"\S+ \(([^)]+)\)", fh.readline())
            if match:
                return match.group(1)
    return "unknown"


def source_tree(source: Path) -> Tree:
    """`--source DIR`: an unpacked root (holding usr/share/games/fortunes) or a fortunes folder."""
    source = source.expanduser()
    if not source.is_dir():
        raise TatrError(f"{source}: --source is not a folder")
    top = source if (source / FORTUNES).is_dir() else None
    folder = source / FORTUNES if top else source
    if not any((folder / lang).is_dir() for lang in ("de", "es", "it")):
        raise TatrError(f"{source}: not a fortunes tree (no {FORTUNES} with de/, es/, it/ inside, nor those folders)")
    packages = tuple(
        _package(name, _changelog_version(top, name), top)
        for name in PACKAGES
        if top is not None and (top / "usr/share/doc" / name).is_dir()
    )
    return Tree(folder, "a tree given with --source", packages)


def installed_tree() -> Tree | None:
    """The installed packages, when dpkg says every one is installed; their versions and files from dpkg."""
    if not (Path("/") / FORTUNES).is_dir() or shutil.which("dpkg-query") is None:
        return None
    query = _run(["dpkg-query", "-W", "-f=${Package}\t${Status}\t${Version}\n", *PACKAGES])
    rows = [line.split("\t") for line in query.stdout.splitlines()]
    versions = {r[0]: r[2] for r in rows if len(r) == 3 and r[1] == "install ok installed"}
    if set(versions) != set(PACKAGES):
        return None
    listing = _run(["dpkg-query", "-L", *ENGLISH_PACKAGES]).stdout.splitlines()
    prefix = f"/{FORTUNES}/"
    english = frozenset(p[len(prefix) :] for p in listing if p.startswith(prefix) and "/" not in p[len(prefix) :])
    packages = tuple(_package(name, versions[name], Path("/")) for name in PACKAGES)
    return Tree(Path("/") / FORTUNES, f"the installed packages (`/{FORTUNES}`)", packages, english)


def unpack_debs(debs: list[Path], top: Path) -> tuple[Package, ...]:
    """Unpack each `.deb` into `top` with `dpkg-deb -x` (no root needed); name, version and license of each."""
    packages = []
    for deb in sorted(debs):
        fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
        unpacked = _run(["dpkg-deb", "-x", str(deb), str(top)])
        if fields.returncode or unpacked.returncode:
            raise TatrError(f"{deb}: dpkg-deb cannot unpack it ({(fields.stderr or unpacked.stderr).strip()[:200]})")
        info = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
        packages.append(_package(info.get("Package", deb.name), info.get("Version", "unknown"), top))
    order = {name: i for i, name in enumerate(PACKAGES)}
    return tuple(sorted(packages, key=lambda p: order.get(p.name, len(order))))


@contextlib.contextmanager
def downloaded_tree() -> Iterator[Tree]:
    """`apt-get download` the packages into a temporary folder and unpack them there (removed after)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise TatrError(
            f"the fortunes packages are not installed and apt-get/dpkg-deb are missing; run: {INSTALL_HINT}"
        )
    with tempfile.TemporaryDirectory(prefix="tatr-fortunes-") as tmp:
        click.echo(f"downloading {' '.join(PACKAGES)} with apt-get download …", err=True)
        got = _run(["apt-get", "download", *PACKAGES], cwd=tmp, timeout=600)
        debs = sorted(Path(tmp).glob("*.deb"))
        if got.returncode or len(debs) != len(PACKAGES):
            last = (got.stderr.strip().splitlines() or ["no .deb files"])[-1][:200]
            raise TatrError(
                f"the fortunes packages are not installed and apt-get download failed ({last}); run: {INSTALL_HINT}"
            )
        click.echo(f"unpacking {len(debs)} packages with dpkg-deb -x …", err=True)
        packages = unpack_debs(debs, Path(tmp) / "root")
        yield Tree(
            Path(tmp) / "root" / FORTUNES,
            "packages fetched with `apt-get download`, unpacked with `dpkg-deb -x`",
            packages,
        )


@contextlib.contextmanager
def locate(source: Path | None) -> Iterator[Tree]:
    if source is not None:
        yield source_tree(source)
    elif (tree := installed_tree()) is not None:
        yield tree
    else:
        with downloaded_tree() as tree:
            yield tree


@click.command("prepare-text")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder to write (replaced whole, atomically). Default: <cache root>/data/fortunes "
    "($TATR_CACHE or ~/.cache/tatr).",
)
@click.option(
    "--source",
    type=click.Path(path_type=Path),
    default=None,
    help="An unpacked tree (holding usr/share/games/fortunes) or a fortunes folder, instead of the installed packages.",
)
def command(out: Path | None, source: Path | None) -> None:
    """Write the text suite's real tasks (tasks.yaml, one jsonl per task, DATA.md) from Debian's fortunes packages.

    Six tasks of 4 or 8 classes: English topics and genres, German and Spanish topics, Italian sources and
    language identification. Offensive files are left out. Same packages, byte-identical output.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    out = (out or default_cache_root() / "data" / "fortunes").expanduser()
    with locate(source) as tree:
        versions = ", ".join(f"{p.name} {p.version}" for p in tree.packages) or "no package versions found"
        click.echo(f"reading {tree.folder} ({versions})", err=True)
        tasks = prepare(tree, out, log=lambda line: click.echo(line, err=True))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = sum(t.total for t in tasks)
    click.echo(f"wrote {out}: {len(tasks)} tasks, {total} texts, in {wall:.1f} s wall ({cpu:.1f} s CPU)")
