"""The `Tool` seam: a workspace no path can leave, limited subprocesses, and the tool protocol."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from pyagent.errors import ConfigError, PyAgentError


class ToolError(PyAgentError):
    """A tool call was refused or failed; the message is written for the agent that made it."""


class Workspace:
    """The directory a tool works in; every path a tool is given is resolved inside it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ToolError(f"workspace {self.root} is not a directory")

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def resolve(self, path: str) -> Path:
        """The absolute, symlink-free path that `path` (relative to the root) names.

        Refuses with a ToolError anything that lands outside the root: `..` escapes, absolute
        paths elsewhere, symlinks pointing out.
        """
        try:
            resolved = (self.root / path).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL byte, ...
            raise ToolError(f"cannot resolve path {path!r}: {exc}") from None
        if not resolved.is_relative_to(self.root):
            raise ToolError(f"path {path!r} is outside the workspace {self.root}")
        return resolved

    def relative(self, path: Path) -> str:
        """`path` (inside the root) relative to the root, with forward slashes."""
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class Limits:
    """Bounds on one subprocess: wall time, address space (None: unbounded), output kept."""

    timeout_s: float = 60.0
    memory_bytes: int | None = 4 * 1024**3
    max_output_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        memory = 1 if self.memory_bytes is None else self.memory_bytes
        if min(self.timeout_s, memory, self.max_output_bytes) <= 0:
            raise ConfigError(f"tool limits must be positive: {self}")


@dataclass(frozen=True)
class CommandResult:
    """A finished or killed command. stdout and stderr keep their last `max_output_bytes`."""

    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool
    truncated: bool

    def transcript(self) -> str:
        """Status, stdout and stderr as one text for an agent to read."""
        status = "timed out" if self.timed_out else f"exit code {self.returncode}"
        parts = [f"[{status} after {self.duration_s:.1f}s]"]
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        return "\n".join(parts)


class _Tail:
    """Drains a pipe on a thread and keeps only its last `keep` bytes."""

    def __init__(self, stream: IO[bytes], keep: int) -> None:
        self._buffer = bytearray()
        self.dropped = 0
        self._thread = threading.Thread(target=self._drain, args=(stream, keep), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes], keep: int) -> None:
        with stream:
            while chunk := os.read(stream.fileno(), 65536):
                self._buffer += chunk
                excess = len(self._buffer) - keep
                if excess > 0:
                    del self._buffer[:excess]
                    self.dropped += excess

    def text(self) -> str:
        self._thread.join(timeout=5)
        text = bytes(self._buffer).decode("utf-8", errors="replace")
        return f"[... {self.dropped} bytes dropped ...]\n{text}" if self.dropped else text


def run_command(argv: Sequence[str], workspace: Workspace, limits: Limits,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run `argv` without a shell in the workspace root, in its own session, under `limits`.

    The environment holds only PATH, HOME (the workspace), LANG and `env`. When the command ends
    or times out, its whole process group is killed, so no descendant outlives the call.
    """
    if not argv:
        raise ToolError("no command given")
    environment = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(workspace.root),
                   "LANG": "C.UTF-8", **(env or {})}
    limit_memory = None if limits.memory_bytes is None else functools.partial(
        resource.setrlimit, resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    start = time.monotonic()
    try:
        process = subprocess.Popen(
            list(argv), cwd=workspace.root, env=environment, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=limit_memory)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolError(f"cannot run {argv[0]!r}: {exc}") from None
    assert process.stdout is not None and process.stderr is not None
    stdout = _Tail(process.stdout, limits.max_output_bytes)
    stderr = _Tail(process.stderr, limits.max_output_bytes)
    timed_out = False
    try:
        process.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is already empty
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    duration = time.monotonic() - start
    return CommandResult(
        returncode=process.returncode, stdout=stdout.text(), stderr=stderr.text(),
        duration_s=duration, timed_out=timed_out,
        truncated=bool(stdout.dropped or stderr.dropped))


@dataclass(frozen=True)
class ToolContext:
    """What a tool call may touch: its workspace, subprocess limits, the commands `shell` runs,
    and the files it may write (workspace-relative globs; `*` also crosses directories)."""

    workspace: Workspace
    limits: Limits = field(default_factory=Limits)
    allowed_commands: frozenset[str] = frozenset()
    writable: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class ToolResult:
    """A tool's answer: text for the agent and structured data for programs."""

    output: str
    data: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Tool(Protocol):
    """Something an agent can call: typed inputs described by a JSON schema, a ToolResult out."""

    name: str
    description: str
    input_model: type[BaseModel]

    def input_schema(self) -> dict[str, Any]: ...

    def call(self, arguments: Mapping[str, Any], context: ToolContext) -> ToolResult: ...


class ToolInput(BaseModel):
    """Base of tool input models: unknown arguments are refused."""

    model_config = ConfigDict(extra="forbid")


InputT = TypeVar("InputT", bound=ToolInput)


class BaseTool(ABC, Generic[InputT]):
    """A `Tool` whose `call` validates the arguments into `input_model` and hands them to `run`."""

    name: str
    description: str
    input_model: type[InputT]

    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    def call(self, arguments: Mapping[str, Any], context: ToolContext) -> ToolResult:
        try:
            parsed = self.input_model.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'arguments'}: {error['msg']}"
                for error in exc.errors())
            raise ToolError(f"invalid arguments for {self.name}: {problems}") from None
        return self.run(parsed, context)

    @abstractmethod
    def run(self, args: InputT, context: ToolContext) -> ToolResult:
        """Carry out a call whose arguments are already valid."""
