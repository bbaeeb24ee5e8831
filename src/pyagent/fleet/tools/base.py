"""The `Tool` seam: a workspace no path can leave, subprocess limits, and the tool protocol."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from pyagent.errors import ConfigError, PyAgentError

if TYPE_CHECKING:
    from pyagent.fleet.tools.sandbox import Sandbox


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
    """Bounds on one command: wall time, address space per process (None: unbounded), output
    kept, processes at once (in the sandbox), size of a file it writes (and of its /tmp).

    In the bubblewrap sandbox one call holds at most `max_processes` processes (a root runtime:
    the PID namespace's `pid_max`, at least 301), so at most that many times `memory_bytes` of
    address space, plus `max_file_bytes` in /tmp and 64 MiB each in /dev/shm and System V shared
    memory (the only memory that outlives its processes); workspace files up to `max_file_bytes`
    each; `timeout_s` of wall time. See `fleet/tools/bubblewrap.py`."""

    timeout_s: float = 60.0
    memory_bytes: int | None = 4 * 1024**3
    max_output_bytes: int = 64 * 1024
    max_processes: int = 128
    max_file_bytes: int = 1024**3

    def __post_init__(self) -> None:
        memory = 1 if self.memory_bytes is None else self.memory_bytes
        if min(self.timeout_s, memory, self.max_output_bytes, self.max_processes,
               self.max_file_bytes) <= 0:
            raise ConfigError(f"tool limits must be positive: {self}")


@dataclass(frozen=True)
class ToolContext:
    """What a tool call may touch: its workspace, subprocess limits, the commands `shell` runs,
    the files it may write (workspace-relative globs; `*` also crosses directories), and the
    sandbox commands run in (None: the one `PYAGENT_SANDBOX` names, bubblewrap by default)."""

    workspace: Workspace
    limits: Limits = field(default_factory=Limits)
    allowed_commands: frozenset[str] = frozenset()
    writable: tuple[str, ...] = ("*",)
    sandbox: Sandbox | None = None


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
