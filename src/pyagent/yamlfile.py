"""YAML definitions validated by pydantic, with errors that name the file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pyagent.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)
Lines = dict[tuple[Any, ...], int]


def load_yaml(path: Path) -> tuple[Any, Lines]:
    """Parse `path`; return the data and the 1-based line of every mapping key and list item."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if node is None:
        raise ConfigError(f"{path}: the file is empty")
    lines: Lines = {}
    return _build(node, (), lines, yaml.SafeLoader("")), lines


def _build(node: yaml.Node, at: tuple[Any, ...], lines: Lines, loader: yaml.SafeLoader) -> Any:
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            out[key] = _build(value_node, (*at, key), lines, loader)
            lines[(*at, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*at, i), lines, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


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
