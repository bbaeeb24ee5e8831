"""Agent definitions: who an agent is, what it runs on, what it may touch, and its limits.

```yaml
agents:
  - name: coder
    role: You fix bugs in Python code. Change as little as possible.
    backend: embedded            # embedded | openai | replay
    model: gemma-3-270m
    tools: [read_file, write_file, list_files]
    subagents: [reviewer]        # agents it may delegate a sub-task to (the `delegate` tool)
    permissions:
      paths: ["src/**", "tests/**"]
      commands: []
    limits: {max_tokens: 512, wall_time_s: 300, max_tool_calls: 8}
    defenses: {spotlight: datamark, sandwich: true}   # against injected instructions
    demonstrations:              # worked examples the model reads before its own task
      - task: The tests in tests/test_solution.py fail. ...
        steps:
          - {call: read_file, arguments: {path: src/solution.py}, result: "def add(a, b): ..."}
        answer: Fixed the comparison in add.
        source: run 3f2a... of repair item off_by_one/d1/train/0   # where it came from
    procedure: [read_file, write_file]   # the order of its calls; then it answers
```
`defenses` are described in `fleet/defenses.py`. Demonstrations are shown to the model as earlier
exchanges, just before the agent's instruction, on every request of its turns; they are never part
of the run's transcript. A `procedure` fixes which tool each call of a turn uses, in order: the
n-th call may only be to its n-th tool (the grammar enforces it on the embedded engine; other
backends get a named `tool_choice`), and after the last one the agent answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pyagent.fleet.defenses import Defenses
from pyagent.yamlfile import config_error, load_yaml, validate

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"


class Permissions(BaseModel):
    """What an agent's tools may touch: the files it may write (workspace-relative globs, where
    `*` also crosses directories) and the commands its shell may run."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(default_factory=lambda: ["**"])
    commands: list[str] = Field(default_factory=list)

    @field_validator("paths")
    @classmethod
    def _inside(cls, paths: list[str]) -> list[str]:
        for pattern in paths:
            if pattern.startswith("/") or ".." in Path(pattern).parts:
                raise ValueError(f"path pattern {pattern!r} must stay inside the workspace")
        return paths


class Limits(BaseModel):
    """Per-invocation ceilings; exceeding one ends the agent's turn with an error."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(512, ge=1)
    wall_time_s: float = Field(300.0, gt=0)
    max_cost_usd: float | None = Field(None, ge=0)
    max_tool_calls: int = Field(8, ge=0)


class DemoStep(BaseModel):
    """One tool call of a demonstration and what the tool returned."""

    model_config = ConfigDict(extra="forbid")

    call: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    result: str = ""


class Demonstration(BaseModel):
    """A worked example: a task, the calls that solved it, the answer, and its provenance."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    steps: list[DemoStep] = Field(default_factory=list)
    answer: str = ""
    source: str | None = None


class AgentSpec(BaseModel):
    """One agent."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    role: str = Field(min_length=1)
    backend: Literal["embedded", "openai", "replay"] = "embedded"
    model: str | None = None
    tools: list[str] = Field(default_factory=list)
    subagents: list[str] = Field(default_factory=list)
    permissions: Permissions = Field(default_factory=Permissions)
    limits: Limits = Field(default_factory=Limits)
    defenses: Defenses = Field(default_factory=Defenses)
    demonstrations: list[Demonstration] = Field(default_factory=list)
    procedure: list[str] = Field(default_factory=list)


class AgentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agents: list[AgentSpec] = Field(min_length=1)


def load_agents(path: Path, known_tools: set[str] | None = None) -> dict[str, AgentSpec]:
    """Agents defined in `path`, by name; duplicate names, unknown tools and unknown sub-agents
    name their line."""
    data, lines = load_yaml(path)
    agents = validate(AgentsFile, data, lines, path).agents
    by_name: dict[str, AgentSpec] = {}
    for index, agent in enumerate(agents):
        if agent.name in by_name:
            raise config_error(path, lines, ("agents", index, "name"),
                               f"agents.{index}.name: agent {agent.name!r} is defined twice")
        for tool_index, tool in enumerate(agent.tools):
            if known_tools is not None and tool not in known_tools:
                raise config_error(
                    path, lines, ("agents", index, "tools", tool_index),
                    f"agents.{index}.tools.{tool_index}: unknown tool {tool!r}; known tools: "
                    f"{', '.join(sorted(known_tools))}")
        for demo_index, demo in enumerate(agent.demonstrations):
            for step_index, step in enumerate(demo.steps):
                if step.call not in agent.tools:
                    where = ("agents", index, "demonstrations", demo_index, "steps", step_index,
                             "call")
                    raise config_error(
                        path, lines, where,
                        f"{'.'.join(map(str, where))}: {step.call!r} is not one of the agent's "
                        f"tools ({', '.join(agent.tools) or 'none'})")
        for step_index, call in enumerate(agent.procedure):
            if call not in agent.tools:
                raise config_error(
                    path, lines, ("agents", index, "procedure", step_index),
                    f"agents.{index}.procedure.{step_index}: {call!r} is not one of the agent's "
                    f"tools ({', '.join(agent.tools) or 'none'})")
        by_name[agent.name] = agent
    for index, agent in enumerate(agents):
        for sub_index, sub in enumerate(agent.subagents):
            if sub not in by_name:
                raise config_error(
                    path, lines, ("agents", index, "subagents", sub_index),
                    f"agents.{index}.subagents.{sub_index}: unknown agent {sub!r}; agents: "
                    f"{', '.join(by_name)}")
    return by_name
