"""The `Sandbox` seam: what turns a tool's command line into one that runs confined.

Policy: commands run inside bubblewrap (`bubblewrap.Bubblewrap`). When it is missing or cannot
create its namespaces, every command is refused with a ToolError that says how to install it.
Running unconfined takes an explicit choice: `ToolContext(sandbox=Unconfined())` or the
environment variable `PYAGENT_SANDBOX=none`; it warns, and each result records `sandbox: none`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pyagent.fleet.tools.base import Limits, ToolError, Workspace
from pyagent.fleet.tools.bubblewrap import Bubblewrap

SANDBOX_ENV = "PYAGENT_SANDBOX"


@runtime_checkable
class Sandbox(Protocol):
    """Confines a command to its workspace: `wrap` returns the command line to start instead."""

    name: str

    def wrap(self, argv: Sequence[str], workspace: Workspace, limits: Limits) -> list[str]:
        """The command line that runs `argv` confined; a ToolError when it cannot be confined."""
        ...


class UnconfinedWarning(UserWarning):
    """Tool commands run with the runtime's own access to files, network and processes."""


class Unconfined:
    """No confinement at all: only for a machine without namespaces, chosen explicitly.

    It warns with an UnconfinedWarning, which Python's default filter shows once per process.
    """

    name = "none"

    def wrap(self, argv: Sequence[str], workspace: Workspace, limits: Limits) -> list[str]:
        warnings.warn(f"tool commands run UNCONFINED ({SANDBOX_ENV}=none or sandbox=Unconfined()): "
                      "they can read, write and connect anywhere this process can",
                      UnconfinedWarning, stacklevel=2)
        return list(argv)


def default_sandbox() -> Sandbox:
    """The sandbox `PYAGENT_SANDBOX` names: `bubblewrap` (also when unset) or `none`."""
    choice = os.environ.get(SANDBOX_ENV, "bubblewrap")
    if choice == "bubblewrap":
        return Bubblewrap()
    if choice == "none":
        return Unconfined()
    raise ToolError(f"{SANDBOX_ENV}={choice!r} is not a sandbox; use 'bubblewrap' or 'none'")
