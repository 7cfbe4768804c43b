"""Evaluations cached by the exact bytes of the evaluated model: one entry per (build, split, model, task).

Why: ablations and sweeps meet the same merged model again (TA at the same λ in three ablations), and a
regeneration that was cut off should resume where it stopped. The key is a hash of the state dict's names,
dtypes, shapes and bytes (`model_digest`), so a different model can never read another's entry; an entry holds
the accuracy and the per-example predictions as a store row keeps them (`tatr.store.predictions`), and one that
is unreadable or inconsistent is measured again. The suites whose evaluation costs more than reading a file
(the text and causal-LM suites) use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor

from tatr.core.cache import content_hash
from tatr.core.outputs import atomic_write
from tatr.store.predictions import TaskPredictions, prediction_columns, predictions_from_row
from tatr.suites.evaluation import tensor_digest


def model_digest(state_dict: Mapping[str, Tensor], version: object) -> str:
    """A content key of a state dict (names, dtypes, shapes, bytes) and the entry format `version`."""
    keys = sorted(state_dict)
    return content_hash(version, keys, tensor_digest(*(state_dict[k] for k in keys)))


def cached_predictions(path: Path, compute: Callable[[], TaskPredictions]) -> TaskPredictions:
    """The predictions stored at `path`, else `compute()`d and stored there atomically."""
    cached = read_predictions(path)
    if cached is None:
        cached = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"accuracy": cached.accuracy, **prediction_columns(cached, "test")}))
    return cached


def read_predictions(path: Path) -> TaskPredictions | None:
    """Cached predictions, or None when absent, unreadable or inconsistent (then they are measured again)."""
    try:
        entry = json.loads(path.read_text())
        cached = predictions_from_row(entry)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None
    if cached is None or cached.predicted is None or entry.get("accuracy") != cached.accuracy:
        return None
    return cached
