"""Name → object lookup for methods, suites and commands, with "did you mean" errors.

Registries are how configs name things: a YAML file says `method: ties` and the registry turns
the string into the object, or tells the user which names exist.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from tatr.core.errors import TatrError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise TatrError(unknown_name(self.kind, name, self._items)) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def values(self) -> list[T]:
        """The registered objects in registration order (an order the registrant chose, e.g. for tables)."""
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def did_you_mean(
    name: object, known: Iterable[object], *, n: int = 1, cutoff: float = 0.6, prefix: str = "", fold_case: bool = False
) -> str:
    """ "; did you mean 'x'?" (or "'x' or 'y'" for n > 1) for the known names closest to `name`, else "".

    The one place a lookup suggests a name, so every error reads alike. `prefix` is put before each
    suggestion (a dotted key's parent, e.g. "suite."); `fold_case` compares case-insensitively and
    suggests the name as it is spelled in `known`.
    """
    names = [str(k) for k in known]
    if fold_case:
        spelled = {k.lower(): k for k in names}
        close = [spelled[c] for c in difflib.get_close_matches(str(name).lower(), list(spelled), n=n, cutoff=cutoff)]
    else:
        close = difflib.get_close_matches(str(name), names, n=n, cutoff=cutoff)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def unknown_name(kind: str, name: object, known: Iterable[object], *, n: int = 3, cutoff: float = 0.5) -> str:
    """The one-line message for an unknown name: the closest matches, then every known name."""
    names = sorted(str(k) for k in known)
    return f"unknown {kind} '{name}'{did_you_mean(name, names, n=n, cutoff=cutoff)} (known: {', '.join(names)})"
