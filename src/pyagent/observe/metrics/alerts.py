"""Alert rules in the Prometheus style, evaluated against a `MetricSource`.

```yaml
groups:
  - name: llm
    interval_s: 30                      # optional: evaluate this group at most every 30 s
    rules:
      - alert: LLMErrorRate
        expr: rate(pyagent_llm_calls_total{status="error"}[5m])
              / rate(pyagent_llm_calls_total[5m]) > 0.05
        for: 5m                         # must hold that long, at every evaluation, to fire
        keep_firing_for: 10m            # optional: keep firing that long after it stops holding
        labels: {severity: critical}    # critical, warning or info
        annotations:
          summary: "{{ $value }} of LLM calls fail"
```
Expression grammar (whitespace is free between tokens):
```
expr     := measure op number
measure  := query ( "/" query )?          a ratio is no data when the denominator is 0
query    := stat "(" metric selector? window? ")"
selector := "{" ( label "=" string ( "," label "=" string )* ","? )? "}"
window   := "[" duration "]"                longer than 0
op       := ">" | ">=" | "<" | "<=" | "==" | "!="
duration := ( integer ( "ms" | "s" | "m" | "h" | "d" | "w" ) )+      e.g. 30s, 5m, 1h30m
```
`stat` is any stat of `source.py`; strings are quoted with `"` or `'`. Annotations may use
`{{ $value }}` and `{{ $labels.<name> }}`; an alert's labels are `alertname`, the selector labels
of its (first) query and the rule's labels.

Each rule is one alert that moves inactive -> pending -> firing -> resolved -> inactive. No data
(None from the source) makes the condition false; a pending alert whose condition fails goes back
to inactive, a resolved one is kept `resolved_retention_s` before going inactive.
"""

from __future__ import annotations

import operator
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator
from pydantic_core import PydanticCustomError

from pyagent.errors import ConfigError
from pyagent.observe.metrics.source import STATS, MetricSource, is_stat
from pyagent.yamlfile import Lines, config_error, load_yaml, validate

INACTIVE, PENDING, FIRING, RESOLVED = "inactive", "pending", "firing", "resolved"
SEVERITIES = ("critical", "warning", "info")
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]*$"
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt}

_PART = re.compile(rf"(\d+)({'|'.join(sorted(UNITS, key=len, reverse=True))})")
_DURATION = re.compile(f"(?:{_PART.pattern})+")
_STAT = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")
_METRIC = re.compile(r"[A-Za-z_:][A-Za-z0-9_:.]*")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRING = re.compile(r""""((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'""")
_WINDOW = re.compile(r"[A-Za-z0-9.+-]+")
_OP = re.compile("|".join(re.escape(op) for op in OPS))
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_LABEL_REF = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


