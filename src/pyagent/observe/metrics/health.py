"""A 0-100 health score from declared objectives, reported in the IETF health-check draft style.

```yaml
objectives:
  - name: llm-latency-p95
    query: {metric: pyagent_llm_latency_seconds, stat: p95, window: 5m}
    target: 2.0                      # seconds
    direction: below
    weight: 2
  - name: llm-error-rate             # a query may also be written as in alert rules
    query: rate(pyagent_llm_calls_total{status="error"}[5m]) / rate(pyagent_llm_calls_total[5m])
    target: 0.01
    direction: below
  - name: tool-success-rate
    query: rate(pyagent_tool_calls_total{status="ok"}[10m]) / rate(pyagent_tool_calls_total[10m])
    target: 0.95
    direction: above
    tolerance: 0.05                  # the error budget: 0.90 scores 0
```
Formula. For an objective with measured value v, target T and tolerance t (default |T|), the miss
is v - T (`below`) or T - v (`above`), and its score is

    s = 1                          when miss <= 0 (the objective is met)
    s = max(0, 1 - miss / t)       otherwise

so the score falls linearly from 1 at the target to 0 at t past it: by default at twice the target
for `below` (p95 below 2 s: 3 s scores 0.5, 4 s or more scores 0) and at 0 for `above`. Linear
partial credit keeps a small miss from weighing like an outage; measuring the miss against the
target itself makes scores independent of units and needs no extra setting. For a ratio that
should stay near 1, the SLO reading is better: set t to the error budget 1 - T, so the score
reaches 0 when failures run at twice the budget. An objective without data has no score: it is
left out of the mean and reported as such.

    score = 100 * sum(w_i * s_i) / sum(w_i)    over the objectives with data
    status = pass (score >= 90), warn (>= 70), fail (below); warn when no objective has data

A firing alert caps the status: `critical` means fail, `warning` at most warn. Each check is pass
when met, fail when its score is 0, warn in between or without data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from pyagent.observe.metrics.alerts import (
    FIRING,
    NAME_PATTERN,
    Alert,
    Duration,
    Measure,
    Query,
    parse_measure,
    parsed,
)
from pyagent.observe.metrics.source import STATS, MetricSource, is_stat
from pyagent.yamlfile import config_error, load_yaml, validate

PASS, WARN, FAIL = "pass", "warn", "fail"
ORDER = (PASS, WARN, FAIL)
PASS_AT, WARN_AT = 90.0, 70.0
CAPS = {"critical": FAIL, "warning": WARN}
MAPPING, EXPRESSION = "query-mapping", "query-expression"  # union tags, left out of errors


class QuerySpec(BaseModel):
    """A query written as a mapping."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1)
    stat: str
    labels: dict[str, str] = {}
    window: Duration | None = None

    @field_validator("stat")
    @classmethod
    def _stat(cls, stat: str) -> str:
        if not is_stat(stat):
            raise ValueError(f"unknown stat {stat!r}; use {', '.join(STATS)} or pNN / pNN.N")
        return stat

    def measure(self) -> Measure:
        return Measure(Query(self.metric, self.stat, self.labels, self.window))


def _query_kind(value: Any) -> str:
    return MAPPING if isinstance(value, dict | QuerySpec) else EXPRESSION


class Objective(BaseModel):
    """A measured value that should stay below or above a target; `query` becomes a Measure."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=NAME_PATTERN)
    query: Annotated[
        Annotated[QuerySpec, AfterValidator(QuerySpec.measure), Tag(MAPPING)]
        | Annotated[Measure, parsed(parse_measure, "a query", Measure), Tag(EXPRESSION)],
        Discriminator(_query_kind)]
    target: float
    direction: Literal["below", "above"]
    weight: float = Field(1.0, gt=0)
    tolerance: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _tolerance(self) -> Objective:
        if self.tolerance is None and self.target == 0:
            raise ValueError("the target is 0: set a tolerance (how far past it scores 0)")
        return self

    def score(self, value: float | None) -> float | None:
        """This objective's score in [0, 1] for `value`; None without data."""
        if value is None:
            return None
        miss = value - self.target if self.direction == "below" else self.target - value
        if miss <= 0:
            return 1.0
        return max(0.0, 1.0 - miss / (self.tolerance or abs(self.target)))


class ObjectivesFile(BaseModel):
    """An objectives file."""

    model_config = ConfigDict(extra="forbid")

    objectives: list[Objective] = Field(min_length=1)


def load_objectives(path: Path) -> list[Objective]:
    """Read and check an objectives file; every error names the file and line."""
    path = Path(path)
    data, lines = load_yaml(path)
    objectives = validate(ObjectivesFile, data, lines, path, tags={MAPPING, EXPRESSION}).objectives
    for i, objective in enumerate(objectives):
        if objective.name in (other.name for other in objectives[:i]):
            raise config_error(path, lines, ("objectives", i, "name"),
                               f"objective {objective.name!r} is defined twice")
    return objectives


def status_of(score: float) -> str:
    """pass at 90 or more, warn at 70 or more, fail below."""
    return PASS if score >= PASS_AT else WARN if score >= WARN_AT else FAIL


@dataclass(frozen=True)
class Check:
    """One objective's measurement."""

    objective: Objective
    value: float | None
    score: float | None

    @property
    def status(self) -> str:
        return PASS if self.score == 1 else FAIL if self.score == 0 else WARN

    def to_dict(self) -> dict[str, Any]:
        o = self.objective
        out = {"status": self.status, "observedValue": self.value, "target": o.target,
               "direction": o.direction, "weight": o.weight, "score": self.score}
        if self.value is None:
            out["output"] = "no data"
        elif self.status != PASS:
            out["output"] = f"{self.value:.6g} is not {o.direction} the target {o.target:g}"
        return out


@dataclass(frozen=True)
class HealthReport:
    """The overall status and score (None when no objective has data), each check, and the
    firing alerts that lowered the status."""

    status: str
    score: float | None
    checks: tuple[Check, ...]
    capped_by: tuple[str, ...] = ()

    @property
    def unknown(self) -> list[str]:
        """The objectives without data."""
        return [c.objective.name for c in self.checks if c.score is None]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "score": self.score}
        notes = [f"firing alert {name}" for name in self.capped_by]
        if self.unknown:
            notes.append(f"no data for {', '.join(self.unknown)}")
        if notes:
            out["output"] = "; ".join(notes)
        out["checks"] = {c.objective.name: [c.to_dict()] for c in self.checks}
        return out


def evaluate_health(objectives: Iterable[Objective], source: MetricSource,
                    alerts: Iterable[Alert] = ()) -> HealthReport:
    """Measure every objective, score them and apply the caps of the firing `alerts`."""
    checks = []
    for objective in objectives:
        value = objective.query.run(source)
        checks.append(Check(objective, value, objective.score(value)))
    known = [c for c in checks if c.score is not None]
    weight = sum(c.objective.weight for c in known)
    score = 100 * sum(c.objective.weight * c.score for c in known) / weight if known else None
    status = WARN if score is None else status_of(score)
    caps = [(a.name, CAPS[a.severity]) for a in alerts
            if a.state == FIRING and a.severity in CAPS]
    capped_by = tuple(name for name, cap in caps if ORDER.index(cap) > ORDER.index(status))
    status = max([status, *(cap for _, cap in caps)], key=ORDER.index)
    return HealthReport(status, score, tuple(checks), capped_by)
