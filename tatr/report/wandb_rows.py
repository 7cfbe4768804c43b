"""`tatr report --from-wandb`: rebuild the results store's rows from the W&B runs that mirror it.

Why it lives apart from `tatr.report.build`: it is the only part of the report that talks to a server and
reads data written by someone else, so it is where names from data are checked. Every rebuilt row
goes through `tatr.store.rows.check_row` (safe run id, benchmark, study, task; typed, finite numbers),
and a logged table file is fetched only to a path inside a private scratch folder, so a run named
`../x` or a table path `../../x` gets one line instead of a write outside it. A table that cannot be
fetched leaves the normalized accuracies empty (the store allows that); one that was fetched but
cannot be read (not JSON, nested too deep, over `MAX_TABLE_BYTES`, rows of the wrong shape) is one
line `<file>:<line>: <problem>`, as every reader of a user's file says it (`tatr.io.text_files`).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd

from tatr.core.errors import TatrError
from tatr.core.outputs import inside, safe_name
from tatr.io.text_files import MIB, parse_json, read_text
from tatr.store.record import record_from_wandb, store_rows
from tatr.store.rows import COLUMNS, INTEGERS, check_row


def rows_from_wandb(path: str, api: object | None = None) -> pd.DataFrame:
    """Rebuild store rows from the runs of W&B project `ENTITY/PROJECT` (see `wandb_run_rows`)."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise TatrError(f"--from-wandb wants ENTITY/PROJECT, got '{path}'")
    if api is None:
        try:
            import wandb
        except ImportError:
            raise TatrError("--from-wandb needs the wandb package (pip install wandb)") from None
        try:
            api = wandb.Api(timeout=60)
        except Exception as exc:  # wandb raises its own types for auth/network problems
            raise TatrError(f"cannot reach W&B ({type(exc).__name__}: {exc}); run `wandb login` first") from None
    try:
        runs = list(api.runs(path))  # type: ignore[attr-defined]
    except Exception as exc:
        raise TatrError(f"cannot list the runs of W&B project '{path}' ({type(exc).__name__}: {exc})") from None
    with tempfile.TemporaryDirectory(prefix="tatr-wandb-") as tmp:
        records = [_checked(row) for run in runs for row in wandb_run_rows(run, Path(tmp))]
    if not records:
        raise TatrError(f"W&B project '{path}' has no runs with per-task accuracies (<split>/accuracy/<task>)")
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


MAX_TABLE_BYTES = 256 * MIB  # a logged accuracy table: one row per (task, split)
_MAY_BE_MISSING = ("normalized_accuracy", "merge_seconds", "eval_seconds", "timestamp")


def _checked(row: dict) -> dict:
    """The row with W&B's number types made plain (numpy scalars, 3.0 for an integer), then checked."""
    row = {k: v.item() if hasattr(v, "item") and not isinstance(v, list | dict) else v for k, v in row.items()}
    for column in (*INTEGERS, *_MAY_BE_MISSING):
        value = row.get(column)
        if isinstance(value, float) and math.isnan(value):
            row[column] = None  # pandas' and W&B's "no value"; NaN in accuracy, q or λ is refused
        elif column in INTEGERS and isinstance(value, float) and value.is_integer():
            row[column] = int(value)
    try:
        return check_row(row)
    except (ValueError, TatrError) as exc:
        raise TatrError(f"W&B run {row.get('run_id')!r}: {exc}") from None


