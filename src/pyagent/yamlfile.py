"""YAML definitions validated by pydantic, with errors that name the file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pyagent.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)
Lines = dict[tuple[Any, ...], int]


MAX_VALUES = 100_000  # values one file may expand to, aliases included ("billion laughs")
MAX_DEPTH = 100  # lists and mappings nested in each other
MAX_BYTES = 4 * 2**20  # size of one definition file
MERGE = "tag:yaml.org,2002:merge"


def load_yaml(path: Path) -> tuple[Any, Lines]:
    """Parse `path`; return the data and the 1-based line of every mapping key and list item.

    Merge keys (`<<: *defaults`) merge as YAML 1.1 says. A duplicate key, an alias that contains
    itself, aliases expanding to more than MAX_VALUES values, nesting deeper than MAX_DEPTH and
    files over MAX_BYTES are errors naming the line, as are syntax errors and bytes that are not
    UTF-8.
    """
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes; a definition file may have at most "
                              f"{MAX_BYTES:,}")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text: {exc.reason} "
                          f"(byte {raw[exc.start]:#04x})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(_syntax_error(path, text, exc)) from None
    except RecursionError:
        raise ConfigError(f"{path}:{_too_deep(text)}: nested too deeply (at most {MAX_DEPTH} "
                          "levels)") from None
    if node is None:
        raise ConfigError(f"{path}: the file is empty")
    lines: Lines = {}
    builder = _Builder(path, lines)
    return builder.build(node, ()), lines


def _too_deep(text: str) -> int:
    """The line where nesting first goes past MAX_DEPTH (from the parser's events, which,
    unlike composing, do not recurse)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return event.start_mark.line + 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return 1


def _syntax_error(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error, at the line where the faulty construct is.

    A construct left open (a quote, a bracket) is reported where it starts, not at the end of
    the file where the parser gave up; with no start known, at the file's last line of text."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    if mark is None and isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses
        line = text[:exc.position].count("\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"{path}:{line}: not valid YAML: {exc.reason} character {code:#x}"
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    line = min(mark.line + 1, len(text.rstrip().splitlines()) or 1)
    detail = ""
    if context is not None and context.line != mark.line:
        what = (getattr(exc, "context", None) or "a construct").removeprefix(
            "while scanning ").removeprefix("while parsing ")
        if "end of stream" in problem or "<stream end>" in problem:
            line, detail = context.line + 1, f": {what} that starts here is not closed"
        else:
            detail = f" (in {what} that starts at line {context.line + 1})"
    return f"{path}:{line}: not valid YAML: {problem}{detail}"


class _Builder:
    """Turns a composed YAML node graph into Python data, recording lines, refusing duplicate
    keys, self-containing aliases and runaway alias expansion."""

    def __init__(self, path: Path, lines: Lines) -> None:
        self.path, self.lines = path, lines
        self.loader = yaml.SafeLoader("")
        self.values = 0
        self.open: set[int] = set()  # nodes being built: meeting one again is a cycle

    def build(self, node: yaml.Node, at: tuple[Any, ...]) -> Any:
        line = node.start_mark.line + 1
        self.lines[at] = line
        self.values += 1
        if self.values > MAX_VALUES:
            raise ConfigError(f"{self.path}:{line}: the file expands to more than {MAX_VALUES} "
                              "values (aliases repeating aliases?)")
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            return self.scalar(node)
        if id(node) in self.open:
            raise ConfigError(f"{self.path}:{line}: an alias refers to a node that contains it")
        if len(self.open) >= MAX_DEPTH:
            raise ConfigError(f"{self.path}:{line}: nested too deeply (at most {MAX_DEPTH} "
                              "levels)")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*at, i)) for i, item in enumerate(node.value)]
            return self.mapping(node, at)
        finally:
            self.open.discard(id(node))

    def scalar(self, node: yaml.Node) -> Any:
        """A scalar's value; a tag whose value does not parse (`!!int abc`) or that names no
        safe type (`!foo`, `!!python/...`) is an error at its line."""
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{self.path}:{node.start_mark.line + 1}: cannot read "
                              f"{node.tag} value {node.value!r}: {problem}") from None

    def mapping(self, node: yaml.MappingNode, at: tuple[Any, ...]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == MERGE:
                merged = {**self.merge(value_node, at, line), **merged}
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{self.path}:{line}: a key must be a plain value, not a list "
                                  "or mapping")
            key = self.scalar(key_node)
            if key in out:
                raise ConfigError(f"{self.path}:{line}: duplicate key {key!r} (first at line "
                                  f"{self.lines[(*at, key)]})")
            out[key] = self.build(value_node, (*at, key))
            self.lines[(*at, key)] = line
        for key, value in merged.items():  # keys written in the mapping win
            if key not in out:
                out[key] = value
                self.lines[(*at, key)] = self.lines.get((*at, key), node.start_mark.line + 1)
        return out

    def merge(self, node: yaml.Node, at: tuple[Any, ...], line: int) -> dict[Any, Any]:
        """What `<<:` merges: a mapping, or a list of them (earlier ones win)."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        merged: dict[Any, Any] = {}
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise ConfigError(f"{self.path}:{line}: `<<` merges mappings (or a list of "
                                  "them) only")
            merged.update(self.build(source, (*at, "<<")))
        return merged


def line_of(lines: Lines, location: tuple[Any, ...]) -> int | None:
    """The line of `location`, or of its nearest enclosing entry that has one."""
    for end in range(len(location), -1, -1):
        if location[:end] in lines:
            return lines[location[:end]]
    return None


def validate(model: type[Model], data: Any, lines: Lines, path: Path,
             tags: set[str] = frozenset()) -> Model:
    """`model.model_validate(data)`, turning the first error into a ConfigError with a line;
    `tags` are union tags that pydantic puts in error locations and the file does not have."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = tuple(part for part in error["loc"] if part not in tags)
        line = line_of(lines, location)
        field = ".".join(str(part) for part in location) or "(top level)"
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {field}: {error['msg']}") from None


def config_error(path: Path, lines: Lines, location: tuple[Any, ...], message: str) -> ConfigError:
    """A ConfigError for `location` in a file loaded by `load_yaml`."""
    line = line_of(lines, location)
    return ConfigError(f"{path}:{line}: {message}" if line else f"{path}: {message}")
