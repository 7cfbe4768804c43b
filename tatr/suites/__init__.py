"""Research benchmarks behind one interface (`Suite`), looked up by name in `SUITES`.

Suites register themselves on import; `get_suite` imports the known modules lazily so that the
numerical core never pays for open_clip or dataset code it does not use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from tatr.core.errors import TatrError
from tatr.core.registry import unknown_name
from tatr.suites.base import SUITES, Checkpoints, ExemplarGradients, Suite

_MODULES = {
    "testbed": "tatr.suites.testbed",
    "clip8": "tatr.suites.clip8",
    "text": "tatr.suites.text",
    "lm": "tatr.suites.causal_lm",
}


def get_suite(name: str, options: dict[str, Any] | None = None, cache_dir: Path | None = None) -> Suite:
    """Build the suite `name` with its options; unknown names get a "did you mean" error."""
    module = _MODULES.get(name)
    if module is not None:
        importlib.import_module(module)
    elif name not in SUITES:
        raise TatrError(unknown_name("benchmark", name, sorted({*_MODULES, *SUITES.names()})))
    factory = SUITES.get(name)
    return factory(dict(options or {}), cache_dir)


__all__ = ["SUITES", "Checkpoints", "ExemplarGradients", "Suite", "get_suite"]