class ParseError(ConfigError):
    """An expression or a duration that does not parse."""


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration: '30s', '5m', '1h30m', '250ms', '1d', '2w'."""
    if not _DURATION.fullmatch(text.strip()):
        raise ParseError(f"bad duration {text!r}: use whole numbers with units "
                         "(ms, s, m, h, d, w), e.g. 30s, 5m, 1h30m")
    return float(sum(int(n) * UNITS[unit] for n, unit in _PART.findall(text)))


@dataclass(frozen=True)
class Query:
    """One `MetricSource` query."""

    metric: str
    stat: str
    labels: Mapping[str, str] = field(default_factory=dict)
    window_s: float | None = None

    def run(self, source: MetricSource) -> float | None:
        return source.query(self.metric, self.stat, dict(self.labels) or None, self.window_s)


@dataclass(frozen=True)
class Measure:
    """A query, or the ratio of two (no data when either is missing or the denominator is 0)."""

    numerator: Query
    denominator: Query | None = None

    def run(self, source: MetricSource) -> float | None:
        top = self.numerator.run(source)
        if self.denominator is None or top is None:
            return top
        bottom = self.denominator.run(source)
        return top / bottom if bottom else None


@dataclass(frozen=True)
class Expr:
    """`measure op threshold`, as written in `text`."""

    text: str
    measure: Measure
    op: str
    threshold: float

    def holds(self, value: float | None) -> bool:
        """Whether the condition holds for `value`; no data never does."""
        return value is not None and OPS[self.op](value, self.threshold)


class _Scanner:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def take(self, pattern: re.Pattern[str] | str) -> re.Match[str] | None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        if isinstance(pattern, str):
            pattern = re.compile(re.escape(pattern))
        match = pattern.match(self.text, self.pos)
        if match:
            self.pos = match.end()
        return match

    def expect(self, pattern: re.Pattern[str] | str, what: str) -> re.Match[str]:
        match = self.take(pattern)
        if match is None:
            raise self.error(f"expected {what}")
        return match

    def error(self, message: str, at: int | None = None) -> ParseError:
        at = self.pos if at is None else at
        near = repr(self.text[at:at + 12]) if at < len(self.text) else "the end"
        return ParseError(f"bad expression {self.text!r}, column {at + 1} (near {near}): "
                          f"{message}")

    def query(self) -> Query:
        start = self.pos
        stat = self.expect(_STAT, "a stat such as rate or p95").group()
        if not is_stat(stat):
            raise self.error(f"unknown stat {stat!r}; use {', '.join(STATS)} or pNN / pNN.N",
                             start)
        self.expect("(", f"'(' after {stat}")
        metric = self.expect(_METRIC, "a metric name").group()
        labels: dict[str, str] = {}
        if self.take("{"):
            while not self.take("}"):
                name = self.expect(_LABEL, "a label name or '}'").group()
                self.expect("=", f"'=' after label {name}")
                string = self.expect(_STRING, "a quoted label value")
                labels[name] = re.sub(r"\\(.)", r"\1", string.group(1) or string.group(2) or "")
                if not self.take(","):
                    self.expect("}", "',' or '}'")
                    break
        window = None
        if self.take("["):
            start = self.pos
            text = self.expect(_WINDOW, "a window such as 5m").group()
            try:
                window = parse_duration(text)
            except ParseError as exc:
                raise self.error(str(exc), start) from None
            if not window:
                raise self.error("a window must be longer than 0", start)
            self.expect("]", "']' after the window")
        self.expect(")", "')'")
        return Query(metric, stat, labels, window)

    def measure(self) -> Measure:
        numerator = self.query()
        return Measure(numerator, self.query() if self.take("/") else None)

    def end(self) -> None:
        if self.take(re.compile(r"\S")):
            raise self.error("unexpected text", self.pos - 1)


def parse_measure(text: str) -> Measure:
    """`stat(metric{...}[window])`, optionally divided by a second query."""
    scanner = _Scanner(text)
    measure = scanner.measure()
    scanner.end()
    return measure


def parse_expr(text: str) -> Expr:
    """Parse an alert expression (see the module docstring for the grammar)."""
    scanner = _Scanner(text)
    measure = scanner.measure()
    op = scanner.expect(_OP, "a comparison (> >= < <= == !=)").group()
    threshold = float(scanner.expect(_NUMBER, f"a number after {op!r}").group())
    scanner.end()
    return Expr(text, measure, op, threshold)


def parsed(parse: Callable[[str], Any], what: str, kind: type | None = None) -> PlainValidator:
    """A pydantic validator that parses strings with `parse` (and takes a `kind` as it is)."""
    def check(value: Any) -> Any:
        if kind is not None and isinstance(value, kind):
            return value
        if not isinstance(value, str):
            raise PydanticCustomError("parse", f"expected {what} as a string, got {value!r}")
        try:
            return parse(value)
        except ParseError as exc:
            raise PydanticCustomError("parse", str(exc)) from None
    return PlainValidator(check)


Duration = Annotated[float, parsed(parse_duration, "a duration such as 5m")]


class RuleSpec(BaseModel):
    """One rule as written in a rules file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True,
                              arbitrary_types_allowed=True)

    alert: str = Field(pattern=NAME_PATTERN)
    expr: Annotated[Expr, parsed(parse_expr, "an expression", Expr)]
    for_: Duration = Field(0.0, alias="for")
    keep_firing_for: Duration = 0.0
    labels: dict[str, str]
    annotations: dict[str, str] = {}

    @field_validator("labels")
    @classmethod
    def _severity(cls, labels: dict[str, str]) -> dict[str, str]:
        if labels.get("severity") not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        return labels


class GroupSpec(BaseModel):
    """One group as written in a rules file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    interval_s: float | None = Field(None, gt=0)
    rules: list[RuleSpec] = Field(min_length=1)


class RulesFile(BaseModel):
    """A rules file."""

    model_config = ConfigDict(extra="forbid")

    groups: list[GroupSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Rule:
    """One alerting rule; `labels` include `severity`."""

    name: str
    expr: Expr
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0

    def alert_labels(self) -> dict[str, str]:
        """The labels of this rule's alert: alertname, selector labels, then rule labels."""
        return {"alertname": self.name, **self.expr.measure.numerator.labels, **self.labels}


@dataclass(frozen=True)
class RuleGroup:
    """Rules evaluated together, at most every `interval_s` seconds (every call when None)."""

    name: str
    rules: tuple[Rule, ...]
    interval_s: float | None = None


def load_rules(path: Path) -> list[RuleGroup]:
    """Read and check a rules file; every error names the file and line."""
    path = Path(path)
    data, lines = load_yaml(path)
    spec = validate(RulesFile, data, lines, path)
    groups = []
    for g, group in enumerate(spec.groups):
        if group.name in (other.name for other in spec.groups[:g]):
            raise config_error(path, lines, ("groups", g, "name"),
                               f"group name {group.name!r} is used twice")
        rules = tuple(_rule(rule, ("groups", g, "rules", r), lines, path)
                      for r, rule in enumerate(group.rules))
        for r, rule in enumerate(rules):
            if rule.name in (other.name for other in rules[:r]):
                raise config_error(path, lines, ("groups", g, "rules", r, "alert"),
                                   f"alert {rule.name!r} is defined twice in group "
                                   f"{group.name!r}")
        groups.append(RuleGroup(group.name, rules, group.interval_s))
    return groups


