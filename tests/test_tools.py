import json
import sys
import time
from pathlib import Path

import pytest

from pyagent.fleet.tools import files
from pyagent.fleet.tools.base import (
    Limits,
    Tool,
    ToolContext,
    ToolError,
    ToolResult,
    Workspace,
)
from pyagent.fleet.tools.process import CommandResult, run_command
from pyagent.fleet.tools.registry import TOOLS, make_tool, tool_specs


@pytest.fixture
def context(root: Path) -> ToolContext:
    return ToolContext(Workspace(root), Limits(timeout_s=60), frozenset({"echo"}))


def call(context: ToolContext, name: str, **arguments) -> ToolResult:
    return make_tool(name).call(arguments, context)


def tree(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def run(root: Path, argv: list[str], limits: Limits | None = None, **options) -> CommandResult:
    return run_command(argv, ToolContext(Workspace(root), limits or Limits()), **options)


# --- the workspace boundary -------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "../outside/secret.txt", "sub/../../outside/secret.txt", "{outside}/secret.txt",
    "link/secret.txt", "leak.txt", "link/new.txt", "../outside/new.txt"])
def test_paths_leaving_the_workspace_are_refused_and_nothing_is_written_outside(
        context, root, outside, path):
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    path = path.format(outside=outside)
    for name, arguments in [("read_file", {"path": path}),
                            ("write_file", {"path": path, "content": "pwned"}),
                            ("run_tests", {"path": path}), ("lint", {"path": path})]:
        with pytest.raises(ToolError, match=r"outside the workspace") as caught:
            make_tool(name).call(arguments, context)
        assert repr(path) in str(caught.value)
    assert tree(outside) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "secret"


def test_absolute_paths_and_symlinks_inside_the_workspace_are_allowed(context, root):
    (root / "real.txt").write_text("inside\n")
    (root / "alias.txt").symlink_to(root / "real.txt")
    assert call(context, "read_file", path=str(root / "real.txt")).output == "inside\n"
    assert call(context, "read_file", path="alias.txt").data["path"] == "real.txt"


def test_a_workspace_must_be_an_existing_directory(tmp_path):
    with pytest.raises(ToolError, match="is not a directory"):
        Workspace(tmp_path / "missing")


# --- files ------------------------------------------------------------------------------------

def test_write_creates_parents_and_replaces_the_file_leaving_no_temporary_files(context, root):
    result = call(context, "write_file", path="a/b/c.txt", content="first\n")
    assert result.data == {"path": "a/b/c.txt", "bytes": 6}
    call(context, "write_file", path="a/b/c.txt", content="second\n")
    assert (root / "a/b/c.txt").read_text() == "second\n"
    assert tree(root) == ["a", "a/b", "a/b/c.txt"]


