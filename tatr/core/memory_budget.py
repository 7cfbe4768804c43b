"""Whether a one-shot merge fits in memory, or runs out of core (`tatr.core.out_of_core`).

Why a guess from the headers: the choice must be made before the merge reads a tensor. The estimate is
the in-memory path's arenas at their largest phase (`in_memory_bytes`), to compare with a budget: given
(`tatr merge --memory-budget`, `merge(memory_budget=…)`), else 80% of MemAvailable, which leaves room for
the page cache the inputs are read through. It was checked to cover what a plan actually allocates
(tests/test_out_of_core.py).
"""

from __future__ import annotations

import math

from tatr.core.errors import TatrError
from tatr.core.methods import MergeMethod
from tatr.core.passes import arena_dtype
from tatr.core.trust_region import drop_count
from tatr.core.vectors import TaskSet

BUDGET_SHARE = 0.8  # of MemAvailable: the default memory budget


def in_memory_bytes(ts: TaskSet, method: MergeMethod, mode: str, components: object, q: float) -> int:
    """About the peak of the in-memory merge's arenas, from the inputs' headers (the largest of its phases).

    Scan: Σ τ (a linear method only) and Ω; selection: those and the ranked drop order (~24 bytes per
    dropped coordinate: candidates, values, sort); merge: Σ τ or M, the keep mask (re-streaming methods),
    the drop order and the merged state dict, held, then copied once more by safetensors' `save_file`."""
    n = sum(_numel(ts.shapes[k]) for k in ts.candidate_keys)
    arena = arena_dtype(ts).itemsize * n
    output = sum(_numel(ts.shapes[k]) * ts.dtypes[k].itemsize for k in ts.output_keys)
    omega = 0 if mode == "off" else 4 * n
    order = 0 if mode == "off" else 24 * drop_count(q, n)
    if method.linear and components is None:
        return max(arena + omega + order, arena + order + 2 * output)
    keep = 0 if mode == "off" else n
    return max(omega + order, order + keep + arena + 2 * output)


def memory_budget() -> int | None:
    """The default budget: 80% of MemAvailable (/proc/meminfo), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * BUDGET_SHARE)
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose_out_of_core(
    ts: TaskSet,
    method: MergeMethod,
    mode: str,
    components: object,
    q: float,
    low_memory: bool | None,
    budget: int | None,
    lam_neg: float | None = None,
) -> tuple[bool, str | None]:
    """(whether this merge runs out of core, a one-line note saying why, or None).

    `low_memory` True forces it (a merge that cannot run out of core is refused in one line), False
    forbids it, None decides: out of core for a linear merge without a trust region or components (the
    streamed sum is one pass over the inputs, the same bits, and the arenas would buy nothing for one merge),
    and otherwise when `in_memory_bytes` exceeds `budget` (default `memory_budget()`); a merge that cannot run
    out of core then stays in memory, with a note."""
    if low_memory:
        if lam_neg is not None:
            raise TatrError("lam_neg (--lam-neg) cannot run out of core (it keeps two arenas): drop --low-memory")
        return True, None
    if low_memory is not None:
        return False, None
    if method.linear and components is None and mode == "off" and lam_neg is None:
        return True, None  # one pass either way: arenas over N would only cost their memory and a copy
    need = in_memory_bytes(ts, method, mode, components, q)
    budget = memory_budget() if budget is None else budget
    if budget is None or need <= budget:
        return False, None
    over = f"the in-memory merge needs about {need / 2**30:.2f} GiB, over the {budget / 2**30:.2f} GiB memory budget"
    if lam_neg is not None:
        return False, f"{over}, but lam_neg cannot run out of core: merging in memory"
    return True, f"{over}: merging out of core (exact; the inputs are read once per pass)"


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(int(s) for s in shape)
