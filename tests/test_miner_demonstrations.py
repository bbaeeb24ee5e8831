"""Demonstrations from a suite's known fixes: run as the agent's own tool calls on a copy of the
task's files, in the sandbox, and kept only when the task's checker accepts the result."""

from __future__ import annotations

import pytest

from pyagent.bench.suites.repair import RepairSuite, write_workspace
from pyagent.fleet.agent import AgentSpec
from pyagent.miner.demonstrations import from_reference


@pytest.fixture(scope="module")
def task():
    suite = RepairSuite()
    return suite, suite.items("train", 1, 0, [1], ["operator"])[0]


def coder(*tools, paths=("src/**",)):
    return AgentSpec(name="coder", role="You fix bugs.", tools=list(tools),
                     permissions={"paths": list(paths)})


@pytest.mark.parametrize("edit", ["replace_lines", "edit_file", "write_file"])
def test_a_known_fix_becomes_a_demonstration_in_the_agents_own_tools(tmp_path, task, edit):
    suite, item = task
    agent = coder("read_file", edit)
    calls = suite.reference(item, agent.tools)
    assert [name for name, _ in calls] == ["read_file", edit]
    success = from_reference(item.task, calls, agent, "code", write_workspace(item, tmp_path),
                             lambda root: suite.check(item, root).correct, "reference")
    assert success is not None and (success.step, success.agent) == ("code", "coder")
    demo = success.demonstration
    assert demo.task == item.task and "Hint" not in demo.task
    assert [s.call for s in demo.steps] == ["read_file", edit]
    line = item.data["line"]
    assert demo.steps[0].result == item.files[item.data["path"]].splitlines(True)[line - 1]
    assert (tmp_path / item.data["path"]).read_text() == item.data["original"]


def test_no_demonstration_without_an_edit_tool_a_permission_or_the_checkers_consent(
        tmp_path, task):
    suite, item = task
    assert suite.reference(item, ["read_file", "run_tests"]) == []

    def attempt(agent, folder, accepted=lambda root: suite.check(item, root).correct):
        return from_reference(item.task, suite.reference(item, agent.tools), agent, "code",
                              write_workspace(item, tmp_path / folder), accepted, "reference")

    assert attempt(coder("read_file", "run_tests"), "read-only") is None
    assert attempt(coder("replace_lines", paths=("tests/**",)), "denied") is None  # refused
    assert (tmp_path / "denied" / item.data["path"]).read_text() == item.files[item.data["path"]]
    assert attempt(coder("replace_lines"), "rejected", accepted=lambda _root: False) is None
