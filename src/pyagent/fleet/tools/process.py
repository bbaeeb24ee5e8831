"""`run_command`: one command in the context's sandbox, under its limits, output kept bounded."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from pyagent.fleet.tools.base import Limits, ToolContext, ToolError
from pyagent.fleet.tools.sandbox import default_sandbox


@dataclass(frozen=True)
class CommandResult:
    """A finished or killed command. stdout and stderr keep their last `max_output_bytes`."""

    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool
    truncated: bool
    sandbox: str

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


def run_command(argv: Sequence[str], context: ToolContext,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run `argv` without a shell in the workspace root, in `context`'s sandbox, in its own
    session, under `context.limits`; a ToolError when the sandbox refuses.

    The environment holds only PATH, HOME (the workspace), LANG and `env`. When the command ends
    or times out, its whole process group is killed; in a sandbox that ends its PID namespace, so
    no descendant outlives the call.
    """
    if not argv:
        raise ToolError("no command given")
    workspace, limits = context.workspace, context.limits
    environment = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(workspace.root),
                   "LANG": "C.UTF-8", **(env or {})}
    if "/" not in argv[0] and shutil.which(argv[0], path=environment["PATH"]) is None:
        raise ToolError(f"cannot run {argv[0]!r}: no such program")
    sandbox = context.sandbox or default_sandbox()
    command = sandbox.wrap(argv, workspace, limits)
    start = time.monotonic()
    try:
        process = subprocess.Popen(
            command, cwd=workspace.root, env=environment, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_set_limits(limits))
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
    root = str(workspace.root)
    return CommandResult(
        returncode=process.returncode, stdout=relative(stdout.text(), root),
        stderr=relative(stderr.text(), root),
        duration_s=duration, timed_out=timed_out,
        truncated=bool(stdout.dropped or stderr.dropped), sandbox=sandbox.name)


def relative(text: str, root: str) -> str:
    """`text` with the workspace's own paths relative to it: an agent reads the paths its file
    tools take, and what it reads does not depend on where the workspace lies on this host (so
    a run reads the same on every node, and its prompts share prefixes with other runs')."""
    text = text.replace(root + "/", "")
    return re.sub(re.escape(root) + r"(?![\w.-])", ".", text)


def _set_limits(limits: Limits) -> Callable[[], None]:
    """What the child runs before its exec: the per-process limits (address space, file size),
    which the sandbox and every process in it inherit."""
    def apply() -> None:
        if limits.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
    return apply
