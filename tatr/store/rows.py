"""The results store: append-only rows, one per (run, task, split), the source of truth for reports.

This is the file layer; what a row means (its columns and their types) is `tatr.store.schema`, the
one code that builds rows is `tatr.store.record`, and how runs are named is `tatr.store.run_ids`.

Each run writes one JSONL file under `<root>/store/`, atomically (temporary file, then rename), so
concurrent workers never interleave and a crash never leaves half a run. Reading concatenates all
files; W&B only mirrors this.

Rows are checked both ways, because a report must never be silently wrong and names from rows
become paths (`results/<benchmark>/`, `store/<run_id>.jsonl`):

* every row is a JSON object whose fields have their column's type (text, integer, finite number,
  list of text, or null); numbers are finite (an accuracy of NaN is refused when written);
* `run_id`, `benchmark`, `study`, `experiment` and each `|`-separated part of `task` are safe
  names (`tatr.core.outputs.safe_name`);
* the per-example predictions (`n_examples`, `correct`, `predicted`: `tatr.store.predictions`) are
  null, or valid base64 whose lengths fit `n_examples`, with the row's accuracy 100·mean(correct).

A row that breaks this is refused with one line naming the file and the line number
(`<file>:<line>: <problem>`, as every reader of a user's file says it: `tatr.io.text_files`),
whatever is wrong with it: bad JSON, JSON nested 100,000 deep, bytes that are not UTF-8, a file over
`MAX_STORE_FILE_BYTES`. It is not skipped, since a report without it would be wrong without saying
so. Fix or remove that file.
"""

from __future__ import annotations

import json
import lzma
import math
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from tatr.core.errors import TatrError
from tatr.core.outputs import atomic_write, inside, safe_name
from tatr.io.text_files import MIB, numbered_lines, parse_json, read_text, read_xz_text
from tatr.store.predictions import check_prediction_columns
from tatr.store.run_ids import new_run_id
from tatr.store.schema import COLUMNS, INTEGERS, NAMES, NUMBERS, PAIR_SEPARATOR, TEXT

SNAPSHOT = "rows.jsonl.xz"  # a report's rows, committed beside it: results/<benchmark>/rows.jsonl.xz


def check_row(row: object) -> dict[str, Any]:
    """The row if every field has its column's type; else a `ValueError` saying which field and why."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    for column in NAMES:
        if row.get(column) is not None:
            safe_name(row[column], column)
    if row.get("run_id") is None:
        raise ValueError("run_id is missing")
    for column in TEXT:
        if row.get(column) is not None and not isinstance(row[column], str):
            raise ValueError(f"{column} must be text, got {row[column]!r}")
    if isinstance(row.get("task"), str):
        for part in row["task"].split(PAIR_SEPARATOR):
            safe_name(part, "task")
    for column in INTEGERS:
        value = row.get(column)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{column} must be an integer, got {value!r}")
    for column in NUMBERS:
        value = row.get(column)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{column} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{column} must be finite, got {value!r}")
    comps = row.get("components")
    if comps is not None and (not isinstance(comps, list) or not all(isinstance(c, str) for c in comps)):
        raise ValueError(f"components must be a list of names, got {comps!r}")
    check_prediction_columns(row)  # base64, lengths that fit n_examples, accuracy = 100·mean(correct)
    return row


MAX_STORE_FILE_BYTES = 1024 * MIB  # one run's rows; a larger file is not one tatr wrote


def store_dir(root: str | Path) -> Path:
    return Path(root) / "store"


def append_rows(root: str | Path, rows: Iterable[Mapping[str, Any]], run_id: str | None = None) -> Path:
    """Write one run's rows as a new file; unknown columns are refused, missing ones are None."""
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("append_rows needs at least one row")
    run_id = safe_name(run_id or rows[0].get("run_id") or new_run_id(), "run id")
    lines = []
    for row in rows:
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown result columns: {unknown}")
        full = {c: row.get(c) for c in COLUMNS}
        full["run_id"] = full["run_id"] or run_id
        full["git_commit"] = full["git_commit"] or git_commit()
        full["timestamp"] = full["timestamp"] or time.time()
        norm = full["normalized_accuracy"]
        if isinstance(norm, float) and math.isnan(norm):
            full["normalized_accuracy"] = None  # undefined (the fine-tuned model scores 0): null, not NaN
        try:
            check_row(full)
        except (ValueError, TatrError) as exc:
            raise TatrError(f"run {run_id}, task {full['task']!r}: refusing to store this row: {exc}") from None
        lines.append(json.dumps(full, sort_keys=False, allow_nan=False))
    path = inside(store_dir(root), f"{run_id}.jsonl")
    if path.exists():
        raise ValueError(f"{path} exists: run ids are unique and the store is append-only")
    with atomic_write(path, suffix=".jsonl") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def read_store(root: str | Path) -> pd.DataFrame:
    """All rows under `root` as one DataFrame with the store's columns (empty if none).

    A store holds run files (`*.jsonl`) and copies of committed report rows (`*.jsonl.xz`,
    `import_snapshot`), so the same run's rows can be there twice: identical copies count once,
    and two different rows for one (run, task, split) are refused, since a report cannot know
    which one is right."""
    folder = store_dir(root)
    files = sorted([*folder.glob("*.jsonl"), *folder.glob("*.jsonl.xz")]) if folder.is_dir() else []
    records: dict[tuple[Any, ...], dict[str, Any]] = {}
    where: dict[tuple[Any, ...], str] = {}
    for f in files:
        for n, line in numbered_lines(_store_text(f)):
            row = parse_json(line, f, n, what="a JSON row", parse_constant=_no_constant)
            try:
                row = check_row(row)
            except (ValueError, TatrError) as exc:
                raise TatrError(f"{f}:{n}: bad store row: {exc}") from None
            key = (row["run_id"], row.get("task"), row.get("split"))
            if key in records and records[key] != {c: row.get(c) for c in COLUMNS}:
                raise TatrError(f"{f}:{n}: run {key[0]}, task {key[1]!r}, {key[2]}: differs from {where[key]}")
            records.setdefault(key, {c: row.get(c) for c in COLUMNS})
            where.setdefault(key, f"{f}:{n}")
    in_file_order = sorted(records.values(), key=_file_name)  # stable: a run's rows keep their order
    return pd.DataFrame.from_records(in_file_order, columns=list(COLUMNS))


