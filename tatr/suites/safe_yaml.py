"""YAML without aliases: the one YAML parser of tatr (experiments, ablations, sweep spaces, task files).

`*a` repeated inside `&a` nine levels deep expands a 1 kB file into a billion nodes ("billion
laughs"), and no tatr file needs aliases, so they are refused before they are expanded. The loader
is a `yaml.SafeLoader` subclass: no arbitrary Python objects either.

It lives in the suites layer, the lowest that may import yaml (the core may not), because the text
suite reads task files with it and everything above (configs) shares it.
"""

from __future__ import annotations

from typing import Any

import yaml

from tatr.core.errors import TatrError


class _AliasRefused(yaml.composer.ComposerError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (`*name`) before they are expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(None, None, "alias", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, source: object) -> Any:
    """YAML → Python, with the two refusals that are never "just text": aliases and deep nesting."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: no arbitrary objects
    except _AliasRefused as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
        raise TatrError(
            f"{source}: line {line}: YAML aliases (*name) are refused (they can expand a small file into billions of "
            "values); write the value out"
        ) from None
    except RecursionError:
        raise TatrError(f"{source}: YAML nested too deeply") from None


def parse_yaml(text: str, source: object) -> Any:
    """Safe YAML without aliases; `source` (a file, or an override) names the problem in one line."""
    try:
        return load_yaml(text, source)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise TatrError(f"{source}: not valid YAML ({problem})") from None
