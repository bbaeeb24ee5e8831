"""Logic manifests: the steps of a multi-agent task, validated before anything runs.

```yaml
name: code-test-audit
agents: agents.yaml                    # relative to this file
steps:
  - id: fix                            # a bounded loop: Code -> Test until the tests pass
    loop:
      max_iterations: 3
      until: "steps.test.data.failed == 0"
      steps:
        - {id: code, agent: coder, instruction: "Fix this bug: {{ task }}"}
        - {id: test, agent: tester, instruction: "Run the tests.", retries: 1}
  - id: audit
    agent: auditor
    when: "steps.test.data.failed == 0"
    instruction: "Review the change. Test report: {{ steps.test.output }}"
    timeout_s: 120
```
Instructions are Jinja templates over `task`, `steps.<id>` (`output`, `data`, `status`) and
`loop.iteration`; `when` and `until` are Jinja expressions over the same names. A template may
only name steps that run before it (or, inside a loop, any step of that loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from pyagent.fleet.agent import NAME_PATTERN, AgentSpec, load_agents
from pyagent.yamlfile import Lines, config_error, load_yaml, validate

NAMES = {"task", "steps", "loop"}


class StepSpec(BaseModel):
    """One agent turn."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=NAME_PATTERN)
    agent: str
    instruction: str = Field(min_length=1)
    when: str | None = None
    retries: int = Field(0, ge=0, le=10)
    timeout_s: float | None = Field(None, gt=0)


class LoopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[StepSpec] = Field(min_length=1)
    until: str
    max_iterations: int = Field(ge=1, le=100)


class LoopSpec(BaseModel):
    """Steps repeated until a condition holds, at most `max_iterations` times."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=NAME_PATTERN)
    loop: LoopBody


STEP, LOOP = "step-spec", "loop-spec"  # union tags, left out of error locations


def _kind(value: Any) -> str:
    is_loop = isinstance(value, dict | LoopSpec) and (
        isinstance(value, LoopSpec) or "loop" in value)
    return LOOP if is_loop else STEP


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    agents: str
    steps: list[Annotated[Annotated[StepSpec, Tag(STEP)] | Annotated[LoopSpec, Tag(LOOP)],
                          Discriminator(_kind)]] = Field(min_length=1)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with its agents."""

    path: Path
    name: str
    description: str
    steps: tuple[StepSpec | LoopSpec, ...]
    agents: dict[str, AgentSpec]

    def step_ids(self) -> list[str]:
        return [s.id for item in self.steps for s in _flatten(item)]


def environment() -> SandboxedEnvironment:
    """The Jinja environment for instructions and conditions: sandboxed, strict about names."""
    from jinja2 import StrictUndefined

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                keep_trailing_newline=True)


def load_manifest(path: Path, known_tools: set[str] | None = None) -> Manifest:
    """Read and check `path` and the agents file it names; every error names file and line."""
    path = Path(path)
    data, lines = load_yaml(path)
    spec = validate(ManifestFile, data, lines, path, tags={STEP, LOOP})
    agents_path = (path.parent / spec.agents).resolve()
    if not agents_path.is_file():
        raise config_error(path, lines, ("agents",), f"agents: no agents file at {agents_path}")
    agents = load_agents(agents_path, known_tools)
    _check(spec, lines, path, agents)
    return Manifest(path, spec.name, spec.description, tuple(spec.steps), agents)


def _flatten(item: StepSpec | LoopSpec) -> list[StepSpec]:
    return list(item.loop.steps) if isinstance(item, LoopSpec) else [item]


def _check(spec: ManifestFile, lines: Lines, path: Path, agents: dict[str, AgentSpec]) -> None:
    env = environment()
    seen: set[str] = set()
    for index, item in enumerate(spec.steps):
        where: tuple[Any, ...] = ("steps", index)
        if item.id in seen:
            raise config_error(path, lines, (*where, "id"), f"step id {item.id!r} is used twice")
        seen.add(item.id)
        if isinstance(item, LoopSpec):
            ids = [s.id for s in item.loop.steps]
            inner = set(ids)
            repeated = {i for i in ids if ids.count(i) > 1} | (inner & seen)
            if repeated:
                raise config_error(path, lines, (*where, "loop", "steps"),
                                   f"step ids {sorted(repeated)} are used twice")
            visible = seen | inner
            for j, step in enumerate(item.loop.steps):
                _check_step(env, step, (*where, "loop", "steps", j), visible, lines, path, agents)
            _check_text(env, item.loop.until, (*where, "loop", "until"), visible, lines, path,
                        expression=True)
            seen |= inner
        else:
            _check_step(env, item, where, seen - {item.id}, lines, path, agents)


def _check_step(env: SandboxedEnvironment, step: StepSpec, where: tuple[Any, ...],
                visible: set[str], lines: Lines, path: Path,
                agents: dict[str, AgentSpec]) -> None:
    if step.agent not in agents:
        raise config_error(path, lines, (*where, "agent"),
                           f"unknown agent {step.agent!r}; the agents file defines "
                           f"{', '.join(sorted(agents))}")
    _check_text(env, step.instruction, (*where, "instruction"), visible, lines, path)
    if step.when is not None:
        _check_text(env, step.when, (*where, "when"), visible, lines, path, expression=True)


def _check_text(env: SandboxedEnvironment, text: str, where: tuple[Any, ...], visible: set[str],
                lines: Lines, path: Path, expression: bool = False) -> None:
    """Parse a template or expression and check every name and step it refers to."""
    field = ".".join(str(part) for part in where)
    try:
        tree = env.parse("{{ " + text + " }}" if expression else text)
    except TemplateSyntaxError as exc:
        raise config_error(path, lines, where, f"{field}: invalid template: {exc.message}") \
            from None
    unknown = meta.find_undeclared_variables(tree) - NAMES
    if unknown:
        raise config_error(path, lines, where, f"{field}: unknown names {sorted(unknown)}; "
                           f"use {', '.join(sorted(NAMES))}")
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if isinstance(target, nodes.Name) and target.name == "steps":
            step = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value",
                                                                             None)
            if step not in visible:
                raise config_error(path, lines, where,
                                   f"{field}: refers to step {step!r}, which does not run before "
                                   "it")
