"""The `run_tests` tool: pytest on the workspace in the sandbox, counts parsed."""

from __future__ import annotations

import re
import sys

from pydantic import Field

from pyagent.fleet.tools.base import (
    BaseTool,
    ToolContext,
    ToolError,
    ToolInput,
    ToolResult,
)
from pyagent.fleet.tools.process import run_command

_SUMMARY_LINE = re.compile(r"\bin \d+(?:\.\d+)?s\b")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")
_PLURAL = {"error": "errors", "warning": "warnings"}
_NOTHING_RAN = {4: "pytest usage error", 5: "no tests collected"}  # pytest's exit codes


def parse_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("1 failed, 2 passed in 0.12s"); absent ones are 0."""
    counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    for line in reversed(output.splitlines()):
        if _SUMMARY_LINE.search(line):
            for number, word in _COUNT.findall(line):
                counts[_PLURAL.get(word, word)] = int(number)
            break
    return counts


def failed_tests(output: str) -> list[str]:
    """Node ids from pytest's short summary (`FAILED x.py::t - ...`, `ERROR x.py`)."""
    return [line.split(" ", 1)[1].split(" - ", 1)[0] for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


class RunTestsInput(ToolInput):
    path: str | None = Field(
        None, description="Test file or directory relative to the workspace root; default: all.")
    keyword: str | None = Field(None, description="Only tests matching this pytest -k expression.")


class RunTests(BaseTool[RunTestsInput]):
    name = "run_tests"
    description = "Run the workspace's tests with pytest; report passed, failed and error counts."
    input_model = RunTestsInput

    def run(self, args: RunTestsInput, context: ToolContext) -> ToolResult:
        """Counts, failures and `ran` (tests that passed or failed); a ToolError when pytest
        ran no test at all (nothing collected, a path that does not exist, a bad option, only
        collection errors, a conftest that exits early)."""
        root = str(context.workspace.root)
        # -B: no bytecode caches, which go stale when a file is rewritten within the second
        # at the same size, so a fix would be tested as the old code
        argv = [sys.executable, "-B", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "--rootdir", root, "--confcutdir", root]
        if args.keyword is not None:
            argv += ["-k", args.keyword]
        if args.path is not None:
            argv.append(str(context.workspace.resolve(args.path)))
        result = run_command(argv, context)
        if result.returncode in _NOTHING_RAN and not result.timed_out:
            raise ToolError(f"no tests ran ({_NOTHING_RAN[result.returncode]}):\n"
                            f"{result.transcript()}")
        counts = parse_summary(result.stdout)
        if counts["passed"] + counts["failed"] == 0:
            why = "timed out" if result.timed_out else f"exit code {result.returncode}"
            raise ToolError(f"no tests ran (pytest reported none passed or failed; {why}):\n"
                            f"{result.transcript()}")
        return ToolResult(result.transcript(), {
            **counts, "ran": counts["passed"] + counts["failed"],
            "failures": failed_tests(result.stdout), "returncode": result.returncode,
            "timed_out": result.timed_out, "duration_s": result.duration_s,
            "sandbox": result.sandbox})
