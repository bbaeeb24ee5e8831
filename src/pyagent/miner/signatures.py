"""Failure signatures: what went wrong in a failed or low-scoring attempt, read from a data folder.

A data folder holds a trace store (`traces.db`, written by `pyagent run` and by `pyagent bench
run` for fleet tasks) and suite results (`suites.json`, anywhere below it). An attempt is a fleet
run (its spans, joined to its suite record when one names its run id) or a question item of a
suite (its record alone). It failed when its record is not correct or scored below `threshold`,
or, for a run without a record, when the run did not succeed.

A signature keeps the step and agent where it went wrong (the first whose tool calls or turn
failed, else the last that ran), the tool calls in order with their errors, the checker's
verdict, loops whose check failed in every round, files written that no longer parse, the
model's own words, and what the attempt cost. Its `symptoms` are the same facts with names,
numbers and quoted text taken out, so that attempts that failed the same way share them.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyagent.bench.results import is_suite, load_json
from pyagent.errors import ConfigError
from pyagent.fleet.tools.registry import EDITS
from pyagent.observe.traces import SpanRecord, TraceReader

WORDS_CHARS = 600  # of the model's own words kept in a signature
SYMPTOM_CHARS = 90
SUCCEEDED = "succeeded"


@dataclass(frozen=True)
class Signature:
    """One failed attempt, as the miner sees it."""

    key: str  # the run id, or `<item id>#<repeat>` for a question item
    source: str  # "fleet" (a manifest run) or "suite" (a question item)
    item_id: str | None
    family: str | None
    task: str
    score: float
    step: str | None = None
    agent: str | None = None
    tools: tuple[str, ...] = ()  # calls in order; a failed one ends in "!"
    errors: tuple[str, ...] = ()  # "tool: message" of failed calls and turns
    verdict: str = ""
    exhausted: tuple[str, ...] = ()
    broken: tuple[str, ...] = ()  # files written whose Python no longer parses
    repeats: int = 0  # calls that repeated an earlier call of the run exactly
    words: str = ""
    tokens: int = 0
    wall_s: float = 0.0
    symptoms: tuple[str, ...] = field(default=())

    def text(self) -> str:
        """The signature as one text, for embedding: symptoms first, then the words."""
        where = f"step {self.step} by {self.agent}" if self.step else self.family or self.source
        return (f"{where}. " + "; ".join(self.symptoms) + f". Calls: {' '.join(self.tools)}."
                f" Said: {self.words[:300]}")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def normalize(text: str) -> str:
    """`text` with quoted strings, paths and numbers replaced, whitespace collapsed, clipped:
    what stays is the shape of a message, shared by messages about different files."""
    text = re.sub(r"'[^'\n]*'|\"[^\"\n]*\"|`[^`\n]*`", "'…'", text)
    text = re.sub(r"(?<![\w.])[\w.-]*/[\w./-]+", "PATH", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return re.sub(r"\s+", " ", text).strip()[:SYMPTOM_CHARS]


def mine(data: Path, threshold: float = 1.0) -> list[Signature]:
    """The signature of every failed or low-scoring attempt in the data folder `data`."""
    if not data.is_dir():
        raise ConfigError(f"--data {data}: no such folder")
    records = suite_records(data)
    by_run = {r["run_id"]: r for r in records if r.get("run_id")}
    found: list[Signature] = []
    traced: set[str] = set()
    for path in sorted(data.rglob("traces.db")):
        with TraceReader(path) as reader:
            for run in reader.runs():
                traced.add(run.run_id)
                record = by_run.get(run.run_id)
                spans = reader.spans(run.run_id)
                if _failed(record, threshold) if record else _status(spans) != SUCCEEDED:
                    found.append(run_signature(spans, record))
    found += [record_signature(r) for r in records
              if r.get("run_id") not in traced and _failed(r, threshold)]
    return found


def _failed(record: Mapping[str, Any], threshold: float) -> bool:
    return not record.get("correct") or float(record.get("score") or 0.0) < threshold


def suite_records(data: Path) -> list[dict[str, Any]]:
    """The attempt records of every suite result (a JSON file with `records`) below `data`."""
    records = []
    for path in sorted(data.rglob("*.json")):
        try:
            result = load_json(path)
        except ConfigError:
            continue  # not every JSON file is a result
        if is_suite(result):
            records += [r for r in result["records"] if isinstance(r, dict) and "item_id" in r]
    return records


def _status(spans: list[SpanRecord]) -> str | None:
    runs = [s for s in spans if s.kind == "run"]
    return runs[-1].attributes.get("pyagent.run.status") if runs else None


def run_signature(spans: list[SpanRecord], record: Mapping[str, Any] | None = None
                  ) -> Signature:
    """The signature of one manifest run from its spans (and its suite record, when it has
    one: the item, its score and the checker's verdict)."""
    run = next(s for s in spans if s.kind == "run")
    steps = [s for s in spans if s.kind == "step"]
    step_of = {s.span_id: s for s in steps}
    parent = {s.span_id: s.parent_id for s in spans}

    def step_for(span: SpanRecord) -> SpanRecord | None:
        at: str | None = span.span_id
        for _ in range(64):
            if at is None or at in step_of:
                return step_of.get(at) if at else None
            at = parent.get(at)
        return None

    tools, errors, broken, words = [], [], [], []
    made: set[tuple[str, str]] = set()
    repeats = 0
    wrong: SpanRecord | None = None
    for span in spans:
        if span.kind == "tool_call":
            name = span.attributes.get("gen_ai.tool.name", span.name)
            made_call = (name, str(span.attributes.get("gen_ai.tool.call.arguments", "")))
            repeats += made_call in made
            made.add(made_call)
            failed = span.status == "error"
            tools.append(f"{name}!" if failed else name)
            if failed:
                errors.append(f"{name}: {span.attributes.get('exception.message', '')}")
            elif name == "write_file" and _breaks(span.attributes):
                broken.append(_argument(span.attributes, "path") or "?")
            if (failed or broken) and wrong is None:
                wrong = step_for(span)
        elif span.kind == "agent":
            if span.attributes.get("pyagent.agent.output"):
                words.append(str(span.attributes["pyagent.agent.output"]))
            if span.status == "error":
                errors.append(f"turn: {span.attributes.get('exception.message', '')}")
                wrong = wrong or step_for(span)
    wrong = wrong or (steps[-1] if steps else None)
    agent = None
    if wrong is not None:
        agent = next((s.attributes.get("gen_ai.agent.name") for s in spans
                      if s.kind == "agent" and s.parent_id == wrong.span_id), None)
    exhausted = _exhausted(spans)
    verdict = str(record.get("detail", "")) if record else _goal_verdict(spans)
    calls = [s for s in spans if s.kind == "llm_call"]
    tokens = sum(int(s.attributes.get("gen_ai.usage.input_tokens", 0))
                 + int(s.attributes.get("gen_ai.usage.output_tokens", 0)) for s in calls)
    signature = Signature(
        key=run.run_id, source="fleet", item_id=record.get("item_id") if record else None,
        family=record.get("family") if record else None,
        task=str(run.attributes.get("pyagent.task", "")) or (record or {}).get("item_id", ""),
        score=float(record["score"]) if record else 0.0,
        step=wrong.attributes.get("pyagent.step.id") if wrong else None, agent=agent,
        tools=tuple(tools), errors=tuple(errors), verdict=verdict, exhausted=exhausted,
        broken=tuple(broken), repeats=repeats, words=" | ".join(words)[:WORDS_CHARS],
        tokens=tokens,
        wall_s=float(run.duration_s or 0.0))
    return _with_symptoms(signature)


def record_signature(record: Mapping[str, Any]) -> Signature:
    """The signature of a suite attempt from its record alone (a question item, or a fleet
    task whose trace is missing)."""
    error = record.get("error")
    signature = Signature(
        key=record.get("run_id") or f"{record['item_id']}#{record.get('repeat', 0)}",
        source="fleet" if record.get("run_id") else "suite", item_id=record["item_id"],
        family=record.get("family"), task=str(record["item_id"]),
        score=float(record.get("score", 0.0)),
        errors=(f"attempt: {error}",) if error else (),
        verdict=str(record.get("detail", "")), words=str(record.get("answer", ""))[:WORDS_CHARS],
        tokens=int(record.get("prompt_tokens") or 0) + int(record.get("completion_tokens") or 0),
        wall_s=float(record.get("latency_s") or 0.0))
    return _with_symptoms(signature)


def _with_symptoms(signature: Signature) -> Signature:
    symptoms: list[str] = []
    symptoms += [f"{error.split(':', 1)[0]} failed: {normalize(error.split(':', 1)[-1])}"
                 for error in signature.errors]
    if signature.source == "fleet":
        if not signature.tools:
            symptoms.append("no tool calls")
        elif not any(t.rstrip("!") in EDITS and not t.endswith("!") for t in signature.tools):
            symptoms.append("no file written")
    symptoms += [f"{path.rsplit('.', 1)[-1]} file written with a syntax error"
                 for path in signature.broken]
    if signature.repeats:
        symptoms.append("the same call repeated")
    symptoms += ["loop ran out of rounds" for _ in signature.exhausted]
    if signature.verdict:
        symptoms.append(f"verdict: {normalize(signature.verdict.split(';')[0])}")
    if "(no credit)" in signature.verdict:
        symptoms.append("tests edited")
    return Signature(**{**signature.to_dict(),
                        "symptoms": tuple(dict.fromkeys(symptoms))})


def _argument(attributes: Mapping[str, Any], name: str) -> str | None:
    try:
        value = json.loads(attributes.get("gen_ai.tool.call.arguments") or "{}").get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _breaks(attributes: Mapping[str, Any]) -> bool:
    """Whether a write_file call saved Python that does not parse (unknowable, so False, when
    its arguments were clipped in the trace)."""
    path, content = _argument(attributes, "path"), _argument(attributes, "content")
    if not path or not path.endswith(".py") or content is None:
        return False
    try:
        ast.parse(content)
    except (SyntaxError, ValueError):
        return True
    return False


def _exhausted(spans: Iterable[SpanRecord]) -> tuple[str, ...]:
    """Loops whose check failed in every round that ran (the last round's check decides)."""
    last: dict[str, bool] = {}
    for span in spans:
        loop = span.attributes.get("pyagent.check.loop")
        if span.kind == "goal" and loop:
            last[loop] = bool(span.attributes.get("pyagent.check.passed"))
    return tuple(loop for loop, passed in last.items() if not passed)


def _goal_verdict(spans: Iterable[SpanRecord]) -> str:
    goals = [s for s in spans if s.kind == "goal" and s.name == "check_goal"]
    if not goals:
        return "the run ended before its goal was checked"
    return "goal met" if goals[-1].attributes.get("pyagent.goal.met") else "goal not met"
