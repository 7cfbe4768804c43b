"""Reading text files a user wrote or handed over (task files, store files, W&B tables): one line per failure.

Every failure to read or parse such a file is a `TatrError` of one line, `<file>:<line>: <problem>`
(the form compilers use, so an editor jumps to it), never a traceback: bytes that are not UTF-8, a
CSV field over the csv module's limit, JSON nested 100,000 deep (`RecursionError` in the parser),
an integer of 10,000 digits (`ValueError`), a file too large to hold in memory. Undecodable bytes
make the whole file "not a text file"; that line names the first bad line in its parentheses.

It lives in the core (stdlib only) so that every layer reads files the same way: the suites (task
files), the runs (the store) and the report (W&B tables). YAML is read by `tatr.io.safe_yaml`,
which uses `read_text` and `at` from here.
"""

from __future__ import annotations

import csv
import json
import lzma
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError

MIB = 1 << 20


def at(source: object, line: int) -> str:
    """`<file>:<line>`, the head of every parse error."""
    return f"{source}:{line}"


def line_error(source: object, line: int, problem: str) -> TatrError:
    """`<file>:<line>: <problem>` as one line (newlines in `problem` folded into spaces)."""
    return TatrError(f"{at(source, line)}: {' '.join(problem.split())}")


def read_text(path: str | Path, what: str, max_bytes: int) -> str:
    """The UTF-8 text of `path`, refused in one line when unreadable, over `max_bytes`, or not UTF-8.

    `what` names the kind of file in the messages ("task file", "store file")."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise TatrError(f"{path}: {size:,} bytes is over the {max_bytes / MIB:,g} MiB limit of this {what}")
        data = path.read_bytes()
    except OSError as exc:
        raise TatrError(f"{path}: cannot read this {what} ({exc.strerror or type(exc).__name__})") from None
    except MemoryError:
        raise TatrError(f"{path}: too large to read into memory ({what})") from None
    return _decoded(path, data, what)


def read_xz_text(path: str | Path, what: str, max_bytes: int) -> str:
    """`read_text` for an xz file: `max_bytes` bounds the decompressed text, read in pieces, so a
    small file that inflates to gigabytes (a decompression bomb) is refused before it is held in memory."""
    path = Path(path)
    pieces, total = [], 0
    try:
        with lzma.open(path, "rb") as stream:
            while piece := stream.read(MIB):
                total += len(piece)
                if total > max_bytes:
                    raise TatrError(f"{path}: inflates past the {max_bytes / MIB:,g} MiB limit of this {what}")
                pieces.append(piece)
    except OSError as exc:
        raise TatrError(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None
    except (EOFError, lzma.LZMAError) as exc:
        raise TatrError(f"{path}: not a whole xz {what} ({exc or type(exc).__name__})") from None
    return _decoded(path, b"".join(pieces), what)


def _decoded(path: Path, data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TatrError(
            f"{path}: not a text file (line {line} has a byte that is not UTF-8; a {what} is UTF-8 text)"
        ) from None


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines, split at "\\n" only (JSON Lines' separator).

    Not `str.splitlines`: that also splits at U+2028 or U+0085, which JSON allows inside a string,
    and its numbers would not be the ones an editor shows."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield number, line


_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}\n]')


def deepest_line(text: str) -> tuple[int, int]:
    """(line, depth) where JSON `text` is nested deepest, brackets inside strings skipped (1-based line)."""
    depth = deepest = 0
    line = where = 1
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, line
        elif token in "]}":
            depth -= 1
    return where, deepest


def parse_json(
    text: str | bytes,
    source: object,
    line: int = 1,
    what: str = "JSON",
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """One JSON document (a whole file, or line `line` of a JSON Lines file) → Python, or one line.

    `what` is what the text should have been ("JSON", "a JSON row"): the message is
    `<file>:<line>: not <what> (<why>)`."""
    try:
        return json.loads(text, parse_constant=parse_constant)
    except json.JSONDecodeError as exc:
        raise line_error(source, line + exc.lineno - 1, f"not {what} ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        decoded = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        where, depth = deepest_line(decoded)
        raise line_error(
            source, line + where - 1, f"not {what} (nested {depth:,} levels deep, too deep to read)"
        ) from None
    except MemoryError:
        raise line_error(source, line, f"not {what} (too large to read into memory)") from None
    except ValueError as exc:  # an integer of more than 4,300 digits, a constant `parse_constant` refuses, bad UTF-8
        raise line_error(source, line, f"not {what} ({exc})") from None


def csv_records(text: str, source: object, **dialect: Any) -> tuple[list[str], list[dict[str | None, Any]]]:
    """The header and the rows (as `csv.DictReader` gives them) of CSV `text`, or one line.

    Fields are limited to the csv module's `field_size_limit` (131,072 characters unless a program
    changed it): a longer one, header included, is refused rather than read. `dialect`: the csv
    module's format options (e.g. `delimiter=";"`)."""
    reader = csv.DictReader(text.splitlines(), **dialect)  # `reader.reader.line_num`: DictReader's is one row behind
    try:
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as exc:
        problem = str(exc)
        if "field larger than field limit" in problem:
            problem = f"a field is longer than {csv.field_size_limit():,} characters"
        raise line_error(source, max(reader.reader.line_num, 1), f"not valid CSV ({problem})") from None
    except MemoryError:
        raise line_error(
            source, max(reader.reader.line_num, 1), "not valid CSV (too large to read into memory)"
        ) from None
    return fields, rows
