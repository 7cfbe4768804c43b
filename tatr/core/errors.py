"""The one exception type a user's mistake turns into.

The CLI prints a `TatrError` as a single line on stderr and exits non-zero; anything else is a bug
and keeps its traceback. Raise it with a message that names the file and the key at fault.
"""

from __future__ import annotations


class TatrError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def input_error(source: object, key: str | None, problem: str) -> TatrError:
    """Build the error for a bad checkpoint/gradient file so every message has the same shape."""
    where = f"{source}" if key is None else f"{source}: key '{key}'"
    return TatrError(f"{where}: {problem}")


class PickledObjectError(TatrError):
    """A torch file that pickles Python objects (e.g. whole modules) rather than a plain state dict."""


class PickleNeedsTrust(TatrError):
    """A well-formed pickle whose tensors are stored through its own reduce functions: only running
    its code (`--trust-pickle`) can rebuild them. Raised for nothing else, so that the suggestion
    to run a file's code is never made for a file that is merely damaged."""


class UnreadableCheckpoint(TatrError):
    """A damaged, truncated, empty or foreign file: no flag can make it readable."""
