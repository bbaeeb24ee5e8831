"""File tools: read a file (or some of its lines), write one or replace a piece of it atomically,
list files by glob."""

from __future__ import annotations

import os
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from pyagent.fleet.tools.base import BaseTool, ToolContext, ToolError, ToolInput, ToolResult

PATH_HELP = "Path relative to the workspace root."
MAX_LINE = 10_000_000  # bounds line numbers, so a constrained model cannot write digits forever


class _LineRange(ToolInput):
    """Arguments with a `start_line` and an optional `end_line`, which may not come before it."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        start, end = getattr(self, "start_line", None), getattr(self, "end_line", None)
        if start and end and end < start:
            raise ValueError("end_line is before start_line")
        return self


class ReadFileInput(_LineRange):
    path: str = Field(description=PATH_HELP)
    start_line: int | None = Field(None, ge=1, le=MAX_LINE,
                                   description="First line to return (1-based).")
    end_line: int | None = Field(None, ge=1, le=MAX_LINE,
                                 description="Last line to return (inclusive).")
    max_bytes: int = Field(100_000, ge=1, le=1_000_000, description="Most bytes to return.")


class ReadFile(BaseTool[ReadFileInput]):
    name = "read_file"
    description = "Read a text file from the workspace, optionally only a range of its lines."
    input_model = ReadFileInput

    def run(self, args: ReadFileInput, context: ToolContext) -> ToolResult:
        target = context.workspace.resolve(args.path)
        if not target.is_file():
            raise ToolError(f"{args.path!r} is not a file in the workspace")
        first = args.start_line or 1
        try:
            lines, truncated = _read_lines(target, first, args.end_line, args.max_bytes)
        except OSError as exc:
            raise ToolError(f"cannot read {args.path!r}: {exc.strerror or exc}") from None
        output = "".join(lines)
        if truncated:
            output += (f"\n[truncated at {args.max_bytes} bytes; "
                       f"continue from line {first + len(lines)}]")
        return ToolResult(output, {
            "path": context.workspace.relative(target), "start_line": first,
            "end_line": first + len(lines) - 1, "truncated": truncated})


def _read_lines(target: Path, first: int, last: int | None,
                max_bytes: int) -> tuple[list[str], bool]:
    """Lines `first`..`last` of `target`, stopping before `max_bytes`; and whether it stopped."""
    lines: list[str] = []
    size = 0
    with target.open(encoding="utf-8", errors="replace", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if number < first:
                continue
            if last is not None and number > last:
                break
            size += len(line.encode())
            if size > max_bytes:
                return lines, True
            lines.append(line)
    return lines, False


class WriteFileInput(ToolInput):
    path: str = Field(description=PATH_HELP + " Missing parent directories are created.")
    content: str = Field(description="The file's complete new content.")


class WriteFile(BaseTool[WriteFileInput]):
    name = "write_file"
    description = "Create or replace a text file in the workspace with the given content."
    input_model = WriteFileInput

    def run(self, args: WriteFileInput, context: ToolContext) -> ToolResult:
        target, relative = _writable(args.path, context)
        data = args.content.encode()
        _save(target, args.path, data)
        return ToolResult(f"wrote {len(data)} bytes to {relative}",
                          {"path": relative, "bytes": len(data)})


class EditFileInput(ToolInput):
    path: str = Field(description=PATH_HELP)
    old: str = Field(min_length=1, description="The exact text to replace; it must occur once "
                                               "in the file.")
    new: str = Field(description="The text to put in its place.")


class EditFile(BaseTool[EditFileInput]):
    name = "edit_file"
    description = ("Replace one piece of a text file: the exact text `old`, which must occur "
                   "once, becomes `new`.")
    input_model = EditFileInput

    def run(self, args: EditFileInput, context: ToolContext) -> ToolResult:
        target, relative = _writable(args.path, context)
        text = _text_of(target, args.path)
        found = text.count(args.old)
        if found != 1:
            raise ToolError(f"the text to replace occurs {found} times in {relative}, not once"
                            + ("; copy it exactly from the file" if not found else
                               "; include more of its surroundings"))
        start = text.index(args.old)
        line = text.count("\n", 0, start) + 1
        _save(target, args.path, text.replace(args.old, args.new, 1).encode())
        return ToolResult(f"replaced {args.old.count(chr(10)) + 1} line(s) at line {line} "
                          f"of {relative}", {"path": relative, "line": line})


class ReplaceLinesInput(_LineRange):
    path: str = Field(description=PATH_HELP)
    start_line: int = Field(ge=1, le=MAX_LINE, description="First line to replace (1-based).")
    end_line: int | None = Field(None, ge=1, le=MAX_LINE,
                                 description="Last line to replace (default: start_line).")
    text: str = Field(description="The new lines.")


class ReplaceLines(BaseTool[ReplaceLinesInput]):
    name = "replace_lines"
    description = ("Replace lines start_line to end_line of a text file with new text; text "
                   "without indentation takes the first replaced line's.")
    input_model = ReplaceLinesInput

    def run(self, args: ReplaceLinesInput, context: ToolContext) -> ToolResult:
        target, relative = _writable(args.path, context)
        lines = _text_of(target, args.path).splitlines(keepends=True)
        last = args.end_line or args.start_line
        if last > len(lines):
            raise ToolError(f"{relative} has {len(lines)} lines; cannot replace lines "
                            f"{args.start_line}-{last}")
        first = lines[args.start_line - 1]
        indent = first[:len(first) - len(first.lstrip(" \t"))]
        new = args.text.splitlines(keepends=True) or [""]
        if indent and not new[0].startswith((" ", "\t")):
            new = [indent + line if line.strip() else line for line in new]
        if lines[last - 1].endswith("\n") and not new[-1].endswith("\n"):
            new[-1] += "\n"
        lines[args.start_line - 1:last] = new
        _save(target, args.path, "".join(lines).encode())
        return ToolResult(f"replaced lines {args.start_line}-{last} of {relative} with "
                          f"{len(new)} line(s)", {"path": relative, "start_line": args.start_line,
                                                 "end_line": last})


def _text_of(target: Path, path: str) -> str:
    try:
        return target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ToolError(f"{path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolError(f"cannot read {path!r}: {exc}") from None

def _writable(path: str, context: ToolContext) -> tuple[Path, str]:
    """The file `path` names and its workspace-relative path, if the agent may write it."""
    target = context.workspace.resolve(path)
    if target.is_dir():
        raise ToolError(f"{path!r} is a directory")
    relative = context.workspace.relative(target)
    if not any(fnmatch(relative, pattern) for pattern in context.writable):
        raise ToolError(f"this agent may not write {relative!r}; it may write "
                        f"{', '.join(context.writable) or 'nothing'}")
    return target, relative


def _save(target: Path, path: str, data: bytes) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, data)
    except OSError as exc:
        raise ToolError(f"cannot write {path!r}: {exc.strerror or exc}") from None


def _atomic_write(target: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `target`, then rename it over `target`."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, target.stat().st_mode & 0o7777 if target.exists() else 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ListFilesInput(ToolInput):
    pattern: str = Field("**/*", description="Glob relative to the workspace root: src/**/*.py.")
    max_results: int = Field(200, ge=1, le=10_000, description="Most paths to return.")


class ListFiles(BaseTool[ListFilesInput]):
    name = "list_files"
    description = "List the workspace's files matching a glob pattern, sorted."
    input_model = ListFilesInput

    def run(self, args: ListFilesInput, context: ToolContext) -> ToolResult:
        root = context.workspace.root
        if Path(args.pattern).is_absolute() or ".." in Path(args.pattern).parts:
            raise ToolError(f"pattern {args.pattern!r} must be relative and must not contain '..'")
        try:
            found = sorted(context.workspace.relative(path) for path in root.glob(args.pattern)
                           if path.is_file() and path.resolve().is_relative_to(root))
        except (OSError, ValueError, NotImplementedError) as exc:
            raise ToolError(f"cannot list {args.pattern!r}: {exc}") from None
        shown = found[:args.max_results]
        output = "\n".join(shown)
        if len(found) > len(shown):
            output += f"\n[{len(found) - len(shown)} more not shown]"
        return ToolResult(output, {"files": shown, "total": len(found),
                                   "truncated": len(found) > len(shown)})
