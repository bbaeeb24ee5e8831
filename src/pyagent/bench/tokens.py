"""Token and cost accounting of LLM calls, grouped by run, step, agent and model, with the savings
of prompt caching and batch pricing measured from the recorded calls.

Counts come only from reported usage: the engine's tokenizer or a provider's usage fields, cached
prompt tokens and cache writes included. A call whose model has no price keeps its tokens and
counts as an unknown cost, never a guessed one.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pyagent.bench.prices import (
    Cost,
    ModelPrice,
    PriceTable,
    UsageError,
    check_usage,
    decimal_text,
    to_decimal,
)
from pyagent.bench.stats import bootstrap_ci
from pyagent.errors import PyAgentError
from pyagent.observe.events import Event, EventBus
from pyagent.observe.traces import MAX_DEPTH, TraceStore
from pyagent.types import Usage

GROUP_KEYS = ("run", "step", "agent", "model", "provider")
MAX_OPEN_SPANS = 10_000  # spans `attach` remembers while they are open; the oldest go first
LABELS = {"step": "pyagent.step.id", "agent": "gen_ai.agent.name"}  # what names a step, an agent
USAGE_KEYS = ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
              "pyagent.usage.cached_tokens", "gen_ai.usage.cache_creation.input_tokens")


@dataclass(frozen=True)
class CallRecord:
    """One LLM call: its usage, where it ran, its price (None: unknown) and cost."""

    usage: Usage
    model: str
    provider: str | None = None
    run_id: str | None = None
    step: str | None = None
    agent: str | None = None
    batch: bool = False
    price: ModelPrice | None = None
    cost: Cost | None = None

    def group(self, key: str) -> str | None:
        return self.run_id if key == "run" else getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "provider": self.provider, "run_id": self.run_id,
                "step": self.step, "agent": self.agent, "batch": self.batch,
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "cached_tokens": self.usage.cached_tokens,
                "cache_write_tokens": self.usage.cache_write_tokens,
                "cost": None if self.cost is None else self.cost.to_dict()}


@dataclass(frozen=True)
class Totals:
    """Summed usage of some calls; `cost` covers the calls with a known price only, and is None
    when there are calls and none has a known price."""

    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal | None = Decimal(0)
    unknown_calls: int = 0  # calls whose cost is unknown
    cache_write_tokens: int = 0

    @classmethod
    def of(cls, records: Iterable[CallRecord]) -> Totals:
        records = list(records)
        priced = [r.cost.total for r in records if r.cost is not None]
        return cls(calls=len(records),
                   prompt_tokens=sum(r.usage.prompt_tokens for r in records),
                   cached_tokens=sum(r.usage.cached_tokens for r in records),
                   completion_tokens=sum(r.usage.completion_tokens for r in records),
                   cost=sum(priced, Decimal(0)) if priced or not records else None,
                   unknown_calls=len(records) - len(priced),
                   cache_write_tokens=sum(r.usage.cache_write_tokens for r in records))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "cache_write_tokens": self.cache_write_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "cost": decimal_text(self.cost), "unknown_calls": self.unknown_calls}


@dataclass(frozen=True)
class CachingReport:
    """Prompt caching as recorded: cached tokens, their share, cache writes, and the money saved
    against the same calls with no prompt cache, every prompt token at the input rate (over priced
    calls; None when no call has a price). Writes that are never read make `saved` negative."""

    prompt_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    cached_share: float | None  # None without prompt tokens
    cost: Decimal | None
    cost_without_cache: Decimal | None
    saved: Decimal | None
    unknown_calls: int

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.cache_write_tokens, "cached_share": self.cached_share,
                "cost": decimal_text(self.cost),
                "cost_without_cache": decimal_text(self.cost_without_cache),
                "saved": decimal_text(self.saved),
                "unknown_calls": self.unknown_calls}


@dataclass(frozen=True)
class BatchReport:
    """The recorded calls repriced at their providers' batch rates, where those are known.

    `cost` and `batch_cost` cover the same calls (`calls` of them); `no_batch_price_calls` have a
    price but no batch rates (batch_discount_unknown), `unknown_calls` no price at all.
    `throughput` is whatever measured engine throughput the caller passed, verbatim."""

    calls: int
    cost: Decimal
    batch_cost: Decimal
    no_batch_price_calls: int
    unknown_calls: int
    throughput: dict[str, Any] | None = None

    @property
    def saved(self) -> Decimal:
        return self.cost - self.batch_cost

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "cost": str(self.cost), "batch_cost": str(self.batch_cost),
                "saved": str(self.saved), "no_batch_price_calls": self.no_batch_price_calls,
                "unknown_calls": self.unknown_calls, "throughput": self.throughput}


@dataclass(frozen=True)
class Measurement:
    """A strategy's effect measured elsewhere (compression, pruning, ...), e.g. tokens before and
    after."""

    strategy: str
    baseline: int | float | Decimal
    optimized: int | float | Decimal
    unit: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def saving(self) -> Decimal | None:
        """The fraction saved, 1 - optimized / baseline; None for a zero baseline."""
        if not self.baseline:
            return None
        return 1 - to_decimal(self.optimized) / to_decimal(self.baseline)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "baseline": _json(self.baseline),
                "optimized": _json(self.optimized), "unit": self.unit,
                "saving": decimal_text(self.saving),
                "details": self.details}


class TokenTracker:
    """Records LLM calls with their cost and reports them by group and by saving strategy."""

    def __init__(self, prices: PriceTable | None = None):
        self.prices = prices if prices is not None else PriceTable()
        self._records: list[CallRecord] = []
        self._measurements: list[Measurement] = []
        self._open: OrderedDict[str, tuple[str | None, str, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def records(self) -> list[CallRecord]:
        with self._lock:
            return list(self._records)

    @property
    def measurements(self) -> list[Measurement]:
        with self._lock:
            return list(self._measurements)

    def record(self, usage: Usage, *, model: str, provider: str | None = None,
               run_id: str | None = None, step: str | None = None, agent: str | None = None,
               batch: bool = False, at: datetime | None = None) -> CallRecord:
        """Store one call's reported usage, priced at time `at` (default: now)."""
        check_usage(usage)
        price = self.prices.price(model, provider, at)
        record = CallRecord(usage, model, provider, run_id, step, agent, batch, price,
                            None if price is None else price.cost(usage, batch))
        with self._lock:
            self._records.append(record)
        return record

    @classmethod
    def from_traces(cls, trace_store: TraceStore, run_id: str,
                    model_provider: Mapping[str, str] | None = None, *,
                    prices: PriceTable | None = None, within: str | None = None) -> TokenTracker:
        """The calls of one stored run, from its `llm_call` spans that carry usage (only those
        under span `within`, when given).

        Each call belongs to the nearest agent above it (a sub-agent's calls to the sub-agent) and
        to the step it ran in; `model_provider` names the provider of each model (by its name in
        the spans), which spans do not record. Calls are priced at the time they ended."""
        tracker = cls(prices)
        for span in trace_store.spans(run_id):
            usage = span_usage(span.attributes, span.span_id) if span.kind == "llm_call" else None
            if usage is None:
                continue
            lineage = trace_store.lineage(span.span_id)[:-1]
            if within is not None and all(s.span_id != within for s in lineage):
                continue
            above = [(s.kind, _label(s.kind, s.attributes)) for s in reversed(lineage)]
            model = _model(span.name, span.attributes)
            at = datetime.fromtimestamp(span.end, UTC) if span.end is not None else None
            tracker.record(usage, model=model, provider=(model_provider or {}).get(model),
                           run_id=run_id, **_place(above), at=at)
        return tracker

    def attach(self, bus: EventBus,
               model_provider: Mapping[str, str] | None = None) -> Callable[[], None]:
        """Record every LLM call `bus` reports from now on; returns the function that stops it.

        Open run, step, agent and tool-call spans are remembered (at most MAX_OPEN_SPANS) to place
        each call under its step and agent."""
        return bus.subscribe(lambda event: self._on_event(event, model_provider or {}))

    def _on_event(self, event: Event, model_provider: Mapping[str, str]) -> None:
        if event.kind != "llm_call":
            with self._lock:
                if event.phase != "start":
                    self._open.pop(event.span_id, None)
                    return
                self._open[event.span_id] = (event.parent_id, event.kind,
                                             _label(event.kind, event.attributes))
                while len(self._open) > MAX_OPEN_SPANS:
                    self._open.popitem(last=False)
            return
        usage = span_usage(event.attributes, event.span_id) if event.phase == "end" else None
        if usage is None:
            return
        above: list[tuple[str, str | None]] = []
        with self._lock:
            parent = event.parent_id
            while parent in self._open and len(above) < MAX_DEPTH:
                parent, kind, label = self._open[parent]
                above.append((kind, label))
        model = _model(event.name, event.attributes)
        self.record(usage, model=model, provider=model_provider.get(model), run_id=event.run_id,
                    **_place(above), at=datetime.fromtimestamp(event.timestamp, UTC))

    def totals(self) -> Totals:
        """Usage and known cost over every recorded call."""
        return Totals.of(self.records)

    def by(self, key: str) -> dict[str | None, Totals]:
        """Totals grouped by `key`: one of run, step, agent, model, provider."""
        return _group(self.records, key)

    def caching_report(self) -> CachingReport:
        """What prompt caching saved: actual cost against every prompt token at the input rate."""
        return _caching(self.records)

    def batch_report(self, throughput: Mapping[str, Any] | None = None) -> BatchReport:
        """The calls at batch prices; `throughput`, measured engine throughput at batch sizes,
        goes into the report as given."""
        return _batching(self.records, throughput)

    def add_measurement(self, strategy: str, baseline: float | Decimal, optimized: float | Decimal,
                        unit: str, details: Mapping[str, Any] | None = None) -> Measurement:
        """Keep a strategy's measured effect (e.g. prompt tokens before and after compression)."""
        for name, value in (("baseline", baseline), ("optimized", optimized)):
            if isinstance(value, bool) or not isinstance(value, int | float | Decimal) \
                    or not math.isfinite(value) or value < 0:
                raise PyAgentError(f"{strategy}: {name} must be a finite number >= 0, "
                                   f"got {value!r}")
        measurement = Measurement(strategy, baseline, optimized, unit, dict(details or {}))
        with self._lock:
            self._measurements.append(measurement)
        return measurement

    def to_dict(self, throughput: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Everything as JSON data (money as decimal strings): records, totals, groups, strategy
        reports, and the prices used with their sources."""
        records = self.records
        return {
            "records": [r.to_dict() for r in records],
            "totals": Totals.of(records).to_dict(),
            "by": {key: [{"name": name, **totals.to_dict()}
                         for name, totals in _group(records, key).items()] for key in GROUP_KEYS},
            "strategies": {"caching": _caching(records).to_dict(),
                           "batching": _batching(records, throughput).to_dict(),
                           "measured": [m.to_dict() for m in self.measurements]},
            "prices": {"sources": self.prices.sources(),
                       "models": _unique(r.price.to_dict() for r in records if r.price),
                       "unknown": sorted({r.model for r in records if r.price is None})}}


def compound_saving(fractions: Iterable[float | Decimal]) -> Decimal:
    """The fraction saved by strategies applied one after another: 1 - prod(1 - s_i).

    Each s_i is a measured fraction saved on what the strategies before it left, so two savings
    of 50 % make 75 %, not 100 %; this holds when the savings are independent."""
    remaining = Decimal(1)
    for fraction in fractions:
        saving = to_decimal(fraction)
        if not saving.is_finite() or saving > 1:
            raise PyAgentError(f"a saving is a fraction <= 1, got {fraction!r}")
        remaining *= 1 - saving
    return 1 - remaining


@dataclass(frozen=True)
class Paired:
    """Candidate minus baseline over paired tasks: totals, the mean difference per task with its
    bootstrap confidence interval, and the ratio of totals (None for a zero baseline)."""

    baseline_total: int | Decimal
    candidate_total: int | Decimal
    mean_difference: Decimal
    ci_low: float
    ci_high: float
    ratio: Decimal | None

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_total": _json(self.baseline_total),
                "candidate_total": _json(self.candidate_total),
                "mean_difference": str(self.mean_difference), "ci_low": self.ci_low,
                "ci_high": self.ci_high, "ratio": decimal_text(self.ratio)}


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two runs of the same tasks; cost is None when any task has a call
    of unknown cost (those tasks are listed)."""

    tasks: tuple[str, ...]
    tokens: Paired
    cost: Paired | None
    cost_unknown_tasks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "tokens": self.tokens.to_dict(),
                "cost": None if self.cost is None else self.cost.to_dict(),
                "cost_unknown_tasks": list(self.cost_unknown_tasks)}


