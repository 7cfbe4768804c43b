"""Every repository path and `tatr.*` module the README and docs/ name exists; the README is a front page.

A path is named in an inline code span, a fenced shell block (comments dropped) or a Markdown link. A token
counts as a repository path when it starts with one of the repository's top-level folders (`tatr/`,
`tests/`, `docs/`, ...) or is a file at the root (`pyproject.toml`). Code spans and shell blocks are read
from the repository root; links from the file's own folder, as GitHub resolves them, and a `#anchor` on a
link to a Markdown file must be one of its headings. A glob must match a file; a placeholder
(`results/<benchmark>/`, `$TATR_CACHE/...`) is skipped, and so is a path git ignores (the store, Optuna
files, W&B runs: written at run time). A dotted `tatr.x.y` must be a module, or a name defined in one.

Run by hand on another file: `python tests/test_docs_paths.py OLD_README.md` prints what it finds.
"""

from __future__ import annotations

import functools
import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Folder READMEs that name paths (sweeps/ and results/ name only their own files, relatively).
FOLDER_READMES = ("experiments/README.md", "benchmarks/README.md", "notebooks/README.md")
MAX_README_LINES = 220
THREE_COMMANDS = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e ".[dev]"',
    "tatr sweep experiments/testbed.yaml --sweep sweeps/tatr.yaml",
    "pytest",
)
# Written by a run that needs real CLIP weights and a GPU, so never committed (docs/gpu.md).
WRITTEN_AT_RUN_TIME = ("results/clip8",)

TOP_FOLDERS = tuple(
    sorted(
        p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in {".git", ".venv"} and "egg-info" not in p.name
    )
)
ROOT_FILES = ("README.md", "pyproject.toml", "constraints.txt", ".gitignore")
FILE_SUFFIX = re.compile(
    r"\.(py|md|yaml|yml|toml|txt|csv|tex|json|jsonl|html|png|pdf|ipynb|safetensors|pt|pth|db|journal)$"
)
PLACEHOLDER = re.compile(r"[<>$]|…|\.\.\.")
FENCE = re.compile(r"^(`{3,})\s*(\w*)\s*$")
SHELL = {"bash", "sh", "shell", "console"}
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOTTED = re.compile(r"^tatr(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), *(ROOT / p for p in FOLDER_READMES)]


def _strip(token: str) -> str:
    token = token.strip("\"'(),;")
    return token.rstrip(".:") if not token.endswith("..") else token


def _candidates(text: str) -> tuple[list[str], list[str]]:
    """(root-relative tokens from code, link targets) in one Markdown text."""
    code: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    shell = False
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if match and (fence is None or match.group(1) == fence):
            fence, shell = (match.group(1), match.group(2) in SHELL) if fence is None else (None, False)
            continue
        if fence is not None:
            if shell:
                code.extend(line.split("#", 1)[0].split())
            continue
        prose.append(line)
    body = "\n".join(prose)
    for span in CODE_SPAN.finditer(body):
        code.extend(span.group(2).split())
    links = [m.group(1) for m in LINK.finditer(CODE_SPAN.sub("", body))]
    return [_strip(t) for t in code], links


def _is_repo_path(token: str) -> bool:
    head = token.split("/", 1)[0]
    return ("/" in token and head in TOP_FOLDERS) or token in ROOT_FILES


@functools.cache
def _ignored(rel: str) -> bool:
    if any(rel == p or rel.startswith(p + "/") for p in WRITTEN_AT_RUN_TIME):
        return True
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", rel], cwd=ROOT, capture_output=True)
    return done.returncode == 0


def _expand(token: str) -> list[str]:
    """Brace expansion, one level: `results/{a,b}` → `results/a`, `results/b`."""
    match = re.search(r"\{([^{}]*)\}", token)
    if not match:
        return [token]
    return [
        e for part in match.group(1).split(",") for e in _expand(token[: match.start()] + part + token[match.end() :])
    ]


def _exists(path: Path) -> bool:
    if "*" in path.name or "?" in path.as_posix():
        return bool(glob.glob(str(path)))
    return path.exists()


def _module_problem(name: str) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if not source.is_file():
            continue
        rest = parts[cut:]
        if not rest:
            return None
        text = source.read_text(encoding="utf-8")
        defined = rf"^\s*(?:def|class)\s+{rest[0]}\b|^{rest[0]}\s*[:=]|^\s*from \S+ import .*\b{rest[0]}\b"
        if len(rest) <= 2 and re.search(defined, text, re.MULTILINE):
            return None
        return f"{name}: {source.relative_to(ROOT)} defines no {rest[0]}"
    return f"{name}: no such module"


def _anchors(path: Path) -> set[str]:
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().lower().replace("`", "")
            anchors.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return anchors


def problems(path: Path, links_from: Path | None = None) -> list[str]:
    """Every dead repository path, module or anchor named in one Markdown file (links read from its folder)."""
    code, links = _candidates(path.read_text(encoding="utf-8"))
    found: list[str] = []
    for token in dict.fromkeys(code):
        if DOTTED.match(token) and not FILE_SUFFIX.search(token):
            if problem := _module_problem(token):
                found.append(problem)
            continue
        for rel in _expand(token):
            if not _is_repo_path(rel) or PLACEHOLDER.search(rel) or _ignored(rel):
                continue
            if not _exists(ROOT / rel):
                found.append(f"{rel}: no such path")
    for target in dict.fromkeys(links):
        if re.match(r"^[a-z]+:", target) or target.startswith("//"):
            continue  # a URL
        file, _, anchor = target.partition("#")
        where = ((links_from or path.parent) / file).resolve() if file else path
        if ROOT not in where.parents and where != ROOT:
            found.append(f"{target}: outside the repository")
        elif not where.exists():
            found.append(f"{target}: no such path")
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            found.append(f"{target}: no heading #{anchor}")
    return [f"{path.name}: {p}" for p in found]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_exist(path: Path) -> None:
    assert problems(path) == []


def test_docs_folder_is_linked_from_the_readme() -> None:
    _, links = _candidates(README.read_text(encoding="utf-8"))
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links}
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked) == []


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; details go to docs/"
    assert lines[0].startswith("# ")
    body = [line for line in lines[1:] if line.strip()]
    assert body[0].startswith("```"), "the README starts with its three commands"
    commands = [line.split("#", 1)[0].strip() for line in body[1:4]]
    assert commands == list(THREE_COMMANDS)
    assert body[4].startswith("```")
    # .ci/run installs the text extra too; the README documents that line as it is.
    assert 'pip install -c constraints.txt -e ".[text]"' in "\n".join(lines)


def test_the_checker_catches_a_dead_path(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "See `tatr/trust_region.py`, `tatr.runs.store`, [m](../tatr/merging.py), `results/*.nope`,\n"
        "[a](method.md#no-such-heading), but not `results/<benchmark>/`, `results/store/x.jsonl` or `tatr.core`.\n",
        encoding="utf-8",
    )
    found = problems(page, links_from=ROOT / "docs")
    assert len(found) == 5, found


if __name__ == "__main__":
    for arg in sys.argv[1:] or [str(p) for p in doc_files()]:
        page = Path(arg).resolve()
        for line in problems(page, links_from=None if ROOT in page.parents else ROOT):
            print(line)
