"""The repair suite: mutation operators on hand-written functions, and real items whose tests run
in the sandbox (bubblewrap)."""

from __future__ import annotations

import ast
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyagent.bench.suites import repair
from pyagent.bench.suites.base import Suite, split_of
from pyagent.bench.suites.mutate import OPERATORS, Mutant, mutants
from pyagent.bench.suites.repair import Program, RepairSuite, write_workspace
from pyagent.errors import ConfigError
from pyagent.fleet.tools.base import ToolError


def last_function(source: str) -> str:
    return [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)][-1].name


def function(source: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    return namespace[last_function(source)]


def all_mutants(source: str, operator: str) -> list[Mutant]:
    return list(mutants(source, last_function(source), random.Random(0), [operator]))


def changed_lines(before: str, after: str) -> list[int]:
    old, new = before.splitlines(), after.splitlines()
    return [n for n, (a, b) in enumerate(zip(old, new, strict=False), 1) if a != b]


ADD = "def add(a, b):\n    return a + b\n"
LAST = 'def last(items):\n    """The last item."""\n    return items[len(items) - 1]\n'
FIRSTS = "def firsts(n):\n    return list(range(n))\n"
SIGN = "def sign(x):\n    if x < 0:\n        return -1\n    return 1\n"
AREA = "def area(width, height):\n    scaled = width * 2\n    return scaled * height\n"
ORDERED = "def ordered(xs):\n    return sorted(xs)\n"
COLLECT = ("def collect(xs):\n    out = []\n    out.extend(xs)\n    out.sort()\n"
           "    return out  # sorted\n")


@pytest.mark.parametrize(("source", "operator", "expected"), [
    (ADD, "operator", {"`+` became `-` on line 2": "    return a - b"}),
    (LAST, "off_by_one", {"`1` became `2` on line 3": "    return items[len(items) - 2]",
                          "`1` became `0` on line 3": "    return items[len(items) - 0]"}),
    (FIRSTS, "off_by_one", {"`n` became `n + 1` on line 2": "    return list(range(n + 1))",
                            "`n` became `n - 1` on line 2": "    return list(range(n - 1))"}),
    (SIGN, "condition", {"`x < 0` became `x >= 0` on line 2": "    if x >= 0:"}),
    (ORDERED, "call", {"`sorted(xs)` became `xs` on line 2": "    return xs"}),
])
def test_operator_makes_the_described_bug(source: str, operator: str,
                                          expected: dict[str, str]) -> None:
    found = all_mutants(source, operator)
    assert {m.description: m.source.splitlines()[m.line - 1] for m in found} == expected
    for mutant in found:
        assert mutant.operator == operator
        assert changed_lines(source, mutant.source) == [mutant.line]


def test_each_mutant_parses_and_fails_a_test_the_original_passes() -> None:
    cases = [(ADD, "operator", lambda f: f(2, 3) == 5),
             (LAST, "off_by_one", lambda f: f([1, 2, 3]) == 3),
             (FIRSTS, "off_by_one", lambda f: f(3) == [0, 1, 2]),
             (SIGN, "condition", lambda f: f(-2) == -1 and f(2) == 1),
             (AREA, "variable", lambda f: f(3, 5) == 30),
             (ORDERED, "call", lambda f: f([2, 1]) == [1, 2]),
             (COLLECT, "call", lambda f: f([2, 1]) == [1, 2])]
    for source, operator, test in cases:
        assert test(function(source))
        found = all_mutants(source, operator)
        assert found, operator
        for mutant in found:
            ast.parse(mutant.source)
            try:
                killed = not test(function(mutant.source))
            except Exception:
                killed = True
            assert killed, mutant.description


def test_wrong_variable_uses_locals_bound_earlier() -> None:
    found = all_mutants(AREA, "variable")
    assert {m.description for m in found} == {
        "`width` became `height` on line 2",  # not `scaled`: it is bound on line 2 itself
        "`scaled` became `height` on line 3", "`scaled` became `width` on line 3",
        "`height` became `scaled` on line 3", "`height` became `width` on line 3"}
    for mutant in found:
        assert changed_lines(AREA, mutant.source) == [mutant.line]


def test_missing_call_removes_a_method_call_statement() -> None:
    found = {m.description: m.source for m in all_mutants(COLLECT, "call")}
    assert found["`out.sort()` removed from line 4"] == COLLECT.replace("    out.sort()\n", "")
    assert found["`out.extend(xs)` removed from line 3"] == COLLECT.replace(
        "    out.extend(xs)\n", "")


def test_operator_swaps_keep_precedence_and_the_rest_of_the_file() -> None:
    source = ("import math\n\n\ndef f(a, b, c):\n    # keep me\n    x = (a + b) * c  # é\n"
              "    return x if a and b or c else 0\n")
    found = all_mutants(source, "operator")
    texts = {m.source.splitlines()[m.line - 1] for m in found}
    assert "    x = (a - b) * c  # é" in texts
    assert "    x = (a + b) / c  # é" in texts
    assert "    return x if (a or b) or c else 0" in texts  # the grouping kept
    assert "    return x if a and b and c else 0" in texts
    for mutant in found:
        assert mutant.source.startswith("import math\n\n\ndef f(a, b, c):\n    # keep me\n")


def test_mutants_are_deterministic_by_seed() -> None:
    source = repair.human_eval_programs()[0].files["src/solution.py"]
    def run(seed: int) -> list[str]:
        return [m.source for m in mutants(source, "has_close_elements", random.Random(seed))]
    assert run(3) == run(3)
    assert run(3) != run(4)
    assert sorted(run(3)) == sorted(run(4))


def test_unknown_operator_family_and_split_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown mutation operator 'swap'"):
        list(mutants(ADD, "add", random.Random(0), ["swap"]))
    suite = RepairSuite(programs=[], cache=tmp_path / "v.sqlite")
    assert isinstance(suite, Suite)
    assert suite.families == tuple(OPERATORS)
    with pytest.raises(ConfigError, match="has no family 'swap'"):
        suite.items("test", 1, families=["swap"])
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        suite.items("dev", 1)
    with pytest.raises(ConfigError, match="difficulty must be one of 1, 2, 3, not 4"):
        suite.items("test", 1, difficulties=[4])


@pytest.fixture
def sandbox_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The workspaces the sandbox ran tests on, from now on."""
    calls: list[Path] = []
    run_tests = repair.run_tests

    def counted(root: Path, timeout_s: float) -> Any:
        calls.append(root)
        return run_tests(root, timeout_s)
    monkeypatch.setattr(repair, "run_tests", counted)
    return calls


@pytest.fixture(scope="module")
def human_eval(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RepairSuite]:
    yield RepairSuite(programs=repair.human_eval_programs(),
                      cache=tmp_path_factory.mktemp("cache") / "verdicts.sqlite")


def test_items_are_killed_mutants_and_cached(human_eval: RepairSuite,
                                             sandbox_calls: list[Path], tmp_path: Path) -> None:
    items = human_eval.items("test", 1, seed=0, families=["operator"])
    assert sandbox_calls  # verified in the sandbox the first time
    assert [i.difficulty for i in items] == [1, 2, 3]
    assert len({(i.data["task_id"], i.data["description"]) for i in items}) == 1  # one bug
    item = items[0]
    assert item.is_fleet_task and item.family == "operator" and item.split == "test"
    assert set(item.files or {}) == {"src/solution.py", "tests/test_solution.py", "pyproject.toml"}
    assert item.data["original"] not in (item.files or {}).values()
    assert f"on line {item.data['line']}" in item.task and item.data["entry_point"] in item.task
    assert item.data["entry_point"] not in items[2].task

    calls = len(sandbox_calls)
    again = RepairSuite(programs=human_eval.programs, cache=human_eval.verdicts.path)
    assert again.items("test", 1, seed=0, families=["operator"]) == items
    assert len(sandbox_calls) == calls  # every verdict came from the cache

    workspace = write_workspace(item, tmp_path / "ws")
    grade = human_eval.check(item, workspace)
    assert not grade.correct and grade.score == 0.0 and "1 failed" in grade.detail

    (workspace / "src" / "solution.py").write_text(item.data["original"])
    grade = human_eval.check(item, workspace)
    assert grade.correct and grade.score == 1.0, grade.detail
    assert grade.parsed.startswith("--- a/src/solution.py")


def test_editing_the_tests_gets_no_credit(human_eval: RepairSuite, tmp_path: Path) -> None:
    item = human_eval.items("test", 1, seed=0, families=["operator"], difficulties=[3])[0]
    workspace = write_workspace(item, tmp_path / "ws")
    tests = workspace / "tests" / "test_solution.py"
    tests.write_text(tests.read_text().replace("    check(", "    (lambda f: None)("))
    grade = human_eval.check(item, workspace)
    assert not grade.correct and grade.score == 0.0
    assert "1 passed" in grade.detail and "tests/test_solution.py" in grade.detail

    write_workspace(item, workspace)
    (workspace / "src" / "solution.py").write_text(item.data["original"])
    (workspace / "conftest.py").write_text("")
    grade = human_eval.check(item, workspace)
    assert not grade.correct and "conftest.py" in grade.detail


def test_splits_are_disjoint_by_problem(human_eval: RepairSuite) -> None:
    test = human_eval.items("test", 1, seed=0, families=["operator"], difficulties=[3])
    train = human_eval.items("train", 2, seed=0, families=["operator"], difficulties=[3])
    for item in test + train:
        assert split_of(item.data["task_id"]) == item.split
    assert not {i.data["task_id"] for i in test} & {i.data["task_id"] for i in train}
    splits = {split_of(p.key) for p in human_eval.programs}
    assert splits == {"train", "validation", "test"}


COUNT_UP = "def count_up(n):\n    i = 0\n    while i < n:\n        i += 1\n    return i\n"
LOOPS = Program("count_up", "hand", {
    "src/solution.py": COUNT_UP, "pyproject.toml": repair.PYPROJECT,
    "tests/test_solution.py": "from solution import count_up\n\n\n"
                              "def test_count_up():\n    assert count_up(3) == 3\n"},
    (("src/solution.py", "count_up"),), "tests/test_solution.py")


def test_a_mutant_that_loops_forever_is_caught_by_the_timeout(tmp_path: Path) -> None:
    suite = RepairSuite(programs=[LOOPS], cache=tmp_path / "v.sqlite", timeout_s=4)
    looping = {**LOOPS.files, "src/solution.py": COUNT_UP.replace("i += 1", "i += 0")}
    start = time.monotonic()
    assert suite.verdict(looping) == "none ran"  # never kept as an item
    [item] = suite.items(split_of("count_up"), 1, families=["off_by_one"], difficulties=[3])
    assert item.data["description"] == "`1` became `2` on line 4"

    workspace = tmp_path / "ws"
    write_workspace(item, workspace)
    (workspace / "src" / "solution.py").write_text(looping["src/solution.py"])
    grade = suite.check(item, workspace)
    assert not grade.correct and "timed out" in grade.detail
    assert time.monotonic() - start < 30


def test_example_projects_whose_tests_fail_are_not_used(tmp_path: Path) -> None:
    suite = RepairSuite(programs=repair.example_programs(), cache=tmp_path / "v.sqlite")
    assert {p.key for p in suite.programs} >= {"examples/docstrings", "examples/bugfix"}
    bugfix = next(p for p in suite.programs if p.key == "examples/bugfix")
    assert suite.verdict(bugfix.files) == "failed"
    [item] = suite.items(split_of("examples/docstrings"), 1, families=["operator"],
                         difficulties=[2])
    assert item.data["task_id"] == "examples/docstrings"
    assert item.data["path"] == "src/geometry/shapes.py"
    assert "tests/test_shapes.py" in (item.files or {})
    assert f"`{item.data['entry_point']}` in src/geometry/shapes.py" in item.task


def test_a_sandbox_that_cannot_start_is_an_error_not_a_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(root: Path, timeout_s: float) -> Any:
        raise ToolError("cannot run commands confined: bubblewrap is not installed")
    monkeypatch.setattr(repair, "run_tests", refused)
    suite = RepairSuite(programs=[LOOPS], cache=tmp_path / "v.sqlite")
    with pytest.raises(ToolError, match="bubblewrap"):
        suite.verdict(LOOPS.files)
    monkeypatch.undo()
    assert suite.verdict(LOOPS.files) == "passed"  # nothing was cached
