"""Logic manifests: the steps of a multi-agent task and the goal it must reach, validated before
anything runs.

```yaml
name: code-test-audit
agents: agents.yaml                    # relative to this file
conditions: state                      # when/until decide on state the runtime computed
goal:                                  # checked by the runtime on the workspace after the last step
  description: The project's tests pass.
  checks:                              # all must pass; each is a tool call and what must hold
    - tool: run_tests                  # any tool; `shell` may run its own argv[0]
      expect: "data.failed == 0 and data.passed > 0"   # over the call's `data` and `output`
steps:
  - id: fix                            # a bounded loop: Code -> Test until the tests pass
    loop:
      max_iterations: 3
      check: {tool: run_tests}         # run by the runtime after every round (or `until:`)
      steps:
        - {id: code, agent: coder, instruction: "Fix this bug: {{ task }}"}
        - {id: test, agent: tester, instruction: "Run the tests.", retries: 1}
  - id: audit
    agent: auditor
    when: "steps.fix.status == 'passed'"
    instruction: "Review the change. Test report: {{ steps.fix.output }}"
    timeout_s: 120
    tools: [lint]                      # least privilege: this step may use only these
    routes:                            # another agent takes the step for some tasks
      - {agent: strict-auditor, when: "'security' in task"}
```
Instructions are Jinja templates over `task`, `steps.<id>` (`output`, `data`, `status`) and
`loop.iteration`; `when` and `until` are Jinja expressions over the same names. A template may
only name steps that run before it (or, inside a loop, any step of that loop and the loop itself).
A step's `data` is that of its last successful tool call; a test step whose pytest ran no test has
none, so a condition on `returncode` never mistakes "nothing ran" for "nothing failed".

A loop ends when its `until` holds or, with a `check` instead, when the check passes: a tool call
with arguments the manifest pins, run by the runtime on the workspace after every round, like the
goal's. The loop's own `steps.<loop id>` is then the latest check's `output` and `data`, with
`status` `passed` or `failed`.

`routes` hand a step to another agent: the first route whose `when` (an expression over `task`
alone, so the model's words never choose who acts) holds, or that has none, takes it; otherwise the
step's own `agent` does. `tools` narrows a step to some of its agent's tools.

`conditions: state` (at the top) lets a `when` or `until` decide only on what an agent cannot
steer: any step's `status`, and the `data` of a loop's check. A step's `output` is the model's
words, and its `data` comes from tool calls whose arguments the model chose (a test run narrowed
to one passing test, any command that exits 0), so injected text can steer both.

The goal is what decides a run's outcome: `succeeded` when its check passes, `goal_not_met`
otherwise (with the check's output, and any loop that ran out of rounds), `error` when a step
failed. The model's own words never decide it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from jinja2 import TemplateSyntaxError, meta, nodes
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from pyagent.fleet.agent import NAME_PATTERN, AgentSpec, load_agents
from pyagent.fleet.templates import TemplateEnvironment
from pyagent.fleet.tools.registry import EDITS, TOOLS
from pyagent.yamlfile import Lines, config_error, load_yaml, validate

STEP_NAMES = frozenset({"task", "steps", "loop"})
ROUTE_NAMES = frozenset({"task"})
GOAL_NAMES = frozenset({"data", "output"})


class RouteSpec(BaseModel):
    """An agent that takes a step over for the tasks where `when` holds (always, without it)."""

    model_config = ConfigDict(extra="forbid")

    agent: str
    when: str | None = None


class StepSpec(BaseModel):
    """One agent turn."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=NAME_PATTERN)
    agent: str
    instruction: str = Field(min_length=1)
    when: str | None = None
    retries: int = Field(0, ge=0, le=10)
    timeout_s: float | None = Field(None, gt=0)
    tools: list[str] | None = None
    routes: list[RouteSpec] = Field(default_factory=list)


class CheckSpec(BaseModel):
    """A tool the runtime calls on the workspace, and an expression over the call's `data` and
    `output` that must hold (default: the call succeeds and, where it reports one, its
    `returncode` is 0)."""

    model_config = ConfigDict(extra="forbid")

    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    expect: str = "data.get('returncode', 0) == 0"
    timeout_s: float = Field(300.0, gt=0)


class LoopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[StepSpec] = Field(min_length=1)
    until: str | None = None
    check: CheckSpec | None = None
    max_iterations: int = Field(ge=1, le=100)


class LoopSpec(BaseModel):
    """Steps repeated until a condition holds (`until`) or a check the runtime runs after each
    round passes (`check`), at most `max_iterations` times."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=NAME_PATTERN)
    loop: LoopBody


STEP, LOOP = "step-spec", "loop-spec"  # union tags, left out of error locations


def _kind(value: Any) -> str:
    is_loop = isinstance(value, dict | LoopSpec) and (
        isinstance(value, LoopSpec) or "loop" in value)
    return LOOP if is_loop else STEP


class GoalSpec(BaseModel):
    """What a run must achieve, as checks of the workspace's state after the last step."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1)
    checks: list[CheckSpec] = Field(min_length=1)


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    agents: str
    conditions: Literal["any", "state"] = "any"
    goal: GoalSpec
    steps: list[Annotated[Annotated[StepSpec, Tag(STEP)] | Annotated[LoopSpec, Tag(LOOP)],
                          Discriminator(_kind)]] = Field(min_length=1)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with its agents."""

    path: Path
    name: str
    description: str
    goal: GoalSpec
    steps: tuple[StepSpec | LoopSpec, ...]
    agents: dict[str, AgentSpec]
    sources: dict[tuple[str, str], str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()  # the manifest and its agents file
    quotes: dict[str, frozenset[str] | None] = field(default_factory=dict)

    def quoted(self, step: str) -> frozenset[str] | None:
        """The steps whose results `step`'s instruction names (None: any, by a computed name,
        or not known)."""
        return self.quotes.get(step)

    def step_ids(self) -> list[str]:
        return [s.id for item in self.steps for s in _flatten(item)]

    def where(self, item: str, name: str) -> str:
        """`file:line: field` of field `name` (instruction, when, until, `check.expect`;
        `checks.N.expect` of `goal`) of step, loop or `goal` `item`, for error messages."""
        return self.sources.get((item, name), f"{self.path}: {item}.{name}")


def load_manifest(path: Path, known_tools: set[str] | None = None) -> Manifest:
    """Read and check `path` and the agents file it names; every error names file and line."""
    path = Path(path)
    data, lines = load_yaml(path)
    spec = validate(ManifestFile, data, lines, path, tags={STEP, LOOP})
    agents_path = (path.parent / spec.agents).resolve()
    if not agents_path.is_file():
        raise config_error(path, lines, ("agents",), f"agents: no agents file at {agents_path}")
    agents = load_agents(agents_path, known_tools)
    checker = _Checker(path, lines, known_tools, state_only=spec.conditions == "state")
    checker.steps(spec, agents)
    checker.goal(spec.goal)
    return Manifest(path.resolve(), spec.name, spec.description, spec.goal, tuple(spec.steps),
                    agents, checker.sources, (path.resolve(), agents_path), checker.quotes)


def _key(node: nodes.Getattr | nodes.Getitem) -> object:
    return node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)


def _state_only(tree: nodes.Template, checked: set[str]) -> bool:
    """Whether every use of `steps` in `tree` is `steps.<id>.status` or, for a loop in
    `checked` (one with a runtime check), `steps.<loop id>.data`."""
    lookups = list(tree.find_all((nodes.Getattr, nodes.Getitem)))
    steps = [n for n in lookups if isinstance(n.node, nodes.Name) and n.node.name == "steps"]
    allowed = {id(n.node) for n in lookups for step in steps if n.node is step and (
        _key(n) == "status" or (_key(n) == "data" and _key(step) in checked))}
    names = sum(1 for n in tree.find_all(nodes.Name) if n.name == "steps")
    return names == len(steps) and all(id(step) in allowed for step in steps)


def _flatten(item: StepSpec | LoopSpec) -> list[StepSpec]:
    return list(item.loop.steps) if isinstance(item, LoopSpec) else [item]


class _Checker:
    """Checks a manifest's references and templates, and records where each template is."""

    def __init__(self, path: Path, lines: Lines, known_tools: set[str] | None,
                 state_only: bool = False) -> None:
        self.path, self.lines, self.known_tools = path, lines, known_tools
        self.state_only = state_only
        self.checked: set[str] = set()  # loops with a runtime check
        self.env = TemplateEnvironment()
        self.sources: dict[tuple[str, str], str] = {}
        self.quotes: dict[str, frozenset[str] | None] = {}  # step -> steps its instruction names

    def error(self, where: tuple[Any, ...], message: str) -> Exception:
        return config_error(self.path, self.lines, where, message)

    def steps(self, spec: ManifestFile, agents: dict[str, AgentSpec]) -> None:
        loops = {item.id: item.loop.check is not None for item in spec.steps
                 if isinstance(item, LoopSpec)}
        self.checked = {name for name, checked in loops.items() if checked}
        silent = set(loops) - self.checked  # a loop with `until` has no output of its own
        seen: set[str] = set()
        for index, item in enumerate(spec.steps):
            where: tuple[Any, ...] = ("steps", index)
            if item.id in seen:
                raise self.error((*where, "id"), f"step id {item.id!r} is used twice")
            seen.add(item.id)
            if isinstance(item, LoopSpec):
                ids = [s.id for s in item.loop.steps]
                inner = set(ids)
                repeated = {i for i in ids if ids.count(i) > 1} | (inner & seen)
                if repeated:
                    raise self.error((*where, "loop", "steps"),
                                     f"step ids {sorted(repeated)} are used twice")
                if (item.loop.until is None) == (item.loop.check is None):
                    raise self.error((*where, "loop"), f"steps.{index}.loop: loop {item.id!r} "
                                     "needs exactly one of `until` (a condition) and `check` (a "
                                     "tool call the runtime runs after each round)")
                visible = (seen - silent) | inner
                for j, step in enumerate(item.loop.steps):
                    self.step(step, (*where, "loop", "steps", j), visible, agents)
                self.ending(item, (*where, "loop"), visible)
                seen |= inner
            else:
                self.step(item, where, seen - silent - {item.id}, agents)

    def step(self, step: StepSpec, where: tuple[Any, ...], visible: set[str],
             agents: dict[str, AgentSpec]) -> None:
        takers = [(step.agent, (*where, "agent"))] + [
            (route.agent, (*where, "routes", i, "agent")) for i, route in enumerate(step.routes)]
        for name, at in takers:
            if name not in agents:
                field = f"{'.'.join(map(str, at))}: " if "routes" in at else ""
                raise self.error(at, f"{field}unknown agent {name!r}; the agents file defines "
                                 f"{', '.join(sorted(agents))}")
        self.text(step.id, "instruction", step.instruction, (*where, "instruction"), visible)
        for name, _ in takers:
            agent = agents[name]
            extra = [tool for tool in step.tools or () if tool not in agent.tools]
            if extra:
                raise self.error((*where, "tools"), f"step {step.id!r} may use only tools of "
                                 f"its agent {agent.name!r} ({', '.join(agent.tools) or 'none'}"
                                 f"); not {', '.join(extra)}")
        for i, route in enumerate(step.routes):
            if route.when is not None:
                self.text(step.id, f"routes.{i}.when", route.when, (*where, "routes", i, "when"),
                          set(), expression=True, names=ROUTE_NAMES)
        if step.when is not None:
            self.text(step.id, "when", step.when, (*where, "when"), visible, expression=True)

    def ending(self, item: LoopSpec, where: tuple[Any, ...], visible: set[str]) -> None:
        """A loop's `until` condition or its `check`."""
        loop = item.loop
        if loop.until is not None:
            self.text(item.id, "until", loop.until, (*where, "until"), visible, expression=True)
        else:
            assert loop.check is not None
            self.check(item.id, "check.expect", loop.check, (*where, "check"))

    def goal(self, goal: GoalSpec) -> None:
        for index, check in enumerate(goal.checks):
            self.check("goal", f"checks.{index}.expect", check, ("goal", "checks", index))

    def check(self, item: str, name: str, check: CheckSpec, where: tuple[Any, ...]) -> None:
        """A check's tool must exist, its arguments suit the tool and its `expect` parse."""
        field = ".".join(map(str, where))
        if self.known_tools is not None and check.tool not in self.known_tools:
            raise self.error((*where, "tool"), f"{field}.tool: unknown tool {check.tool!r}; "
                             f"known tools: {', '.join(sorted(self.known_tools))}")
        self.text(item, name, check.expect, (*where, "expect"), set(), expression=True,
                  names=GOAL_NAMES)
        if check.tool in TOOLS:
            self.arguments(check, (*where, "arguments"))

    def arguments(self, check: CheckSpec, where: tuple[Any, ...]) -> None:
        """A check's arguments must suit its tool, and a `shell` check's program exist,
        so that a check that can never run fails before the run, not after it."""
        field = ".".join(str(part) for part in where)
        try:
            parsed = TOOLS[check.tool].input_model.model_validate(check.arguments)
        except ValidationError as exc:
            error = exc.errors()[0]
            inner = ".".join(str(part) for part in error["loc"])
            raise self.error(where, f"{field}{'.' + inner if inner else ''}: {error['msg']}") \
                from None
        if check.tool in EDITS:
            raise self.error(where, f"{field}: a check reads the workspace; it may not "
                             "write to it")
        path = getattr(parsed, "path", None)
        if isinstance(path, str) and (path.startswith("/") or ".." in Path(path).parts):
            raise self.error(where, f"{field}.path: {path!r} must stay inside the workspace")
        program = getattr(parsed, "argv", [None])[0]
        if program is not None and "/" not in program and shutil.which(program) is None:
            raise self.error(where, f"{field}.argv.0: program {program!r} is not on PATH")

    def text(self, item: str, name: str, text: str, where: tuple[Any, ...], visible: set[str],
             expression: bool = False, names: frozenset[str] = STEP_NAMES) -> None:
        """Parse a template or expression, check every name and step it refers to, and record
        where it is."""
        field = ".".join(str(part) for part in where)
        line = self.lines.get(where)
        self.sources[(item, name)] = f"{self.path}:{line}: {field}" if line else \
            f"{self.path}: {field}"
        try:
            if expression:  # the runtime compiles exactly one expression: so must the check
                self.env.compile_expression(text)
            tree = self.env.parse("{{ " + text + " }}" if expression else text)
        except TemplateSyntaxError as exc:
            raise self.error(where, f"{field}: invalid template: {exc.message}") from None
        unknown = meta.find_undeclared_variables(tree) - names
        if unknown:
            raise self.error(where, f"{field}: unknown names {sorted(unknown)}; use "
                             f"{', '.join(sorted(names))}")
        if expression and self.state_only and not _state_only(tree, self.checked):
            raise self.error(where, f"{field}: decides on what an agent can steer (a step's "
                             "output is the model's words; its data, tool calls whose arguments "
                             "the model chose); conditions: state allows only steps.<id>.status "
                             "and steps.<loop>.data of a loop with a `check`")
        named = [_key(node) for node in tree.find_all((nodes.Getattr, nodes.Getitem))
                 if isinstance(node.node, nodes.Name) and node.node.name == "steps"]
        if name == "instruction":  # which results it quotes (None: any, by a computed name)
            uses = sum(n.name == "steps" for n in tree.find_all(nodes.Name))
            exact = len(named) == uses and all(isinstance(key, str) for key in named)
            self.quotes[item] = frozenset(str(key) for key in named) if exact else None
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            key = _key(node)
            if isinstance(key, str) and key.startswith("_"):
                raise self.error(where, f"{field}: refers to {key!r}; names starting with _ "
                                 "are internal and not available to templates")
            target = node.node
            if isinstance(target, nodes.Name) and target.name == "steps" and key not in visible:
                raise self.error(where, f"{field}: refers to step {key!r}, which does not run "
                                 "before it")

