"""Tools by name: adding a tool is one module and one line here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pyagent.fleet.tools.base import Tool, ToolError
from pyagent.fleet.tools.files import ListFiles, ReadFile, WriteFile
from pyagent.fleet.tools.lint import Lint
from pyagent.fleet.tools.shell import Shell
from pyagent.fleet.tools.testing import RunTests

TOOLS: dict[str, type[Tool]] = {
    "read_file": ReadFile,
    "write_file": WriteFile,
    "list_files": ListFiles,
    "run_tests": RunTests,
    "lint": Lint,
    "shell": Shell,
}


def make_tool(name: str) -> Tool:
    """The tool called `name`."""
    try:
        return TOOLS[name]()
    except KeyError:
        raise ToolError(f"unknown tool {name!r}; known tools: {', '.join(TOOLS)}") from None


def tool_schemas(names: Iterable[str]) -> list[dict[str, Any]]:
    """The named tools described in the OpenAI function-calling format."""
    schemas = []
    for name in names:
        tool = make_tool(name)
        schemas.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description,
            "parameters": tool.input_schema()}})
    return schemas