def _rule(spec: RuleSpec, where: tuple[Any, ...], lines: Lines, path: Path) -> Rule:
    rule = Rule(spec.alert, spec.expr, spec.labels, spec.annotations, spec.for_,
                spec.keep_firing_for)
    known = rule.alert_labels()
    for key, template in spec.annotations.items():
        for name in _PLACEHOLDER.findall(template):
            ref = _LABEL_REF.fullmatch(name)
            if name != "$value" and not (ref and ref.group(1) in known):
                raise config_error(path, lines, (*where, "annotations", key),
                                   f"annotations.{key}: unknown placeholder {{{{ {name} }}}}; "
                                   f"use $value or $labels.<{'|'.join(known)}>")
    return rule


def render(template: str, value: float | None, labels: Mapping[str, str]) -> str:
    """Substitute `{{ $value }}` and `{{ $labels.x }}` in an annotation."""
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "$value":
            return "no data" if value is None else f"{value:.6g}"
        ref = _LABEL_REF.fullmatch(name)
        return labels.get(ref.group(1), "") if ref else match.group()
    return _PLACEHOLDER.sub(substitute, template)


@dataclass
class Alert:
    """A rule's alert: its state and what it last measured."""

    group: str
    rule: Rule
    state: str = INACTIVE
    value: float | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    active_since: float | None = None
    keep_firing_since: float | None = None
    resolved_at: float | None = None
    last_evaluated: float | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def severity(self) -> str | None:
        return self.rule.labels.get("severity")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view; `no_data` says the last evaluation found no data."""
        return {"group": self.group, "alert": self.name, "state": self.state,
                "expr": self.rule.expr.text, "value": self.value,
                "no_data": self.last_evaluated is not None and self.value is None,
                "labels": self.rule.alert_labels(), "annotations": dict(self.annotations),
                "active_since": self.active_since, "keep_firing_since": self.keep_firing_since,
                "resolved_at": self.resolved_at, "last_evaluated": self.last_evaluated}


@dataclass(frozen=True)
class Transition:
    """An alert moving from `previous` to `state` at time `at`."""

    at: float
    group: str
    alert: str
    previous: str
    state: str
    value: float | None
    labels: dict[str, str]
    annotations: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AlertEngine:
    """Evaluates rule groups against a source and keeps every alert's state and a bounded
    history of transitions."""

    def __init__(self, rules: Iterable[RuleGroup], source: MetricSource, *,
                 history: int = 1000, resolved_retention_s: float = 900.0):
        self.groups = list(rules)
        self.source = source
        self.resolved_retention_s = resolved_retention_s
        self._alerts = [[Alert(g.name, rule) for rule in g.rules] for g in self.groups]
        self._last: list[float | None] = [None] * len(self.groups)
        self._history: deque[Transition] = deque(maxlen=history)

    def evaluate(self, now: float) -> list[Transition]:
        """Evaluate every group that is due at `now` (seconds); return the transitions."""
        moved = []
        for i, group in enumerate(self.groups):
            last = self._last[i]
            if last is not None and group.interval_s and now - last < group.interval_s:
                continue
            self._last[i] = now
            for alert in self._alerts[i]:
                previous = alert.state
                self._step(alert, now)
                if alert.state != previous:
                    moved.append(Transition(now, alert.group, alert.name, previous, alert.state,
                                            alert.value, alert.rule.alert_labels(),
                                            dict(alert.annotations)))
                    self._history.append(moved[-1])
        return moved

    def _step(self, alert: Alert, now: float) -> None:
        rule = alert.rule
        alert.value = rule.expr.measure.run(self.source)
        alert.last_evaluated = now
        labels = rule.alert_labels()
        alert.annotations = {k: render(v, alert.value, labels)
                             for k, v in rule.annotations.items()}
        if rule.expr.holds(alert.value):
            alert.keep_firing_since = None
            if alert.state in (INACTIVE, RESOLVED):
                alert.state, alert.active_since, alert.resolved_at = PENDING, now, None
            if alert.state == PENDING and now - alert.active_since >= rule.for_s:
                alert.state = FIRING
        elif alert.state == PENDING:
            alert.state, alert.active_since = INACTIVE, None
        elif alert.state == FIRING:
            if alert.keep_firing_since is None:
                alert.keep_firing_since = now
            if now - alert.keep_firing_since >= rule.keep_firing_for_s:
                alert.state, alert.resolved_at, alert.keep_firing_since = RESOLVED, now, None
        elif alert.state == RESOLVED and now - alert.resolved_at >= self.resolved_retention_s:
            alert.state, alert.active_since, alert.resolved_at = INACTIVE, None, None

    def alerts(self) -> list[Alert]:
        return [alert for group in self._alerts for alert in group]

    def firing(self) -> list[Alert]:
        return [alert for alert in self.alerts() if alert.state == FIRING]

    def state(self) -> list[dict[str, Any]]:
        """Every alert, as JSON-able dicts."""
        return [alert.to_dict() for alert in self.alerts()]

    def history(self) -> list[dict[str, Any]]:
        """The latest transitions, oldest first."""
        return [transition.to_dict() for transition in self._history]
