"""Tools by name: adding a tool is one module and one line here."""

from __future__ import annotations

from collections.abc import Iterable

from pyagent.fleet.tools.base import Tool, ToolError
from pyagent.fleet.tools.files import (
    EditFile,
    ListFiles,
    ReadFile,
    ReplaceLines,
    WriteFile,
)
from pyagent.fleet.tools.lint import Lint
from pyagent.fleet.tools.shell import Shell
from pyagent.fleet.tools.testing import RunTests
from pyagent.types import ToolSpec

TOOLS: dict[str, type[Tool]] = {
    "read_file": ReadFile,
    "write_file": WriteFile,
    "edit_file": EditFile,
    "replace_lines": ReplaceLines,
    "list_files": ListFiles,
    "run_tests": RunTests,
    "lint": Lint,
    "shell": Shell,
}

# the tools that change the workspace's files
EDITS = frozenset({"write_file", "edit_file", "replace_lines"})


def make_tool(name: str) -> Tool:
    """The tool called `name`."""
    try:
        return TOOLS[name]()
    except KeyError:
        raise ToolError(f"unknown tool {name!r}; known tools: {', '.join(TOOLS)}") from None


def tool_specs(names: Iterable[str]) -> tuple[ToolSpec, ...]:
    """The named tools as a model is offered them."""
    return tuple(ToolSpec(tool.name, tool.description, tool.input_schema())
                 for tool in map(make_tool, names))
