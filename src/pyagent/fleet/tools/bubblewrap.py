"""The bubblewrap sandbox: tool commands in fresh Linux namespaces that see almost nothing.

Why bubblewrap: it is a small, maintained, unprivileged tool (the one Flatpak uses) that builds
the namespaces, mounts and capability set in one exec, so no privileged code of ours runs. Landlock
alone would hide files but neither network nor processes; our own namespace code would duplicate
bubblewrap.

What a command sees:
- a new root holding read-only /usr (and the /bin, /lib... links to it), a few files of /etc, the
  Python installation and virtual environment running the tools, and the workspace, writable,
  at its own path; nothing else: the workspace's siblings and parents, /home, /root, /run, /var and
  /sys do not exist. A symlink out of the workspace dangles.
- a private /tmp (a tmpfs of `max_file_bytes`), a minimal /dev and a /proc of its own processes.
- its own network namespace with only a loopback device: no network, not even the host's loopback.
- no capabilities, no new privileges, no nested user namespaces, a new terminal session.

Processes: the command runs in a new PID namespace under bubblewrap's init. Killing the bubblewrap
process (the time limit does) kills that init, and the kernel then kills every process of the
namespace, including ones that started their own session or double-forked. `--die-with-parent`
sets a parent-death SIGKILL; it fires when the thread that started bubblewrap ends, and
`run_command` waits for the command in that same thread and kills it before returning, so the
thread outlives the command unless the whole runtime dies, which is when the signal is wanted.

The process limit: RLIMIT_NPROC is set inside the new user namespace (by `prlimit`), where it
counts only this sandbox's processes. The kernel exempts real root from RLIMIT_NPROC, so the
launcher also lowers the PID namespace's `pid_max` (per namespace since Linux 6.14; at least 301);
on older kernels a root runtime's sandbox has no process bound but the time limit. The launcher
holds CAP_SYS_ADMIN in the sandbox's user namespace for that write only, and drops every
capability (`setpriv`) before it executes the command.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyagent.fleet.tools.base import Limits, ToolError, Workspace

SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC = ("alternatives", "group", "hosts", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime",
       "mime.types", "nsswitch.conf", "passwd", "ssl")
MIN_PID_MAX = 301  # the kernel refuses a smaller pid_max
# $1: pid_max, $2: RLIMIT_NPROC, then the command. Written by us, never by the agent.
LAUNCHER = ('echo "$1" > /proc/sys/kernel/pid_max 2>/dev/null; n="$2"; shift 2; unset PWD; '
            'exec prlimit --nproc="$n" -- setpriv --bounding-set=-all --inh-caps=-all '
            '--ambient-caps=-all --no-new-privs -- "$@"')
INSTALL = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
           "bubblewrap) on a kernel that allows user namespaces, or set PYAGENT_SANDBOX=none to "
           "run tool commands unconfined")


@dataclass(frozen=True)
class Bubblewrap:
    """Runs commands under the `bwrap` at `executable`; refuses when it cannot sandbox here."""

    executable: str = "bwrap"
    name = "bubblewrap"

    def wrap(self, argv: Sequence[str], workspace: Workspace, limits: Limits) -> list[str]:
        """`argv` under bwrap; a ToolError naming the cause when bwrap cannot run here."""
        problem = _problem(self)
        if problem is not None:
            raise ToolError(f"tool commands run only in a bubblewrap sandbox, which is "
                            f"unavailable: {problem}; {INSTALL}")
        return self._command(argv, workspace, limits)

    def _command(self, argv: Sequence[str], workspace: Workspace, limits: Limits) -> list[str]:
        pid_max = max(limits.max_processes, MIN_PID_MAX)
        return [self.executable, "--unshare-all", "--unshare-user", "--disable-userns",
                "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP",
                *_mounts(workspace.root, limits), "--chdir", str(workspace.root), "--",
                "/bin/sh", "-c", LAUNCHER, "sh", str(pid_max), str(limits.max_processes), *argv]


def _mounts(workspace: Path, limits: Limits) -> list[str]:
    """bwrap's mount options, parents before children so the deeper mount wins: a venv inside
    the workspace stays read-only, a workspace inside /tmp stays writable."""
    mounts: list[tuple[str, list[str]]] = [
        ("/dev", ["--dev", "/dev"]), ("/proc", ["--proc", "/proc"]),
        ("/tmp", ["--size", str(limits.max_file_bytes), "--tmpfs", "/tmp"])]
    for path in SYSTEM:
        if os.path.islink(path):
            mounts.append((path, ["--symlink", os.readlink(path), path]))
        elif os.path.isdir(path):
            mounts.append((path, ["--ro-bind", path, path]))
    mounts += [(f"/etc/{name}", ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"])
               for name in ETC]
    mounts += [(path, ["--ro-bind", path, path]) for path in _python_dirs()]
    mounts.append((str(workspace), ["--bind", str(workspace), str(workspace)]))
    mounts.sort(key=lambda mount: len(Path(mount[0]).parts))
    return [option for _, options in mounts for option in options]


def _python_dirs() -> list[str]:
    """The Python installation and virtual environment running us, as given and resolved, less
    those inside the system directories (already there)."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = sorted(prefixes | {os.path.realpath(prefix) for prefix in prefixes})
    return [path for path in paths
            if not any(Path(path).is_relative_to(system) for system in SYSTEM)]


@functools.cache
def _problem(sandbox: Bubblewrap) -> str | None:
    """Why `sandbox` cannot run commands here, or None; found once per process by running
    `true` in it."""
    with tempfile.TemporaryDirectory() as directory:
        argv = sandbox._command(["true"], Workspace(directory), Limits())
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=30, env={"PATH": os.environ.get("PATH", os.defpath)})
        except FileNotFoundError:
            return f"{sandbox.executable!r} is not installed"
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{sandbox.executable!r} does not start: {exc}"
    if result.returncode != 0:
        error = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
        return f"{sandbox.executable!r} cannot create a sandbox here ({error})"
    return None
