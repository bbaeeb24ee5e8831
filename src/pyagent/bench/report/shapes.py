"""The fields a report reads from the results it knows by kind, checked before it reads them: a
near miss (a field missing, a wrong type) is one error naming the file and the field."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pyagent.errors import ConfigError

T = TypeVar("T")


class Shape(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)


class MemorySample(Shape):
    t: float
    rss: int
    kv: int | None = None


class MemoryPattern(Shape):
    kind: str
    reason: str


class MemoryLeak(Shape):
    leaking: bool
    reason: str


class MemoryGC(Shape):
    counts: list[int]
    summary: list[dict[str, float]]


class MemoryProfile(Shape):
    """MemoryReport.to_dict()."""

    interval_s: float
    duration_s: float
    samples: list[MemorySample]
    start_rss: int
    end_rss: int
    peak_rss: int
    pattern: MemoryPattern | None
    leak: MemoryLeak | None = None
    gc: MemoryGC | None = None


class TokenTotals(Shape):
    calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost: str | None
    unknown_calls: int


class TokenGroup(TokenTotals):
    name: str | None


class TokenAccounting(Shape):
    """TokenTracker.to_dict()."""

    records: list[dict[str, Any]]
    totals: TokenTotals
    by: dict[str, list[TokenGroup]]


class MetricSeries(Shape):
    labels: dict[str, str]


class MetricFamily(Shape):
    type: str
    series: list[MetricSeries]


class MetricsSnapshot(Shape):
    """MetricsRegistry.snapshot()."""

    metrics: dict[str, MetricFamily]
    relative_accuracy: float


class HealthReport(Shape):
    status: str
    score: float | None
    checks: dict[str, list[dict[str, Any]]]


class Alert(Shape):
    alert: str
    state: str


def checked(shape: type[Shape], what: str, name: str, data: Any) -> Any:
    """`data` if it has `shape`; else a ConfigError naming `name`, the field and the problem."""
    try:
        shape.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise ConfigError(f"{name}: not a valid {what}: field {field}: {error['msg']}") from None
    return data


def looks_like(data: Mapping[str, Any], shape: type[Shape]) -> bool:
    """Whether `data` holds most of `shape`'s required fields (a near miss is still this kind)."""
    required = [n for n, f in shape.model_fields.items() if f.is_required()]
    return sum(name in data for name in required) * 2 > len(required)


def guarded(shape: type[Shape], what: str, render: Callable[[str, Any], T]
            ) -> Callable[[str, Any], T]:
    """`render`, called only once the data has `shape`."""
    return lambda name, data: render(name, checked(shape, what, name, data))