def test_a_failed_write_leaves_the_old_content_and_no_temporary_file(context, root, monkeypatch):
    (root / "keep.txt").write_text("old")

    def fail(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(ToolError, match=r"cannot write 'keep.txt': No space left"):
        call(context, "write_file", path="keep.txt", content="new")
    assert (root / "keep.txt").read_text() == "old"
    assert tree(root) == ["keep.txt"]


def test_writing_over_a_directory_is_refused(context, root):
    (root / "pkg").mkdir()
    with pytest.raises(ToolError, match="'pkg' is a directory"):
        call(context, "write_file", path="pkg", content="x")


def test_read_file_returns_line_ranges_and_stops_at_the_size_cap(context, root):
    (root / "f.txt").write_text("".join(f"line{i}\n" for i in range(1, 6)))
    middle = call(context, "read_file", path="f.txt", start_line=2, end_line=3)
    assert middle.output == "line2\nline3\n"
    assert middle.data == {"path": "f.txt", "start_line": 2, "end_line": 3, "truncated": False}
    assert call(context, "read_file", path="f.txt", start_line=4).output == "line4\nline5\n"
    capped = call(context, "read_file", path="f.txt", max_bytes=12)
    assert capped.output.startswith("line1\nline2\n\n[truncated at 12 bytes")
    assert "continue from line 3" in capped.output
    assert capped.data["truncated"] and capped.data["end_line"] == 2
    with pytest.raises(ToolError, match="end_line is before start_line"):
        call(context, "read_file", path="f.txt", start_line=3, end_line=2)
    with pytest.raises(ToolError, match="'nope.txt' is not a file"):
        call(context, "read_file", path="nope.txt")


def test_list_files_is_sorted_capped_and_stays_inside(context, root, outside):
    for name in ["b.txt", "a.txt", "sub/d.txt", "c.txt", "sub/e.py"]:
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("")
    (root / "link").symlink_to(outside, target_is_directory=True)
    result = call(context, "list_files", pattern="**/*.txt", max_results=3)
    assert result.data == {"files": ["a.txt", "b.txt", "c.txt"], "total": 4, "truncated": True}
    assert result.output.endswith("[1 more not shown]")
    everything = call(context, "list_files").data["files"]
    assert everything == ["a.txt", "b.txt", "c.txt", "sub/d.txt", "sub/e.py"]
    assert call(context, "list_files", pattern="link/*").data["files"] == []
    for pattern in ["../outside/*", str(outside / "*")]:
        with pytest.raises(ToolError, match="must be relative"):
            call(context, "list_files", pattern=pattern)


# --- subprocesses -----------------------------------------------------------------------------

SAMPLE_TESTS = """
def test_ok():
    assert 1 + 1 == 2


def test_broken():
    assert 1 + 1 == 3
"""


def test_run_tests_parses_passed_and_failed_counts(context, root):
    (root / "tests").mkdir()
    (root / "tests/test_sample.py").write_text(SAMPLE_TESTS)
    result = call(context, "run_tests")
    assert (result.data["passed"], result.data["failed"], result.data["errors"]) == (1, 1, 0)
    assert result.data["failures"] == ["tests/test_sample.py::test_broken"]
    assert result.data["returncode"] == 1 and not result.data["timed_out"]
    assert "1 failed, 1 passed" in result.output
    only_ok = call(context, "run_tests", path="tests/test_sample.py", keyword="test_ok")
    assert (only_ok.data["passed"], only_ok.data["failed"], only_ok.data["returncode"]) == (1, 0, 0)


def test_run_tests_sees_a_fix_made_within_the_second_at_the_same_size(context, root):
    import os

    (root / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (root / "test_calc.py").write_text("from calc import add\n\n\ndef test_add():\n"
                                       "    assert add(2, 2) == 4\n")
    assert call(context, "run_tests").data["failed"] == 1
    stamp = (root / "calc.py").stat()
    (root / "calc.py").write_text("def add(a, b):\n    return a + b\n")  # same size
    os.utime(root / "calc.py", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same mtime
    assert call(context, "run_tests").data["passed"] == 1
    assert not (root / "__pycache__").exists()


def test_run_tests_that_only_errored_or_exited_early_ran_nothing(context, root):
    (root / "test_broken_import.py").write_text("import no_such_module\n")
    with pytest.raises(ToolError, match=r"(?s)no tests ran \(pytest reported none passed or "
                                        r"failed; exit code 2\).*no_such_module"):
        call(context, "run_tests")
    (root / "test_broken_import.py").unlink()
    (root / "test_real.py").write_text("def test_fails():\n    assert False\n")
    for conftest in ("import os\nos._exit(0)\n",
                     "import pytest\n\ndef pytest_sessionstart(session):\n"
                     "    pytest.exit('bye', returncode=0)\n"):
        (root / "conftest.py").write_text(conftest)
        with pytest.raises(ToolError, match=r"no tests ran \(pytest reported none passed or "
                                            r"failed; exit code 0\)"):
            call(context, "run_tests")


def test_a_test_that_sleeps_past_the_timeout_is_killed(root):
    (root / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(60)\n")
    context = ToolContext(Workspace(root), Limits(timeout_s=2))
    start = time.monotonic()
    with pytest.raises(ToolError, match=r"(?s)no tests ran \(.*; timed out\).*\[timed out "
                                        r"after 2\."):
        call(context, "run_tests")
    assert time.monotonic() - start < 15


def test_a_child_allocating_beyond_the_memory_limit_fails(root):
    limits = Limits(timeout_s=30, memory_bytes=512 * 1024**2)
    small = run(root, [sys.executable, "-c", "b = bytearray(64 * 1024**2)"], limits)
    assert small.returncode == 0, small.stderr
    big = run(root, [sys.executable, "-c", "b = bytearray(4 * 1024**3)"], limits)
    assert big.returncode != 0 and "MemoryError" in big.stderr


def test_output_keeps_the_last_bytes_up_to_the_limit(root):
    result = run(root, [sys.executable, "-c", "print('x' * 100_000 + 'END')"],
                 Limits(max_output_bytes=1000))
    assert result.truncated and result.stdout.endswith("xEND\n")
    assert result.stdout.startswith("[... 99004 bytes dropped ...]\n")


def test_commands_get_a_minimal_environment(root, monkeypatch):
    monkeypatch.setenv("API_KEY", "do-not-leak")
    result = run(root, ["env"], Limits(), env={"EXTRA": "1"})
    variables = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert set(variables) == {"PATH", "HOME", "LANG", "EXTRA"}
    assert variables["HOME"] == "."  # the workspace, which outputs show relative to itself


def test_outputs_show_the_workspace_s_paths_relative_to_it(root):
    sibling = f"{root.resolve()}-other/x"
    result = run(root, [sys.executable, "-c", f"import os; print(os.getcwd() + '/a.py'); "
                                               f"print(os.getcwd()); print({sibling!r})"],
                 Limits())
    assert result.stdout.splitlines() == ["a.py", ".", sibling]


def test_an_unknown_program_is_a_tool_error(root):
    with pytest.raises(ToolError, match="cannot run 'no-such-program-here'"):
        run(root, ["no-such-program-here"], Limits())


def test_lint_reports_ruff_findings(context, root):
    (root / "bad.py").write_text("import os\n")
    (root / "good.py").write_text("x = 1\n")
    result = call(context, "lint", path="bad.py")
    assert result.data["count"] == 1
    finding = result.data["findings"][0]
    assert (finding["code"], finding["path"], finding["line"]) == ("F401", "bad.py", 1)
    assert "bad.py:1:8: F401" in result.output
    assert call(context, "lint", path="good.py").data == {
        "count": 0, "findings": [], "sandbox": "bubblewrap"}
    assert call(context, "lint").data["count"] == 1


def test_shell_runs_only_allowed_commands_and_never_interprets_metacharacters(context, root):
    (root / "victim.txt").write_text("still here")
    result = call(context, "shell", argv=["echo", "hello"])
    assert result.data["stdout"] == "hello\n" and result.data["returncode"] == 0
    assert "hello" in result.output
    with pytest.raises(ToolError, match=r"command 'rm' is not allowed; allowed commands: echo"):
        call(context, "shell", argv=["rm", "victim.txt"])
    with pytest.raises(ToolError, match=r"'/bin/rm' is not allowed"):
        call(context, "shell", argv=["/bin/rm", "victim.txt"])
    literal = call(context, "shell", argv=["echo", "hi; rm victim.txt && echo $HOME `id`"])
    assert literal.data["stdout"] == "hi; rm victim.txt && echo $HOME `id`\n"
    assert (root / "victim.txt").read_text() == "still here"


def test_shell_refuses_everything_without_an_allow_list(root):
    with pytest.raises(ToolError, match="allowed commands: none"):
        call(ToolContext(Workspace(root)), "shell", argv=["echo", "hi"])


# --- arguments, registry, schemas -------------------------------------------------------------

@pytest.mark.parametrize(("name", "arguments", "field"), [
    ("read_file", {}, "path"),
    ("read_file", {"path": "f.txt", "start_line": 0}, "start_line"),
    ("read_file", {"path": "f.txt", "bogus": 1}, "bogus"),
    ("write_file", {"path": "f.txt"}, "content"),
    ("list_files", {"max_results": "many"}, "max_results"),
    ("shell", {"argv": []}, "argv"),
    ("run_tests", {"keyword": 3}, "keyword"),
])
def test_invalid_arguments_name_the_field(context, name, arguments, field):
    with pytest.raises(ToolError, match=rf"invalid arguments for {name}: .*\b{field}\b"):
        make_tool(name).call(arguments, context)


def test_every_registered_tool_follows_the_protocol():
    for name in TOOLS:
        tool = make_tool(name)
        assert isinstance(tool, Tool) and tool.name == name


def test_unknown_tools_list_the_known_ones():
    with pytest.raises(ToolError, match=r"unknown tool 'nope'; known tools: read_file, .*shell"):
        make_tool("nope")


def test_tools_are_offered_with_json_schemas_of_their_arguments():
    specs = tool_specs(TOOLS)
    assert [spec.name for spec in specs] == list(TOOLS)
    for spec in specs:
        assert spec.description
        assert spec.parameters["type"] == "object"
        assert spec.parameters["additionalProperties"] is False
    read = tool_specs(["read_file"])[0].parameters
    assert read["required"] == ["path"]
    assert read["properties"]["start_line"]["anyOf"][0] == {
        "minimum": 1, "maximum": 10_000_000, "type": "integer"}
    json.dumps([spec.parameters for spec in specs])


def test_write_file_honours_the_agents_writable_globs(tmp_path):
    from pyagent.fleet.tools.base import ToolContext, ToolError, Workspace
    from pyagent.fleet.tools.registry import make_tool

    context = ToolContext(Workspace(tmp_path), writable=("src/*",))
    write = make_tool("write_file")
    assert write.call({"path": "src/pkg/a.py", "content": "x = 1\n"}, context).data["bytes"] == 6
    with pytest.raises(ToolError, match="may not write 'tests/test_a.py'; it may write src/"):
        write.call({"path": "tests/test_a.py", "content": "x"}, context)
    assert not (tmp_path / "tests").exists()


def test_edit_file_replaces_text_that_occurs_once_and_nothing_else(context, root):
    (root / "a.py").write_text("x = 1\ny = x + 1\nz = 3\n")
    result = call(context, "edit_file", path="a.py", old="y = x + 1", new="y = x - 1")
    assert result.data == {"path": "a.py", "line": 2}
    assert result.output == "replaced 1 line(s) at line 2 of a.py"
    assert (root / "a.py").read_text() == "x = 1\ny = x - 1\nz = 3\n"
    assert tree(root) == ["a.py"]  # no temporary file left behind


@pytest.mark.parametrize(("old", "message"), [
    ("w = 9", "occurs 0 times in a.py, not once; copy it exactly"),
    ("= 1", "occurs 2 times in a.py, not once; include more of its surroundings")])
def test_edit_file_refuses_text_that_is_missing_or_ambiguous(context, root, old, message):
    (root / "a.py").write_text("x = 1\ny = 1\n")
    with pytest.raises(ToolError, match=message):
        call(context, "edit_file", path="a.py", old=old, new="q")
    assert (root / "a.py").read_text() == "x = 1\ny = 1\n"


def test_edit_file_checks_the_path_and_the_writable_globs(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("assert True\n")
    context = ToolContext(Workspace(tmp_path), writable=("src/*",))
    edit = make_tool("edit_file")
    with pytest.raises(ToolError, match="may not write 'tests/t.py'"):
        edit.call({"path": "tests/t.py", "old": "True", "new": "False"}, context)
    with pytest.raises(ToolError, match="'src/none.py' does not exist"):
        edit.call({"path": "src/none.py", "old": "a", "new": "b"}, context)
    with pytest.raises(ToolError, match="old"):
        edit.call({"path": "src/none.py", "old": "", "new": "b"}, context)
    assert (tmp_path / "tests" / "t.py").read_text() == "assert True\n"


def test_replace_lines_keeps_the_indentation_and_the_final_newline(context, root):
    (root / "a.py").write_text("def f(a, b):\n    return a / b\n\nx = 1")
    result = call(context, "replace_lines", path="a.py", start_line=2, text="return a * b")
    assert result.data == {"path": "a.py", "start_line": 2, "end_line": 2}
    assert (root / "a.py").read_text() == "def f(a, b):\n    return a * b\n\nx = 1"
    call(context, "replace_lines", path="a.py", start_line=3, end_line=4,
         text="y = 2\nx = 3")  # the file still ends without a newline
    assert (root / "a.py").read_text() == "def f(a, b):\n    return a * b\ny = 2\nx = 3"
    call(context, "replace_lines", path="a.py", start_line=1, end_line=2,
         text="def f(a, b):\n  return 0\n")  # indented text is kept as it is
    assert (root / "a.py").read_text() == "def f(a, b):\n  return 0\ny = 2\nx = 3"


def test_replace_lines_refuses_lines_past_the_end_and_backwards_ranges(context, root):
    (root / "a.py").write_text("x = 1\n")
    with pytest.raises(ToolError, match=r"a.py has 1 lines; cannot replace lines 2-3"):
        call(context, "replace_lines", path="a.py", start_line=2, end_line=3, text="y")
    with pytest.raises(ToolError, match="end_line is before start_line"):
        call(context, "replace_lines", path="a.py", start_line=2, end_line=1, text="y")
    assert (root / "a.py").read_text() == "x = 1\n"
