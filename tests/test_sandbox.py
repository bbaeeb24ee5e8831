"""The sandbox tool commands run in: files, network, processes, and what happens without it."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from pyagent.fleet.tools import bubblewrap
from pyagent.fleet.tools.base import Limits, ToolContext, ToolError, ToolResult, Workspace
from pyagent.fleet.tools.bubblewrap import Bubblewrap
from pyagent.fleet.tools.process import CommandResult, run_command
from pyagent.fleet.tools.registry import make_tool
from pyagent.fleet.tools.sandbox import Unconfined, UnconfinedWarning

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def context(root: Path) -> ToolContext:
    return ToolContext(Workspace(root), Limits(timeout_s=20),
                       frozenset({"python3", "cat", "sh", "ls"}))


def call(context: ToolContext, name: str, **arguments) -> ToolResult:
    return make_tool(name).call(arguments, context)


def run(root: Path, argv: list[str], **limits) -> CommandResult:
    return run_command(argv, ToolContext(Workspace(root), Limits(**limits)))


def processes(marker: str) -> list[int]:
    """Host pids of live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and marker in (entry / "cmdline").read_text()
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                found.append(int(entry.name))
        except OSError:  # ended while we looked
            pass
    return found


def wait_until_gone(marker: str, seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def marker() -> str:
    return f"marker-{uuid.uuid4().hex}"


# --- files --------------------------------------------------------------------------------------

def test_python_in_the_shell_tool_cannot_read_or_write_a_sibling_directory(context, outside):
    for code in [f"print(open({str(outside / 'secret.txt')!r}).read())",
                 "print(open('../outside/secret.txt').read())",
                 f"open({str(outside / 'new.txt')!r}, 'w').write('pwned')",
                 "open('../outside/new.txt', 'w').write('pwned')"]:
        result = call(context, "shell", argv=["python3", "-c", code])
        assert result.data["returncode"] != 0 and "secret" not in result.data["stdout"]
        assert "No such file or directory" in result.data["stderr"], result.output
        assert result.data["sandbox"] == "bubblewrap"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    call(context, "shell", argv=["python3", "-c", "open('inside.txt', 'w').write('ok')"])
    assert (Path(context.workspace.root) / "inside.txt").read_text() == "ok"


def test_a_test_run_by_run_tests_cannot_read_or_write_outside(context, root, outside):
    (root / "test_escape.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        import pytest

        @pytest.mark.parametrize("path", ["../outside/secret.txt",
                                          {str(outside)!r} + "/secret.txt"])
        def test_cannot_read(path):
            with pytest.raises(OSError):
                Path(path).read_text()

        @pytest.mark.parametrize("path", ["../outside/new.txt", {str(outside)!r} + "/new.txt",
                                          "/usr/new.txt"])
        def test_cannot_write(path):
            with pytest.raises(OSError):
                Path(path).write_text("pwned")
    """))
    result = call(context, "run_tests")
    assert (result.data["passed"], result.data["failed"], result.data["ran"]) == (5, 0, 5)
    assert result.data["sandbox"] == "bubblewrap"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


@pytest.mark.parametrize("path", ["../outside/secret.txt", "link/secret.txt", "leak.txt",
                                  "/proc/self/root{outside}/secret.txt",
                                  "/proc/1/root{outside}/secret.txt"])
def test_cat_cannot_read_outside_even_through_links(context, root, outside, path):
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    result = call(context, "shell", argv=["cat", path.format(outside=outside)])
    assert result.data["returncode"] != 0 and "secret" not in result.data["stdout"]


def test_only_system_python_and_workspace_are_visible(context, tmp_path):
    top = call(context, "shell", argv=["ls", "-a", "/"]).data["stdout"].split()
    assert {"usr", "etc", "proc", "dev", "tmp"} <= set(top)
    assert not {"home", "var", "run", "srv", "opt", "mnt", "sys", "boot"} & set(top)
    assert call(context, "shell", argv=["ls", "-a", str(tmp_path)]).data["stdout"].split() == [
        ".", "..", "workspace"]  # the workspace, not its siblings
    etc = call(context, "shell", argv=["ls", "/etc"]).data["stdout"].split()
    assert "passwd" in etc and "shadow" not in etc


def test_the_python_environment_is_read_only(context):
    code = f"open({os.path.join(sys.prefix, 'pwned.txt')!r}, 'w')"
    try:
        result = call(context, "shell", argv=["python3", "-c", code])
        assert "Read-only file system" in result.data["stderr"]
    finally:
        Path(sys.prefix, "pwned.txt").unlink(missing_ok=True)


def test_tmp_is_private_to_each_call(context):
    name = marker()
    call(context, "shell", argv=["python3", "-c", f"open('/tmp/{name}', 'w').write('x')"])
    assert not Path("/tmp", name).exists()
    second = call(context, "shell", argv=["cat", f"/tmp/{name}"])
    assert second.data["returncode"] != 0


def test_a_file_larger_than_the_limit_cannot_be_written(root):
    result = run(root, [sys.executable, "-c", "open('big', 'wb').write(bytes(2 * 1024**2))"],
                 max_file_bytes=1024**2)
    assert result.returncode != 0 and "File too large" in result.stderr
    assert (root / "big").stat().st_size <= 1024**2


# --- network ------------------------------------------------------------------------------------

def test_no_network_not_even_the_hosts_loopback(context):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = call(context, "shell", argv=["python3", "-c", code])
        assert result.data["returncode"] != 0 and "ConnectionRefusedError" in result.data["stderr"]
        with pytest.raises(BlockingIOError):
            server.accept()


# --- processes ----------------------------------------------------------------------------------

def test_descendants_that_start_their_own_session_die_at_the_time_limit(root):
    tag = marker()
    script = (f"setsid sh -c 'sleep 600; : {tag}' & "
              f"python3 -c 'import os, time\nif os.fork() == 0:\n os.setsid()\n if os.fork() == 0:"
              f"\n  time.sleep(600)' {tag} & sleep 600")
    thread = threading.Thread(target=lambda: results.append(run(root, ["sh", "-c", script],
                                                                timeout_s=1.5)))
    results: list[CommandResult] = []
    thread.start()
    time.sleep(1.0)
    assert len(processes(tag)) >= 2  # they were running
    thread.join()
    assert results[0].timed_out
    assert wait_until_gone(tag, seconds=0.5) == []


def test_a_command_cannot_signal_or_see_host_processes(root):
    witness = subprocess.Popen(["sleep", "30"])
    try:
        context = ToolContext(Workspace(root), Limits(timeout_s=5), sandbox=Bubblewrap())
        seen = run_command(["ls", "/proc"], context).stdout.split()
        assert str(witness.pid) not in seen and len([p for p in seen if p.isdigit()]) < 10
        run_command(["kill", "-9", "-1"], context)
        run_command(["kill", "-9", str(witness.pid)], context)
        assert witness.poll() is None
    finally:
        witness.kill()
        witness.wait()


def test_a_command_cannot_create_user_namespaces_or_keep_capabilities(root):
    context = ToolContext(Workspace(root), sandbox=Bubblewrap())
    assert run_command(["unshare", "--user", "true"], context).returncode != 0
    status = run_command(["cat", "/proc/self/status"], context).stdout
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status


RUNTIME = """
import sys, threading
from pyagent.fleet.tools import bubblewrap
from pyagent.fleet.tools.base import Limits, ToolContext, Workspace
from pyagent.fleet.tools.process import run_command

context = ToolContext(Workspace(sys.argv[1]), Limits(timeout_s=60))
argv = ["sh", "-c", "while :; do echo x >> grows.txt; sleep 0.02; done; : " + sys.argv[2]]
worker = threading.Thread(target=run_command, args=(argv, context))
worker.start()
worker.join()
"""


def test_tool_processes_die_with_a_sigkilled_runtime_and_stop_writing(root):
    tag = marker()
    runtime = subprocess.Popen([sys.executable, "-c", RUNTIME, str(root), tag],
                               env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        grows = root / "grows.txt"
        deadline = time.monotonic() + 10
        while not (grows.exists() and grows.stat().st_size > 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes(tag), "the tool did not start"
    finally:
        runtime.kill()
        runtime.wait()
    assert wait_until_gone(tag) == []
    size = grows.stat().st_size
    time.sleep(0.3)
    assert grows.stat().st_size == size


def test_a_fork_bomb_is_contained_and_ends_at_the_time_limit(root):
    tag = marker()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    results: list[CommandResult] = []
    thread = threading.Thread(target=lambda: results.append(
        run(root, ["python3", "-c", bomb, tag], timeout_s=1.5, max_processes=64)))
    thread.start()
    peak = 0
    while thread.is_alive():
        peak = max(peak, len(processes(tag)))
        time.sleep(0.05)
    assert results[0].timed_out
    assert 1 < peak <= (64 if os.getuid() else 301)  # root: the PID namespace's pid_max
    assert wait_until_gone(tag, seconds=0.5) == []


PROC_SYS_PROBE = """
import os, signal, sys
writable = []
for top, _, files in os.walk("/proc/sys"):
    for name in files:  # opening for writing, without writing, changes nothing
        try:
            os.close(os.open(os.path.join(top, name), os.O_WRONLY))
            writable.append(os.path.join(top, name))
        except OSError:
            pass
try:
    with open("/proc/sys/kernel/pid_max", "w") as pid_max:
        pid_max.write("100000")
    print("pid_max raised")
except OSError as exc:
    print("pid_max kept:", exc.strerror)
forked = 0
while forked < 400:
    try:
        if os.fork() == 0:
            signal.pause()
    except OSError:
        break
    forked += 1
print("writable:", writable)
print("forked:", forked)
"""


def test_proc_is_read_only_so_no_sysctl_can_be_written_and_the_process_limit_holds(root):
    # A root runtime's sandbox may write every sysctl root may (capabilities or not): raising
    # its pid_max lifted the process limit, kernel.core_pattern would run code as host root.
    result = run(root, ["python3", "-c", PROC_SYS_PROBE], timeout_s=20, max_processes=64)
    assert not result.timed_out, result.transcript()
    assert "pid_max kept: Read-only file system" in result.stdout, result.transcript()
    assert "writable: []" in result.stdout, result.transcript()
    forked = int(result.stdout.rsplit("forked: ", 1)[1])
    assert 1 < forked <= (64 if os.getuid() else 301), result.transcript()


def test_the_command_cannot_make_proc_writable_again(root):
    script = ("mount -o remount,bind,rw /proc; umount /proc; mount -t proc proc /tmp; "
              "grep ' /proc ' /proc/self/mountinfo")
    result = run(root, ["sh", "-c", script], timeout_s=10)
    mount = result.stdout.split()
    assert mount[4] == "/proc" and mount[5].startswith("ro,"), result.transcript()
    assert result.stderr.count("mount") >= 3, result.transcript()  # each attempt refused


TMPFS_PROBE = """
import ctypes, errno, json, os
refused = {}
for path in ["/fill", "/dev/fill", "/etc/fill", "/usr/fill"]:
    try:
        open(path, "w").close()
    except OSError as exc:
        refused[path] = errno.errorcode[exc.errno]
tmpfs = {}
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    rest = fields[fields.index("-") + 1:]
    if rest[0] == "tmpfs" and fields[5].split(",")[0] == "rw":
        tmpfs[fields[4]] = os.statvfs(fields[4]).f_blocks * os.statvfs(fields[4]).f_frsize
written = 0
for index in range(3):
    try:
        with open(f"/tmp/fill{index}", "wb") as file:
            file.write(bytes(3 * 1024**2))
    except OSError:
        pass
    written += os.path.getsize(f"/tmp/fill{index}")
libc = ctypes.CDLL(None, use_errno=True)
segment = libc.shmget(0, ctypes.c_size_t(8 * 1024**2), 0o1600)  # IPC_PRIVATE, IPC_CREAT
print(json.dumps({"refused": refused, "tmpfs": tmpfs, "written": written,
                  "shm": errno.errorcode.get(ctypes.get_errno()) if segment < 0 else "created"}))
"""


def test_only_the_workspace_and_capped_tmpfs_are_writable(root):
    # The root is a tmpfs bwrap cannot size: writing to it raised the host's Shmem by gigabytes.
    result = run(root, ["python3", "-c", TMPFS_PROBE], timeout_s=20, max_file_bytes=4 * 1024**2)
    probe = json.loads(result.stdout)
    assert probe["refused"] == dict.fromkeys(["/fill", "/dev/fill", "/etc/fill", "/usr/fill"],
                                             "EROFS"), probe
    assert probe["tmpfs"] == {"/tmp": 4 * 1024**2, "/dev/shm": 4 * 1024**2}, probe
    assert 3 * 1024**2 <= probe["written"] <= 4 * 1024**2, probe
    assert probe["shm"] == "ENOSPC", probe  # System V shared memory: within the same 4 MiB
    call = run(root, ["sh", "-c", "echo ok > inside.txt"])
    assert call.returncode == 0 and (root / "inside.txt").read_text() == "ok\n"


@pytest.mark.parametrize(("release", "per_namespace"), [
    ("6.18.44-fc-v595", True), ("6.14.0-rc1", True), ("7.0.1", True), ("6.13.12", False),
    ("5.15.0-91-generic", False), ("weird", False)])
def test_pid_max_is_set_only_where_it_is_per_namespace(release, per_namespace, monkeypatch):
    # On kernels before 6.14 pid_max is global: a root runtime's sandbox would lower the host's.
    monkeypatch.setattr(bubblewrap.os, "uname", lambda: os.uname_result(
        ("Linux", "host", release, "#1", "x86_64")))
    command = Bubblewrap()._command(["true"], Workspace(Path.cwd()), Limits(max_processes=64))
    assert command[command.index(bubblewrap.LAUNCHER) + 2] == ("301" if per_namespace else "0")


# --- without bubblewrap -------------------------------------------------------------------------

def test_commands_are_refused_when_bubblewrap_is_missing(root, tmp_path):
    (root / "test_x.py").write_text("open('ran.txt', 'w')\ndef test_x():\n    pass\n")
    context = ToolContext(Workspace(root), Limits(timeout_s=10), frozenset({"cat"}),
                          sandbox=Bubblewrap(str(tmp_path / "missing/bwrap")))
    for name, arguments in [("run_tests", {}), ("lint", {}), ("shell", {"argv": ["cat", "x"]})]:
        with pytest.raises(ToolError, match=r"unavailable: '.*missing/bwrap' is not installed; "
                                            r"install bubblewrap \(Debian/Ubuntu: apt-get"):
            call(context, name, **arguments)
    assert not (root / "ran.txt").exists()


def test_a_bubblewrap_that_cannot_create_namespaces_is_refused(root, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    context = ToolContext(Workspace(root), sandbox=Bubblewrap(str(fake)))
    with pytest.raises(ToolError, match="cannot create a sandbox here .*No permissions"):
        run_command(["true"], context)


def test_running_unconfined_is_an_explicit_choice_that_warns(root, monkeypatch):
    monkeypatch.setenv("PYAGENT_SANDBOX", "none")
    with pytest.warns(UnconfinedWarning, match="UNCONFINED"):
        result = run_command(["true"], ToolContext(Workspace(root)))
    assert result.sandbox == "none"
    with pytest.warns(UnconfinedWarning):
        run_command(["true"], ToolContext(Workspace(root), sandbox=Unconfined()))
    monkeypatch.setenv("PYAGENT_SANDBOX", "nope")
    with pytest.raises(ToolError, match="PYAGENT_SANDBOX='nope' is not a sandbox"):
        run_command(["true"], ToolContext(Workspace(root)))


# --- run_tests: a call that ran no test failed --------------------------------------------------

def test_run_tests_that_ran_nothing_is_a_failed_call(context, root):
    with pytest.raises(ToolError, match=r"no tests ran \(no tests collected\)"):
        call(context, "run_tests")
    with pytest.raises(ToolError, match=r"(?s)no tests ran \(pytest usage error\).*not found"):
        call(context, "run_tests", path="missing")
    (root / "test_a.py").write_text("def test_a():\n    pass\n")
    with pytest.raises(ToolError, match="no tests ran"):
        call(context, "run_tests", keyword="nothing_matches")
    assert call(context, "run_tests").data["ran"] == 1
