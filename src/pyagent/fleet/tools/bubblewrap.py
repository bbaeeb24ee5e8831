"""The bubblewrap sandbox: tool commands in fresh Linux namespaces that see almost nothing.

Why bubblewrap: it is a small, maintained, unprivileged tool (the one Flatpak uses) that builds
the namespaces, mounts and capability set in one exec, so no privileged code of ours runs. Landlock
alone would hide files but neither network nor processes; our own namespace code would duplicate
bubblewrap.

What a command sees:
- a new root holding read-only /usr (and the /bin, /lib... links to it), a few files of /etc, the
  Python installation and virtual environment running the tools, and the workspace, writable,
  at its own path; nothing else: the workspace's siblings and parents, /home, /root, /run, /var and
  /sys do not exist. A symlink out of the workspace dangles. The root itself (a tmpfs bwrap cannot
  size) is remounted read-only once everything is mounted, so nothing outside the workspace can be
  written but the capped tmpfs /tmp and /dev/shm.
- a private /tmp (a tmpfs of `max_file_bytes`), a minimal read-only /dev whose /dev/shm is a
  tmpfs of `shm_bytes` (64 MiB at most), and a read-only /proc of its own processes.
- its own network namespace with only a loopback device: no network, not even the host's loopback.
- no capabilities, no new privileges, no nested user namespaces, a new terminal session.

Processes: the command runs in a new PID namespace under bubblewrap's init. Killing the bubblewrap
process (the time limit does) kills that init, and the kernel then kills every process of the
namespace, including ones that started their own session or double-forked. `--die-with-parent`
sets a parent-death SIGKILL; it fires when the thread that started bubblewrap ends, and
`run_command` waits for the command in that same thread and kills it before returning, so the
thread outlives the command unless the whole runtime dies, which is when the signal is wanted.

The launcher: bubblewrap starts our fixed shell script (`LAUNCHER`) with CAP_SYS_ADMIN,
CAP_SYS_RESOURCE and CAP_SETPCAP in the sandbox's user namespace, in a mount namespace of its own
(`unshare --mount`). It sets the namespaced limits, then remounts /proc read-only, then drops
every capability (`setpriv`) and executes the command; if a step fails the command does not run.
- the process limit: RLIMIT_NPROC, set inside the new user namespace (by `prlimit`), counts only
  this sandbox's processes; the kernel exempts real root from it, so the launcher also lowers the
  PID namespace's `pid_max` to `max(max_processes, 301)` (301 is the kernel's floor). `pid_max` is
  per namespace since Linux 6.14; on older kernels it is global and is left alone, so there a
  root runtime's sandbox has no process bound but the time limit.
- `user.max_user_namespaces` = 0: the command cannot create user namespaces.
- System V IPC: `kernel.shmall` = `shm_bytes` and `kernel.msgmni` = 16, so shared memory
  segments, which outlive the processes that filled them and escape RLIMIT_AS, stay within
  `shm_bytes`, and message queues within 256 KiB.
- /proc read-only: a sandbox whose user is the host's root (a root runtime) may otherwise write
  every sysctl whose mode lets root write it, capabilities or not: its namespace's `pid_max` and
  IPC limits (undoing the bounds above) and global ones such as `kernel.core_pattern` (code run
  as host root). The command has no capability left to remount it, and no user namespace to
  gain one in.

What one call can consume at most (per-process limits are set by `run_command` before the exec):
processes: `max_processes` (a root runtime: the namespace's `pid_max`, about 300 at the default);
memory: `memory_bytes` of address space per process, times that many processes, plus the tmpfs
/tmp (`max_file_bytes`), /dev/shm and System V shared memory (`shm_bytes` each); disk: files up to
`max_file_bytes` each in the workspace (the host's disk, not bounded in total); time: `timeout_s`
of wall time for the whole namespace. There is no aggregate memory limit below processes x
address space: that needs a memory cgroup, which bubblewrap does not set up.
"""

from __future__ import annotations

import functools
import os
import re
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
SHM_BYTES = 64 * 1024**2  # /dev/shm and System V shared memory, each (never above max_file_bytes)
MSG_QUEUES = 16  # System V message queues (16 KiB each by default)
# $1: pid_max (0: leave it), $2: kernel.shmall in pages, $3: RLIMIT_NPROC, then the command.
# Written by us, never by the agent; runs in a mount namespace of its own (`unshare --mount`).
LAUNCHER = ('if [ "$1" != 0 ]; then echo "$1" > /proc/sys/kernel/pid_max 2>/dev/null; fi; '
            'echo 0 > /proc/sys/user/max_user_namespaces && echo "$2" > /proc/sys/kernel/shmall '
            f'&& echo {MSG_QUEUES} > /proc/sys/kernel/msgmni '
            '&& mount -o remount,bind,ro /proc || exit 125; n="$3"; shift 3; unset PWD; '
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
        pid_max = max(limits.max_processes, MIN_PID_MAX) if _pid_max_per_namespace() else 0
        return [self.executable, "--unshare-all", "--unshare-user", "--die-with-parent",
                "--new-session", "--cap-drop", "ALL", "--cap-add", "CAP_SYS_ADMIN",
                "--cap-add", "CAP_SYS_RESOURCE", "--cap-add", "CAP_SETPCAP",
                *_mounts(workspace.root, limits), "--chdir", str(workspace.root), "--",
                "unshare", "--mount", "--", "/bin/sh", "-c", LAUNCHER, "sh", str(pid_max),
                str(shm_bytes(limits) // os.sysconf("SC_PAGE_SIZE")), str(limits.max_processes),
                *argv]


def shm_bytes(limits: Limits) -> int:
    """The size of the sandbox's /dev/shm, and the most System V shared memory it may hold."""
    return min(SHM_BYTES, limits.max_file_bytes)


def _pid_max_per_namespace(release: str | None = None) -> bool:
    """Whether `pid_max` is per PID namespace (Linux 6.14+) on the kernel of `release`
    (this one's when None); on older kernels it is global and a sandbox must not set it."""
    match = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return match is not None and (int(match[1]), int(match[2])) >= (6, 14)


def _mounts(workspace: Path, limits: Limits) -> list[str]:
    """bwrap's mount options, parents before children so the deeper mount wins: a venv inside
    the workspace stays read-only, a workspace inside /tmp stays writable. Then the root and
    /dev, tmpfs without a size, are made read-only (not recursively: the mounts on them keep
    their own flags)."""
    mounts: list[tuple[str, list[str]]] = [
        ("/dev", ["--dev", "/dev"]), ("/proc", ["--proc", "/proc"]),
        ("/tmp", ["--size", str(limits.max_file_bytes), "--tmpfs", "/tmp"]),
        ("/dev/shm", ["--size", str(shm_bytes(limits)), "--tmpfs", "/dev/shm"])]
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
    return [option for _, options in mounts for option in options] + [
        "--remount-ro", "/dev", "--remount-ro", "/"]


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
