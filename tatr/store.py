"""The results store: append-only rows, one per (run, task, split), the source of truth for reports.

Each run writes one JSONL file under `<root>/store/`, atomically (temporary file, then rename), so
concurrent workers never interleave and a crash never leaves half a run. Reading concatenates all
files; W&B only mirrors this.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from tatr.cache import atomic_write
from tatr.errors import TatrError

COLUMNS = (
    "run_id",
    "study",
    "trial",
    "job_type",  # trial | final | ablation | baseline
    "experiment",
    "benchmark",
    "model",  # the suite's model (e.g. ViT-B-32 on clip8), so reference numbers are matched per model
    "method",
    "trust_region",
    "q",
    "lam",
    "ties_k",
    "components",
    "exemplars",
    "seed",
    "split",
    "task",
    "accuracy",
    "normalized_accuracy",
    "merge_seconds",
    "eval_seconds",
    "git_commit",
    "config_hash",
    "timestamp",
)


def store_dir(root: str | Path) -> Path:
    return Path(root) / "store"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def append_rows(root: str | Path, rows: Iterable[Mapping[str, Any]], run_id: str | None = None) -> Path:
    """Write one run's rows as a new file; unknown columns are refused, missing ones are None."""
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("append_rows needs at least one row")
    run_id = run_id or rows[0].get("run_id") or new_run_id()
    lines = []
    for row in rows:
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown result columns: {unknown}")
        full = {c: row.get(c) for c in COLUMNS}
        full["run_id"] = full["run_id"] or run_id
        full["git_commit"] = full["git_commit"] or git_commit()
        full["timestamp"] = full["timestamp"] or time.time()
        lines.append(json.dumps(full, sort_keys=False))
    path = store_dir(root) / f"{run_id}.jsonl"
    if path.exists():
        raise ValueError(f"{path} exists: run ids are unique and the store is append-only")
    with atomic_write(path, suffix=".jsonl") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def read_store(root: str | Path) -> pd.DataFrame:
    """All rows under `root` as one DataFrame with the store's columns (empty if none)."""
    folder = store_dir(root)
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    records = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise TatrError(f"{f}:{n}: not a JSON row (the store is corrupted)") from None
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


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