def compare_runs(baseline: Mapping[str, TokenTracker | Totals],
                 candidate: Mapping[str, TokenTracker | Totals], *, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> Comparison:
    """Compare total tokens and cost per task (paired by task id) of a candidate to a baseline."""
    unpaired = [f"missing from the {side}: {', '.join(sorted(ids))}" for side, ids in (
        ("candidate", set(baseline) - set(candidate)), ("baseline", set(candidate) - set(baseline)))
        if ids]
    if unpaired or not baseline:
        raise PyAgentError("compare_runs pairs the same tasks on both sides; "
                           + ("; ".join(unpaired) or "no tasks given"))
    tasks = tuple(sorted(baseline))
    base = [_totals(baseline[task]) for task in tasks]
    cand = [_totals(candidate[task]) for task in tasks]
    stats = {"confidence": confidence, "resamples": resamples, "seed": seed}
    tokens = _paired([t.total_tokens for t in base], [t.total_tokens for t in cand], **stats)
    unknown = tuple(task for task, b, c in zip(tasks, base, cand, strict=True)
                    if b.unknown_calls or c.unknown_calls)
    cost = None if unknown else _paired([t.cost for t in base], [t.cost for t in cand], **stats)
    return Comparison(tasks, tokens, cost, unknown)


def _paired(base: list[Any], cand: list[Any], **stats: Any) -> Paired:
    differences = [c - b for b, c in zip(base, cand, strict=True)]
    _, low, high = bootstrap_ci([float(d) for d in differences], **stats)
    base_total, cand_total = sum(base), sum(cand)
    return Paired(base_total, cand_total, Decimal(sum(differences)) / len(differences), low, high,
                  Decimal(cand_total) / Decimal(base_total) if base_total else None)


def _totals(run: TokenTracker | Totals) -> Totals:
    return run.totals() if isinstance(run, TokenTracker) else run


def span_usage(attributes: Mapping[str, Any], span_id: str) -> Usage | None:
    """The usage an LLM-call span reports; None when it reports none (a failed call)."""
    prompt, completion, cached, written = (attributes.get(key) for key in USAGE_KEYS)
    if prompt is None or completion is None:
        return None
    usage = Usage(prompt, completion, cached or 0, written or 0)
    try:
        check_usage(usage)
    except UsageError as exc:
        raise UsageError(f"LLM call span {span_id}: {exc}") from None
    return usage


def _model(name: str, attributes: Mapping[str, Any]) -> str:
    """The model a call used: its response or request model, else the span name's
    (`chat <model>`)."""
    return (attributes.get("gen_ai.response.model") or attributes.get("gen_ai.request.model")
            or name.partition(" ")[2] or name)


def _caching(records: list[CallRecord]) -> CachingReport:
    priced = [r for r in records if r.price is not None]
    cost = sum((r.cost.total for r in priced), Decimal(0))
    uncached = sum((r.price.cost(Usage(r.usage.prompt_tokens, r.usage.completion_tokens),
                                 r.batch).total for r in priced), Decimal(0))
    prompt = sum(r.usage.prompt_tokens for r in records)
    cached = sum(r.usage.cached_tokens for r in records)
    known = bool(priced) or not records
    return CachingReport(prompt, cached, sum(r.usage.cache_write_tokens for r in records),
                         cached / prompt if prompt else None,
                         cost if known else None, uncached if known else None,
                         uncached - cost if known else None, len(records) - len(priced))


def _batching(records: list[CallRecord], throughput: Mapping[str, Any] | None) -> BatchReport:
    batchable = [r for r in records if r.price is not None and r.price.batch is not None]
    return BatchReport(
        calls=len(batchable),
        cost=sum((r.cost.total for r in batchable), Decimal(0)),
        batch_cost=sum((r.price.cost(r.usage, batch=True).total for r in batchable),
                       Decimal(0)),
        no_batch_price_calls=sum(r.price is not None and r.price.batch is None
                                 for r in records),
        unknown_calls=sum(r.price is None for r in records),
        throughput=None if throughput is None else dict(throughput))


def _label(kind: str, attributes: Mapping[str, Any]) -> str | None:
    """The step id of a step span, the agent name of an agent span; None for other spans."""
    return attributes.get(LABELS[kind]) if kind in LABELS else None


def _place(above: Iterable[tuple[str, str | None]]) -> dict[str, str | None]:
    """The step and the nearest agent among the (kind, label) of spans above a call, nearest
    first."""
    place: dict[str, str | None] = {"step": None, "agent": None}
    for kind, label in above:
        if kind in place and place[kind] is None:
            place[kind] = label
    return place


def _group(records: list[CallRecord], key: str) -> dict[str | None, Totals]:
    if key not in GROUP_KEYS:
        raise PyAgentError(f"cannot group by {key!r}; choose one of {', '.join(GROUP_KEYS)}")
    groups: dict[str | None, list[CallRecord]] = {}
    for record in records:
        groups.setdefault(record.group(key), []).append(record)
    return {name: Totals.of(members) for name, members in groups.items()}


def _json(value: float | Decimal) -> float | str:
    return str(value) if isinstance(value, Decimal) else value


def _unique(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    unique: list[dict[str, Any]] = []
    for item in items:
        if item not in unique:
            unique.append(item)
    return unique
