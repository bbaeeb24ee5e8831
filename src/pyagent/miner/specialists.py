"""Specialists: an agent definition aimed at one failure cluster, with its provenance.

A specialist starts from the incumbent agent that failed in the cluster (the agent and step most
of its members went wrong at) and changes three things:
- its instructions: the incumbent's role plus advice for each symptom over-represented in the
  cluster (from `ADVICE`, templates keyed by symptom), or advice the model wrote from the
  cluster's evidence (reflection); each piece records what it came from;
- demonstrations: verified successful trajectories of the same agent on the tasks nearest the
  cluster's (by MiniLM similarity of the task texts);
- its tools: those the demonstrations used (the incumbent's own, when there are none), and, when
  every demonstration makes the same calls in the same order, that order as its `procedure`.
It takes over the cluster's step through a route in the manifest (`fleet/manifest.py`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyagent.fleet.agent import AgentSpec, Demonstration
from pyagent.miner.clusters import Cluster
from pyagent.miner.signatures import Signature

DEMONSTRATIONS = 2  # per specialist


@dataclass(frozen=True)
class Advice:
    """One instruction template and the symptoms (a regular expression) it answers; `{save}`
    in its text becomes how the specialist saves a fix with the tools it holds (`SAVING`)."""

    id: str
    symptom: str
    text: str


SAVING = {  # how a fix is saved, by the edit tool a specialist holds (the first one held)
    "replace_lines": "replace_lines with the line's number and its corrected text",
    "edit_file": "edit_file with the exact text of the line and its corrected text",
    "write_file": "write_file with the file's path and its whole corrected content",
}

ADVICE: tuple[Advice, ...] = (
    Advice("act", r"^no tool calls$",
           "Do not answer before you have acted: read the file the task names with read_file, "
           "then fix it."),
    Advice("save", r"^no file written$",
           "A fix counts only once it is saved: finish by calling {save}."),
    Advice("real-arguments", r"^(read_file|write_file|edit_file|replace_lines|list_files) failed",
           "Give every tool real values taken from the task, such as the path "
           "src/solution.py, never the words of its description such as 'file' or 'path'."),
    Advice("no-repeats", r"^the same call repeated$",
           "Never repeat a call you have made: its result will not change. Read the file once, "
           "then write the fix."),
    Advice("whole-file", r"file written with a syntax error$",
           "What you save must stay valid Python, with its indentation: change only the line "
           "with the bug."),
    Advice("tests-fail", r"^verdict: N tests? fail|^loop ran out of rounds$",
           "The bug is one small change on one line, such as < for <=, + for -, or an index "
           "off by one: change that line and keep everything else as it is."),
    Advice("keep-tests", r"^tests edited$",
           "Never change the tests or add files: change only the code the task names."),
    Advice("wall-time", r"^turn failed: .*wall time",
           "Be brief: one read, one write, and a one-line answer."),
)


@dataclass(frozen=True)
class Candidate:
    """A specialist and what it was built from."""

    name: str
    kind: str  # "mined" (from a cluster) or "control" (from a random sample of failures)
    cluster: int | None
    step: str
    replaces: str
    agent: AgentSpec
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "cluster": self.cluster,
                "step": self.step, "replaces": self.replaces,
                "instructions": self.agent.role, "tools": self.agent.tools,
                "procedure": self.agent.procedure,
                "demonstrations": [d.source for d in self.agent.demonstrations],
                "provenance": self.provenance}


@dataclass(frozen=True)
class Success:
    """A verified successful trajectory of one agent at one step, usable as a demonstration."""

    step: str
    agent: str
    demonstration: Demonstration


def target(members: Sequence[Signature]) -> tuple[str, str]:
    """The step and agent most of `members` went wrong at."""
    counts = Counter((s.step, s.agent) for s in members if s.step and s.agent)
    if not counts:
        raise ValueError("no member names the step and agent where it failed")
    (step, agent), _ = counts.most_common(1)[0]
    return step, agent


def advice_for(symptoms: Sequence[tuple[str, float]]) -> list[tuple[Advice, str, float]]:
    """The templates that answer `symptoms` (each once, in the symptoms' order), with the
    symptom that called for it and that symptom's share."""
    chosen: dict[str, tuple[Advice, str, float]] = {}
    for symptom, share in symptoms:
        for advice in ADVICE:
            if advice.id not in chosen and re.search(advice.symptom, symptom):
                chosen[advice.id] = (advice, symptom, share)
    return list(chosen.values())


def synthesize(name: str, members: Sequence[Signature], symptoms: Sequence[tuple[str, float]],
               incumbents: dict[str, AgentSpec], successes: Sequence[Success],
               similar: Callable[[Sequence[str], Sequence[str]], np.ndarray],
               kind: str = "mined", cluster: int | None = None,
               reflection: tuple[str, str] | None = None) -> Candidate:
    """A specialist for the failures `members`, whose over-represented `symptoms` choose its
    advice (or `reflection`: advice the model wrote, and the prompt it came from);
    `similar(a, b)` is a matrix of similarities between two lists of task texts."""
    step, replaces = target(members)
    incumbent = incumbents[replaces]
    own = [s for s in successes if s.agent == replaces and s.step == step]
    demos = _nearest(own, [s.task for s in members], similar)
    used = {c.call for d in demos for c in d.steps}
    tools = [t for t in incumbent.tools if t in used] if demos else list(incumbent.tools)
    save = next((how for tool, how in SAVING.items() if tool in tools), "the tool that saves it")
    pieces = advice_for(symptoms)
    if reflection is not None:
        advice_text = reflection[0].strip()
        instructions = [{"source": "reflection", "prompt": reflection[1], "text": advice_text}]
    else:
        texts = [a.text.format(save=save) for a, _, _ in pieces]
        advice_text = " ".join(texts)
        instructions = [{"source": f"template {a.id}", "symptom": symptom, "share": share,
                         "text": text} for (a, symptom, share), text in zip(pieces, texts,
                                                                            strict=True)]
    orders = {tuple(c.call for c in d.steps) for d in demos}
    procedure = list(orders.pop()) if len(orders) == 1 else []
    role = f"{incumbent.role}\n\n{advice_text}" if advice_text else incumbent.role
    agent = incumbent.model_copy(update={"name": name, "role": role, "tools": tools,
                                         "demonstrations": demos, "procedure": procedure})
    provenance = {"instructions": instructions,
                  "demonstrations": [d.source for d in demos],
                  "tools": (f"the tools its demonstrations call ({', '.join(tools)})" if demos
                            else f"the incumbent {replaces!r}'s (no demonstration found)"),
                  "procedure": (f"the order of calls all its demonstrations share "
                                f"({' -> '.join(procedure)})" if procedure else
                                "none: no demonstrations, or their calls differ"),
                  "members": [s.key for s in members]}
    return Candidate(name, kind, cluster, step, replaces, agent, provenance)


def _nearest(successes: Sequence[Success], tasks: Sequence[str],
             similar: Callable[[Sequence[str], Sequence[str]], np.ndarray]
             ) -> list[Demonstration]:
    """The demonstrations whose tasks are, on average, most similar to `tasks`."""
    if not successes or not tasks:
        return []
    scores = similar([s.demonstration.task for s in successes], tasks).mean(axis=1)
    order = np.argsort(-scores, kind="stable")[:DEMONSTRATIONS]
    return [successes[i].demonstration for i in order]


def control_members(clusters: Sequence[Cluster], signatures: Sequence[Signature],
                    seed: int) -> list[Signature]:
    """A random sample of all the failures, as large as the largest cluster: the members of the
    random-cluster control."""
    size = clusters[0].size if clusters else len(signatures)
    return random.Random(seed).sample(list(signatures), min(size, len(signatures)))
