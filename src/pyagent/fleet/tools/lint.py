"""The `lint` tool: ruff on a workspace path, findings returned as structured data."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pydantic import Field

from pyagent.fleet.tools.base import (
    BaseTool,
    ToolContext,
    ToolError,
    ToolInput,
    ToolResult,
)
from pyagent.fleet.tools.process import run_command


class LintInput(ToolInput):
    path: str = Field(".", description="File or directory relative to the workspace root.")


class Lint(BaseTool[LintInput]):
    name = "lint"
    description = "Check Python code in the workspace with ruff and list its findings."
    input_model = LintInput

    def run(self, args: LintInput, context: ToolContext) -> ToolResult:
        workspace = context.workspace
        target = workspace.resolve(args.path)
        result = run_command(
            [sys.executable, "-m", "ruff", "check", "--output-format", "json", "--no-cache",
             "--exit-zero", str(target)], context)
        if result.timed_out or result.returncode != 0:
            raise ToolError(f"ruff failed on {args.path!r}:\n{result.transcript()}")
        if result.truncated:
            raise ToolError(f"ruff's report on {args.path!r} is longer than "
                            f"{context.limits.max_output_bytes} bytes; lint a smaller path")
        try:
            findings = [_finding(item, str(workspace.root)) for item in json.loads(result.stdout)]
        except (ValueError, KeyError, TypeError) as exc:
            raise ToolError(f"unexpected ruff output for {args.path!r}: {exc}") from None
        lines = [f"{f['path']}:{f['line']}:{f['column']}: {f['code']} {f['message']}"
                 for f in findings]
        return ToolResult("\n".join([f"{len(findings)} findings", *lines]),
                          {"count": len(findings), "findings": findings,
                           "sandbox": result.sandbox})


def _finding(item: dict[str, Any], root: str) -> dict[str, Any]:
    """One ruff JSON diagnostic, reduced to what an agent needs."""
    return {"code": item["code"] or "syntax-error", "message": item["message"],
            "path": os.path.relpath(os.path.join(root, item["filename"]), root),
            "line": item["location"]["row"],
            "column": item["location"]["column"], "fixable": item.get("fix") is not None}