def wandb_run_rows(run: object, scratch: Path) -> list[dict]:
    """The store rows one W&B run mirrors (the layout `tatr.runs.tracking` logs).

    The run's config is the resolved experiment (`merge.*`, `exemplars.*`, `seed`, `benchmark`,
    `name`) plus `study`, `trial`, `config_hash` and, for ablations, `ablation` (its kind); its summary has
    `<split>/accuracy/<task>`, and normalized accuracies either as `<split>/normalized_accuracy/<task>`
    or in the logged `accuracy_table` (fetched from the run's files when needed). The rows are
    built by `tatr.store.record` (`record_from_wandb`, `store_rows`), as the store's own rows are.
    """
    summary = _as_dict(getattr(run, "summary", {}))
    config = _flatten(_as_dict(getattr(run, "config", {})))
    accuracy: dict[tuple[str, str], float] = {}
    normalized: dict[tuple[str, str], float] = {}
    for key, value in summary.items():
        parts = str(key).split("/")
        if len(parts) == 3 and parts[1] == "accuracy":
            accuracy[(parts[0], parts[2])] = value
        elif len(parts) == 3 and parts[1] == "normalized_accuracy":
            normalized[(parts[0], parts[2])] = value
    if not accuracy:
        return []
    if len(normalized) < len(accuracy):
        normalized = {**_table_normalized(run, summary.get("accuracy_table"), scratch), **normalized}
    timing = {"merge_seconds": summary.get("time/merge_seconds"), "eval_seconds": summary.get("time/eval_seconds")}
    run_id = getattr(run, "id", None) or getattr(run, "name", None)
    nested = _nest(config)
    nested.setdefault("study", getattr(run, "group", None))
    rows = []
    for split in dict.fromkeys(s for s, _ in accuracy):  # the record type builds the rows (one schema)
        rec = record_from_wandb(
            nested,
            run_id=run_id,  # type: ignore[arg-type]
            job_type=getattr(run, "job_type", None),
            split=split,
            accuracy={t: a for (s, t), a in accuracy.items() if s == split},
            normalized={t: v for (s, t), v in normalized.items() if s == split},
            git_commit=getattr(run, "commit", None),
            timestamp=_epoch(getattr(run, "created_at", None)),
            **timing,
        )
        rows += store_rows(rec)
    return rows


def _nest(flat: dict) -> dict:
    """`{"merge.q": 0.9}` → `{"merge": {"q": 0.9}}`: the config as it was logged."""
    out: dict = {}
    for key, value in flat.items():
        *parents, last = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _table_normalized(run: object, ref: object, scratch: Path) -> dict[tuple[str, str], float]:
    """(split, task) → normalized accuracy from a logged `accuracy_table` (a table-file reference)."""
    ref = _as_dict(ref) if ref is not None else {}
    path = ref.get("path")
    if not path or not hasattr(run, "file"):
        return {}
    if not isinstance(path, str):
        raise TatrError(f"W&B run {getattr(run, 'id', None)!r}: accuracy_table path {path!r} is not text")
    folder = inside(scratch, safe_name(getattr(run, "id", None), "W&B run id"))
    if Path(path).is_absolute() or inside(folder, *Path(path).parts) == folder:
        raise TatrError(f"W&B run {folder.name}: accuracy_table path {path!r} leaves the run's folder")
    target = folder / path
    try:
        run.file(path).download(root=str(folder), replace=True)  # type: ignore[attr-defined]
    except Exception:  # a table that cannot be fetched leaves the column empty, as the store allows
        return {}
    if not target.is_file():
        return {}
    return _read_table(target)


def _read_table(target: Path) -> dict[tuple[str, str], float]:
    """(split, task) → normalized accuracy of a fetched W&B table file (`{"columns": [...], "data": [[...]]}`)."""
    table = parse_json(read_text(target, "W&B table file", MAX_TABLE_BYTES), target)
    if not isinstance(table, dict):
        raise TatrError(f"{target}: not a W&B table (a JSON object with 'columns' and 'data')")
    cols, data = table.get("columns", []), table.get("data", [])
    if not isinstance(cols, list) or not isinstance(data, list):
        raise TatrError(f"{target}: not a W&B table ('columns' and 'data' must be lists)")
    if not {"task", "split", "normalized_accuracy"} <= {c for c in cols if isinstance(c, str)}:
        return {}
    at = {c: i for i, c in enumerate(cols) if isinstance(c, str)}
    out = {}
    for number, row in enumerate(data, 1):
        if not isinstance(row, list) or len(row) != len(cols):
            raise TatrError(f"{target}: data row {number} is not a list of {len(cols)} values")
        split, task = row[at["split"]], row[at["task"]]
        if not isinstance(split, str) or not isinstance(task, str):
            raise TatrError(f"{target}: data row {number}: split and task must be text, got {split!r}, {task!r}")
        out[(split, task)] = row[at["normalized_accuracy"]]
    return out


def _epoch(value: object) -> float | None:
    """W&B's `created_at` (ISO text, UTC) as seconds since the epoch, for "latest run wins"."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    stamp = pd.Timestamp(str(value))
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.timestamp()


def _as_dict(obj: object) -> dict:
    if isinstance(obj, dict):
        return obj
    for attr in ("_json_dict", "as_dict"):
        value = getattr(obj, attr, None)
        if callable(value):
            value = value()
        if isinstance(value, dict):
            return value
    try:
        return dict(obj)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return {}


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"value"}:
            value = value["value"]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
