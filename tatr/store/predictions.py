"""Per-example predictions of one evaluated task, and their compact form in a store row.

Every evaluation keeps which examples were right, in the order the suite's loader gives them (fixed
by the suite's build: the same build always yields the same order), so two rows of the same build,
task and split can be paired example by example (`tatr.report.paired`). A row holds them in three
columns (`tatr.store.schema.PREDICTION_COLUMNS`):

* `n_examples`: how many examples the task's split has (an integer);
* `correct`: base64 of `numpy.packbits` of the boolean "was right" vector, big-endian bit order,
  the padding bits of the last byte zero: ⌈n/8⌉ bytes, 4·⌈n/24⌉ characters (320 examples: 40 bytes,
  56 characters);
* `predicted`: base64 of the predicted class per example, uint8 when every class index is below 256,
  else uint16 little-endian (the width is the byte count ÷ n); kept on test-split rows only
  (`PREDICTED_SPLITS`), because it costs 8–16× the correct bits and the report pairs on `correct`.

Rows written before these columns existed have them null; they still read and report (without
intervals). A row whose columns disagree (bad base64, a length that does not fit `n_examples`,
an accuracy that is not 100·mean(correct)) is refused like any other bad row.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

PREDICTED_SPLITS = ("test",)  # the splits whose rows also keep the predicted class


@dataclass(frozen=True)
class TaskPredictions:
    """One task's per-example outcome: `correct[i]` for example i of the suite's fixed order, and the
    predicted class where known. `accuracy` is computed exactly as the suites compute it."""

    correct: np.ndarray  # bool, [n]
    predicted: np.ndarray | None = None  # int64, [n], or None

    def __post_init__(self) -> None:
        correct = np.asarray(self.correct)
        if correct.ndim != 1 or len(correct) == 0:
            raise ValueError(f"correct must be a non-empty vector, got shape {correct.shape}")
        object.__setattr__(self, "correct", correct.astype(bool, copy=False))
        if self.predicted is not None:
            predicted = np.asarray(self.predicted).astype(np.int64, copy=False)
            if predicted.shape != correct.shape:
                raise ValueError(f"predicted has shape {predicted.shape}, correct {correct.shape}")
            if len(predicted) and (predicted.min() < 0 or predicted.max() >= 2**16):
                raise ValueError("predicted classes must lie in [0, 65536)")
            object.__setattr__(self, "predicted", predicted)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def n_correct(self) -> int:
        return int(self.correct.sum())

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in percent: 100 · correct / total, the suites' formula to the last bit."""
        return 100.0 * self.n_correct / self.n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskPredictions):
            return NotImplemented
        same_pred = (self.predicted is None and other.predicted is None) or (
            self.predicted is not None
            and other.predicted is not None
            and np.array_equal(self.predicted, other.predicted)
        )
        return np.array_equal(self.correct, other.correct) and same_pred

    __hash__ = None  # type: ignore[assignment]


def pack_correct(correct: np.ndarray) -> str:
    """base64 of the packed bits (⌈n/8⌉ bytes)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    """The boolean vector of `n` examples; `ValueError` when the text is not what `pack_correct` gives."""
    raw = _b64(text, "correct")
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"correct holds {len(raw)} bytes, n_examples={n} needs {(n + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if bits[n:].any():
        raise ValueError("correct has bits set past n_examples")
    return bits[:n].astype(bool)


def pack_predicted(predicted: np.ndarray) -> str:
    """base64 of the classes as uint8 (all below 256) or uint16 little-endian."""
    predicted = np.asarray(predicted)
    dtype = np.uint8 if (len(predicted) == 0 or predicted.max() < 256) else np.dtype("<u2")
    return base64.b64encode(predicted.astype(dtype).tobytes()).decode("ascii")


def unpack_predicted(text: str, n: int) -> np.ndarray:
    raw = _b64(text, "predicted")
    if len(raw) not in (n, 2 * n):
        raise ValueError(f"predicted holds {len(raw)} bytes, n_examples={n} needs {n} or {2 * n}")
    dtype = np.uint8 if len(raw) == n else np.dtype("<u2")
    return np.frombuffer(raw, dtype=dtype).astype(np.int64)


def _b64(text: str, column: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(f"{column} is not base64") from None


def prediction_columns(p: TaskPredictions | None, split: str | None) -> dict[str, Any]:
    """The row's `n_examples`, `correct` and `predicted` for `p` (all null when None); `predicted`
    only on `PREDICTED_SPLITS`."""
    if p is None:
        return {"n_examples": None, "correct": None, "predicted": None}
    keep = p.predicted is not None and split in PREDICTED_SPLITS
    return {
        "n_examples": p.n,
        "correct": pack_correct(p.correct),
        "predicted": pack_predicted(p.predicted) if keep else None,  # type: ignore[arg-type]
    }


def predictions_from_row(row: Mapping[str, Any]) -> TaskPredictions | None:
    """The predictions a row (or `prediction_columns`' dict) holds, or None where it has none
    (a row written before the columns existed). Raises `ValueError` on inconsistent columns."""
    n, correct, predicted = row.get("n_examples"), row.get("correct"), row.get("predicted")
    if _null(correct):
        if not _null(n) or not _null(predicted):
            raise ValueError("n_examples or predicted without correct")
        return None
    if isinstance(n, float | np.floating) and float(n).is_integer():
        n = int(n)  # a DataFrame's column holding nulls too is float
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n_examples must be a positive integer beside correct, got {n!r}")
    if not isinstance(correct, str) or not (_null(predicted) or isinstance(predicted, str)):
        raise ValueError("correct and predicted must be text")
    bits = unpack_correct(correct, int(n))
    classes = None if _null(predicted) else unpack_predicted(predicted, int(n))
    return TaskPredictions(bits, classes)


def check_prediction_columns(row: Mapping[str, Any]) -> None:
    """`ValueError` unless the row's prediction columns are absent or consistent, with its accuracy too."""
    p = predictions_from_row(row)
    if p is None:
        return
    acc = row.get("accuracy")
    if isinstance(acc, int | float) and not math.isclose(acc, p.accuracy, rel_tol=0, abs_tol=1e-9):
        raise ValueError(f"accuracy {acc!r} is not 100·mean(correct) = {p.accuracy!r}")


def _null(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
