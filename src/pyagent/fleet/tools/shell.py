"""The `shell` tool: run an allow-listed command directly (no shell) in the workspace."""

from __future__ import annotations

import dataclasses

from pydantic import Field

from pyagent.fleet.tools.base import (
    BaseTool,
    ToolContext,
    ToolError,
    ToolInput,
    ToolResult,
)
from pyagent.fleet.tools.process import run_command


class ShellInput(ToolInput):
    argv: list[str] = Field(
        min_length=1, description="The command and its arguments. No shell runs them, so pipes, "
        "redirections, globs and variables are passed on literally.")


class Shell(BaseTool[ShellInput]):
    name = "shell"
    description = "Run one allowed command in the workspace and return its exit code and output."
    input_model = ShellInput

    def run(self, args: ShellInput, context: ToolContext) -> ToolResult:
        command = args.argv[0]
        if command not in context.allowed_commands:
            allowed = ", ".join(sorted(context.allowed_commands)) or "none"
            raise ToolError(f"command {command!r} is not allowed; allowed commands: {allowed}")
        result = run_command(args.argv, context)
        return ToolResult(result.transcript(), dataclasses.asdict(result))