def _file_name(row: dict[str, Any]) -> str:
    """The order of a store of run files (sorted by name), whatever else the store holds: the report's tables
    list tasks and rows in the order first seen, so a copy of the rows must read in the same order."""
    return f"{row['run_id']}.jsonl"


def _store_text(path: Path) -> str:
    if path.name.endswith(".xz"):
        return read_xz_text(path, "store file", MAX_STORE_FILE_BYTES)
    return read_text(path, "store file", MAX_STORE_FILE_BYTES)


def snapshot_bytes(rows: pd.DataFrame) -> bytes:
    """A report's rows as xz-compressed JSON Lines (a quarter of gzip's size on the testbed's rows), in
    the order given (`read_store`'s): an unchanged store leaves the committed file unchanged. Each row
    is checked as the store checks it; pandas' floats for missing integers become integers again."""
    lines = []
    for record in rows.reindex(columns=list(COLUMNS)).to_dict("records"):
        row = {c: _plain(c, record[c]) for c in COLUMNS}
        check_row(row)
        lines.append(json.dumps(row, allow_nan=False))
    return lzma.compress(("\n".join(lines) + "\n").encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)


def _plain(column: str, value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if column in INTEGERS:
        return int(value)
    if column in NUMBERS:
        return float(value)
    if hasattr(value, "tolist"):  # a numpy array (a list column after a round trip through pandas)
        return value.tolist()
    return value


def import_snapshot(root: str | Path, benchmark: str) -> int:
    """Copy `<root>/<benchmark>/rows.jsonl.xz` (a committed report's rows) into the store, so that
    `tatr ablate --resume` continues the committed results instead of starting over; the number
    of rows it holds (0 when there is none). The copy is checked row by row on every read."""
    source = inside(Path(root), safe_name(benchmark, "benchmark")) / SNAPSHOT
    if not source.is_file():
        return 0
    rows = list(numbered_lines(read_xz_text(source, "store file", MAX_STORE_FILE_BYTES)))
    target = inside(store_dir(root), f"{benchmark}-committed.jsonl.xz")
    if not (target.is_file() and target.read_bytes() == source.read_bytes()):
        with atomic_write(target, suffix=".jsonl.xz") as tmp:
            shutil.copyfile(source, tmp)
    return len(rows)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a store row may hold")


@cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
