"""Wiring for `pyagent observe` and `pyagent serve --data`: an observer over a data folder with
its prices, health objectives, alert rules, redaction and OTLP export."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyagent.bench.prices import ModelPrice, PriceTable
from pyagent.bench.tokens import span_usage
from pyagent.errors import PyAgentError
from pyagent.observe.live import Gauges, Listener, Observer
from pyagent.observe.metrics.alerts import load_rules
from pyagent.observe.metrics.health import load_objectives
from pyagent.observe.redact import Redactor
from pyagent.observe.topology import Pricer
from pyagent.observe.traces import TraceReader

DEFAULTS = Path(__file__).resolve().parent / "observe" / "defaults"


def pricer(prices: PriceTable) -> Pricer:
    """The cost in USD of one LLM call span at `prices` (None when unknown); each model's price
    is looked up once."""
    known: dict[str, ModelPrice | None] = {}

    def price(model: str, attributes: dict[str, Any]) -> float | None:
        try:
            usage = span_usage(attributes, "")
        except PyAgentError:
            return None
        if usage is None:
            return None
        if model not in known:
            known[model] = prices.price(model)
        found = known[model]
        return None if found is None else float(found.cost(usage).total)

    return price


@contextmanager
def observing(data: Path, *, prices: Path | None = None, objectives: Path | None = None,
              alerts: Path | None = None, redact: list[str] | None = None,
              default_redactions: bool = True, otlp_endpoint: str | None = None,
              otlp_headers: dict[str, str] | None = None, gauges: Gauges | None = None
              ) -> Iterator[Observer]:
    """A started observer of `data`; stopped (and OTLP flushed) on exit.

    OTLP export sends what runs store from now on, not the folder's history."""
    default_prices = data / "prices.yaml"
    table = PriceTable(prices or (default_prices if default_prices.is_file() else None))
    redactor = Redactor(redact or (), defaults=default_redactions)
    observer = Observer(
        data, redactor=redactor, pricer=pricer(table),
        objectives=load_objectives(objectives or DEFAULTS / "objectives.yaml"),
        rules=load_rules(alerts or DEFAULTS / "alerts.yaml"), gauges=gauges)
    export = None
    if otlp_endpoint is not None:
        from pyagent.observe.otlp import OTLPExport

        export = OTLPExport(otlp_endpoint, headers=otlp_headers, redact=redactor.attributes,
                            gauges=observer.gauge_totals)
        observer.listeners.append(_after(_last_id(data), export.record))
    observer.start()
    try:
        yield observer
    finally:
        observer.stop()
        if export is not None:
            export.close()


def _last_id(data: Path) -> int:
    """The newest event id stored in `data` now (0 when it has no store yet)."""
    try:
        with TraceReader(data / "traces.db") as reader:
            return reader.last_event_id()
    except PyAgentError:
        return 0


def _after(first: int, record: Callable[[Any], None]) -> Listener:
    def listener(event_id: int, event: Any) -> None:
        if event_id > first:
            record(event)

    return listener
