"""YAML without aliases, read as YAML 1.2 reads words: the one YAML parser of tatr.

Experiments, ablations, sweep spaces, task files and `key=value` overrides all go through here, so
three rules hold for all of them at once:

* **No aliases.** `*a` repeated inside `&a` nine levels deep expands a 1 kB file into a billion
  nodes ("billion laughs"), and no tatr file needs aliases, so they are refused before they are
  expanded. The loader is a `yaml.SafeLoader` subclass: no arbitrary Python objects either.
* **Words stay words.** PyYAML resolves plain scalars as YAML 1.1 does, where `off`, `on`, `yes`
  and `no` are booleans and `2024-01-01` is a date, so `merge.trust_region=off` (the word
  `tatr merge --trust-region off` teaches) arrived as `False`. Here booleans are YAML 1.2's:
  `true` and `false` in their three spellings (`true`, `True`, `TRUE`); every other word is a
  string, and dates are strings too. A bool field still reads `yes`/`on`/`off`/`no` (pydantic
  parses those words into booleans; untyped flags use `as_flag`). Numbers keep YAML 1.1's rules,
  since stored results hash the values they were read as; a name field that gets a number takes
  its text back (`name_text`).
* **One line per failure.** Any failure to read or parse, including the ones PyYAML lets through
  as `ValueError` (an integer of 5,000 digits) or `RecursionError` (`[` nested 50,000 deep), is a
  `TatrError` of one line, `<file>:<line>: <problem>` (`tatr.io.text_files`).

It lives in the suites layer, the lowest that may import yaml (the core may not), because the text
suite reads task files with it and everything above (configs) shares it.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Any, ClassVar

import yaml

from tatr.core.errors import TatrError
from tatr.io.text_files import MIB, at, read_text

MAX_YAML_BYTES = 16 * MIB  # a YAML file tatr reads (experiment, ablation, search space, tasks list); PyYAML ~1 MB/s

_BOOL = "tag:yaml.org,2002:bool"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLAG_WORDS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


class _AliasRefused(yaml.composer.ComposerError):
    pass


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 booleans, no timestamps, and aliases refused before they are expanded."""

    yaml_implicit_resolvers: ClassVar[dict[Any, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _TIMESTAMP)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(None, None, "alias", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        """PyYAML's constructors let bare `ValueError`s out (`int()` of 5,000 digits, `!!float x`): give them a mark."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from None


_Loader.add_implicit_resolver(_BOOL, _BOOL_12, list("tTfF"))


def _where(source: object, line: int) -> str:
    """`<file>:<line>` for a file; an override (one line of text) is named as it is."""
    return at(source, line) if isinstance(source, PurePath) else f"{source}"


def load_yaml(text: str, source: object) -> Any:
    """YAML → Python, with the refusals that are never "just text": aliases, deep nesting, absurd sizes.

    Other YAML errors are raised as `yaml.YAMLError` (an override that is not YAML is taken as text);
    `parse_yaml` turns them into one line."""
    loader = None
    try:
        loader = _Loader(text)  # a SafeLoader subclass: no arbitrary objects
        return loader.get_single_data()
    except _AliasRefused as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else 1
        raise TatrError(
            f"{_where(source, line)}: YAML aliases (*name) are refused (they can expand a small file into billions "
            "of values); write the value out"
        ) from None
    except RecursionError:
        line = loader.get_mark().line + 1 if loader is not None else 1
        raise TatrError(f"{_where(source, line)}: YAML nested too deeply to read") from None
    except MemoryError:
        raise TatrError(f"{_where(source, 1)}: YAML too large to read into memory") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(text: str, source: object) -> Any:
    """Safe YAML without aliases; `source` (a file, or an override) names the problem in one line."""
    try:
        return load_yaml(text, source)
    except yaml.YAMLError as exc:
        raise TatrError(f"{_where(source, _line(exc, text))}: not valid YAML ({_problem(exc)})") from None


def read_yaml_file(path: str | Path, what: str) -> Any:
    """The YAML document in file `path` (at most `MAX_YAML_BYTES`, UTF-8); every failure is one line."""
    path = Path(path)
    return parse_yaml(read_text(path, what, MAX_YAML_BYTES), path)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; every problem is a one-line `TatrError`.

    Experiments, ablation files and sweep search spaces; `read_yaml_file` below it is shared with the
    text suite's task lists (at most 16 MiB, UTF-8, `<file>:<line>: <problem>`)."""
    path = Path(path)
    if not path.is_file():
        raise TatrError(f"{path}: no such {what}")
    raw = read_yaml_file(path, what)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TatrError(f"{path}: a {what} must be a mapping of keys to values")
    return raw


def _line(exc: yaml.YAMLError, text: str) -> int:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(exc, "position", None)  # a ReaderError (a character YAML does not allow)
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else 1


def _problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    if problem is None:  # a ReaderError, or a YAMLError without marks
        text = str(exc).split("\n")[0]
        return " ".join(text.split())
    context, mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and mark is not None and mark.line != getattr(exc.problem_mark, "line", mark.line):
        context = f"{context} from line {mark.line + 1}"
    return " ".join(f"{context}: {problem}".split()) if context else " ".join(str(problem).split())


def name_text(value: Any) -> Any:
    """A number written where a name was meant (a task or suite named `2024`) → its text; else `value`.

    For a pydantic name field (`BeforeValidator(name_text)`) or a name read from a file. The text is
    Python's (`2024` → "2024", `1.5` → "1.5"); quote a name whose spelling a number would change (`010`)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def as_flag(value: Any, what: str) -> bool:
    """An on/off option read without a schema: a bool, or one of yes/no/on/off/y/n (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.lower()]
    raise TatrError(f"{what} must be true or false, got {value!r}")
