"""`OTLPExport`: sends PyAgent's spans and GenAI metrics to an OpenTelemetry collector or backend.

Subscribed to an `EventBus` (`bus.subscribe(export.record)`), it turns every closing event (`end`,
`error`, `interrupted`) into one OTLP span and updates the metrics; `start` events are ignored,
since a closing event carries all of its span's attributes and `duration_s`. Both signals go over
OTLP/HTTP in protobuf, to `{endpoint}/v1/traces` and `{endpoint}/v1/metrics`, which is what
Jaeger, Grafana Tempo, Arize Phoenix and Langfuse receive (as does any OpenTelemetry Collector).

Ids are deterministic, so a run exported twice (or from two processes) lands in the same trace:

- trace id: the first 16 bytes of SHA-256 of the run id (one trace per run);
- span id: the runtime's 16-hex-digit span id as is; any other id string is hashed to 64 bits
  (the first 8 bytes of its SHA-256), and the parent id is mapped the same way, so links hold.

Spans: name as published (already GenAI style: `invoke_agent coder`, `chat gemma-3-270m`,
`execute_tool read_file`); start time = end time - `duration_s`; kind CLIENT for `llm_call`,
INTERNAL otherwise; status ERROR with `exception.message` as its description for `error` and
`interrupted` spans (plus an `exception` span event), UNSET for spans that ended well, as the
OpenTelemetry conventions ask of instrumentation. Attributes are those of the closing event after
`redact`, made OpenTelemetry-legal (str, bool, int, float and homogeneous lists of them; dicts,
mixed lists and integers beyond 64 bits become JSON or text; None is dropped), plus
`pyagent.run_id`, `pyagent.span.kind` and, where missing, `gen_ai.operation.name` (`chat`,
`execute_tool`, `invoke_agent`). The resource carries `service.name` and `service.version`.

Metrics, after the OpenTelemetry GenAI semantic conventions (with their advised buckets):

- `gen_ai.client.token.usage` (histogram, `{token}`), per successful LLM call, once with
  `gen_ai.token.type=input` and once with `output`, plus `gen_ai.operation.name`,
  `gen_ai.request.model` and `gen_ai.response.model` where known;
- `gen_ai.client.operation.duration` (histogram, `s`), per LLM call, with `error.type` on failure;
- `gen_ai.client.operation.time_to_first_chunk` (histogram, `s`), when a call reports
  `pyagent.time_to_first_token_s`;
- `pyagent.tool.calls` (counter, `{call}`) by `gen_ai.tool.name` and `pyagent.status`
  (`ok`, `error`, `interrupted`), with `error.type` on failure;
- `pyagent.usage.cached_tokens` (counter, `{token}`), per successful LLM call;
- one observable gauge per name that the optional `gauges()` callable returns.

Exporting never slows or breaks the runtime: `record` only converts and enqueues (a background
thread batches spans; metrics are read every `metrics_interval_s`), failures are logged rather than
raised, each HTTP export gives up after `timeout_s`, and `flush` and `close` return within the time
they are given even when the endpoint is unreachable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from pyagent import __version__
from pyagent.observe.events import Event

log = logging.getLogger(__name__)

Redactor = Callable[[dict[str, Any]], dict[str, Any]]
Gauges = Callable[[], Mapping[str, float]]

SCOPE = "pyagent"
OPERATIONS = {"llm_call": "chat", "tool_call": "execute_tool", "agent": "invoke_agent"}
STATUS = {"end": "ok", "error": "error", "interrupted": "interrupted"}
# Bucket boundaries the GenAI semantic conventions advise for these two histograms.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                   40.96, 81.92)
GAUGE_READING_TTL_S = 0.25  # the gauges' callbacks of one collection share one call of gauges()
INSTRUMENT_NAME = re.compile(r"[A-Za-z][-_./A-Za-z0-9]{0,254}")
HEX_SPAN_ID = re.compile(r"[0-9a-fA-F]{16}")
INT64 = (-(2**63), 2**63 - 1)


def trace_id_for(run_id: str) -> int:
    """The 128-bit trace id of a run: the first 16 bytes of SHA-256 of its id (never zero)."""
    digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:16], "big") or 1


def span_id_for(span_id: str) -> int:
    """The 64-bit span id of a runtime span id: its value when it is 16 hex digits and not zero,
    else the first 8 bytes of SHA-256 of the string (never zero)."""
    if HEX_SPAN_ID.fullmatch(span_id) and int(span_id, 16):
        return int(span_id, 16)
    digest = hashlib.sha256(span_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") or 1


def otel_value(value: Any) -> Any:
    """`value` as an OpenTelemetry attribute value, or None when it should be dropped.

    str, bool, float and 64-bit ints pass; lists and tuples of one of those types pass as tuples;
    bytes become text (undecodable bytes replaced); dicts, mixed lists and anything else that JSON
    can write become JSON; other objects and integers too large for 64 bits become `str(value)`.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        items = tuple(value)
        if _homogeneous(items):
            return items
        return _json(items)
    if isinstance(value, dict):
        return _json(value)
    if _scalar(value):
        return value
    return str(value)


def otel_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Every attribute as `otel_value` writes it; None values are dropped, and a value that cannot
    be converted is dropped with a warning."""
    converted: dict[str, Any] = {}
    for key, value in attributes.items():
        try:
            legal = otel_value(value)
        except Exception as exc:  # a value whose str() or JSON fails
            log.warning("OTLP export: dropped attribute %r (%s: %s)", key, type(exc).__name__, exc)
            continue
        if legal is not None:
            converted[str(key)] = legal
    return converted


def _scalar(value: Any) -> bool:
    if isinstance(value, bool | str | float):
        return True
    return isinstance(value, int) and INT64[0] <= value <= INT64[1]


def _homogeneous(items: tuple[Any, ...]) -> bool:
    kinds = {type(item) for item in items}
    return len(kinds) <= 1 and all(_scalar(item) for item in items) and (
        not kinds or kinds <= {bool, str, int, float})


def _json(value: Any) -> str:
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError):  # keys JSON cannot write, or a value that contains itself
        return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def _number(value: Any) -> float | None:
    """`value` when it is a finite, non-negative int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _within(timeout_s: float, *tasks: Callable[[], object]) -> tuple[bool, bool]:
    """Run `tasks` concurrently in daemon threads; whether all of them finished within
    `timeout_s`, and whether all of those returned something other than False without raising
    (failures are logged). Threads still running are left to finish on their own."""
    failures: list[object] = []

    def run(task: Callable[[], object]) -> None:
        try:
            if task() is False:
                failures.append(task)
        except Exception:
            log.exception("OTLP export: %s failed", getattr(task, "__qualname__", task))
            failures.append(task)

    threads = [threading.Thread(target=run, args=(task,), name="pyagent-otlp", daemon=True)
               for task in tasks]
    deadline = time.monotonic() + max(timeout_s, 0.0)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    finished = not any(thread.is_alive() for thread in threads)
    return finished, finished and not failures


class OTLPExport:
    """Exports the runtime's spans and GenAI metrics over OTLP/HTTP; see the module docstring.

    `endpoint` is the base URL of the receiver (`http://127.0.0.1:4318`); `headers` go with every
    request (an API key, say). `redact` gets each closing event's attributes and returns the copy
    to export (span names, run ids and span ids do not pass through it); when it raises, the
    event is not exported. `gauges` returns live values exported as
    observable gauges (`{"pyagent.kv.bytes": 1.5e9}`), read every `metrics_interval_s`; a name that
    appears after the first call is exported from the next `record` or `flush` on. `timeout_s`
    bounds each HTTP export, retries included.
    """

    def __init__(self, endpoint: str, *, headers: Mapping[str, str] | None = None,
                 service_name: str = "pyagent", redact: Redactor | None = None,
                 metrics_interval_s: float = 5.0, gauges: Gauges | None = None,
                 timeout_s: float = 5.0):
        if metrics_interval_s <= 0 or timeout_s <= 0:
            raise ValueError("metrics_interval_s and timeout_s must be positive")
        base = endpoint.rstrip("/")
        self.endpoint = base
        self.redact = redact
        self._lock = threading.Lock()
        self._closed = False
        self.resource = Resource.create({"service.name": service_name,
                                         "service.version": __version__})
        self._scope = InstrumentationScope(SCOPE, __version__)
        self._span_exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces",
                                               headers=dict(headers or {}), timeout=timeout_s)
        self._spans = BatchSpanProcessor(self._span_exporter)
        self._metric_exporter = OTLPMetricExporter(endpoint=f"{base}/v1/metrics",
                                                   headers=dict(headers or {}), timeout=timeout_s)
        self._reader = PeriodicExportingMetricReader(
            self._metric_exporter, export_interval_millis=metrics_interval_s * 1000,
            export_timeout_millis=timeout_s * 1000)
        self._meters = MeterProvider(resource=self.resource, metric_readers=[self._reader])
        self._meter = self._meters.get_meter(SCOPE, __version__)
        self._token_usage = self._meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._duration = self._meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self._first_chunk = self._meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self._tool_calls = self._meter.create_counter(
            "pyagent.tool.calls", unit="{call}", description="Tool calls, by tool and status.")
        self._cached_tokens = self._meter.create_counter(
            "pyagent.usage.cached_tokens", unit="{token}",
            description="Input tokens served from the prompt cache.")
        self._gauges = gauges
        self._gauge_names: set[str] = set()
        self._new_gauges: set[str] = set()
        self._reading: dict[str, float] = {}
        self._read_at = -math.inf
        if gauges is not None:
            self._read_gauges()
            self._register_gauges()

    # -- spans -----------------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Export one event: closing events become a span and metrics; `start` is ignored. Never
        raises; a failure is logged."""
        if event.phase == "start" or self._closed:
            return
        try:
            if self._new_gauges:
                self._register_gauges()
            attributes = self._redacted(event)
            if attributes is None:
                return
            self._spans.on_end(self._span(event, attributes))
            self._measure(event, attributes)
        except Exception:
            log.exception("OTLP export: could not export the %s event of %r", event.phase,
                          event.name)

    def _redacted(self, event: Event) -> dict[str, Any] | None:
        if self.redact is None:
            return otel_attributes(event.attributes)
        try:
            redacted = self.redact(dict(event.attributes))
        except Exception:
            log.exception("OTLP export: redact failed; %r is not exported", event.name)
            return None
        return otel_attributes(redacted)

    def _span(self, event: Event, attributes: dict[str, Any]) -> ReadableSpan:
        trace_id = trace_id_for(event.run_id)
        sampled = TraceFlags(TraceFlags.SAMPLED)  # BatchSpanProcessor drops unsampled spans
        context = SpanContext(trace_id, span_id_for(event.span_id), is_remote=False,
                              trace_flags=sampled)
        parent = (None if event.parent_id is None else
                  SpanContext(trace_id, span_id_for(event.parent_id), is_remote=False,
                              trace_flags=sampled))
        end = round(event.timestamp * 1e9)
        duration = _number(event.attributes.get("duration_s"))
        start = end - round(duration * 1e9) if duration is not None else end
        attributes = dict(attributes)
        operation = OPERATIONS.get(event.kind)
        if operation is not None:
            attributes.setdefault("gen_ai.operation.name", operation)
        attributes["pyagent.run_id"] = event.run_id
        attributes["pyagent.span.kind"] = event.kind
        status = Status(StatusCode.UNSET)
        events: tuple[SpanEvent, ...] = ()
        if event.phase != "end":
            message = str(attributes.get("exception.message", event.phase))
            status = Status(StatusCode.ERROR, message)
            events = (SpanEvent("exception", {
                "exception.type": str(attributes.get("error.type", event.phase)),
                "exception.message": message}, timestamp=end),)
        return ReadableSpan(
            name=event.name, context=context, parent=parent, resource=self.resource,
            attributes=attributes, events=events,
            kind=SpanKind.CLIENT if event.kind == "llm_call" else SpanKind.INTERNAL,
            status=status, start_time=start, end_time=end, instrumentation_scope=self._scope)

    # -- metrics ---------------------------------------------------------------------------------

    def _measure(self, event: Event, attributes: dict[str, Any]) -> None:
        ok = event.phase == "end"
        if event.kind == "llm_call":
            self._llm_call(attributes, ok)
        elif event.kind == "tool_call":
            tool = attributes.get("gen_ai.tool.name") or event.name.removeprefix("execute_tool ")
            series = {"gen_ai.tool.name": str(tool), "pyagent.status": STATUS[event.phase]}
            if not ok:
                series["error.type"] = str(attributes.get("error.type", "unknown"))
            self._tool_calls.add(1, series)

    def _llm_call(self, attributes: dict[str, Any], ok: bool) -> None:
        series = {"gen_ai.operation.name": str(attributes.get("gen_ai.operation.name", "chat"))}
        for key in ("gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model"):
            if attributes.get(key) not in (None, ""):
                series[key] = str(attributes[key])
        duration = _number(attributes.get("duration_s"))
        if not ok:
            if duration is not None:
                self._duration.record(duration, {
                    **series, "error.type": str(attributes.get("error.type", "unknown"))})
            return
        if duration is not None:
            self._duration.record(duration, series)
        for token_type, key in (("input", "gen_ai.usage.input_tokens"),
                                ("output", "gen_ai.usage.output_tokens")):
            tokens = _number(attributes.get(key))
            if tokens is not None:
                self._token_usage.record(tokens, {**series, "gen_ai.token.type": token_type})
        cached = _number(attributes.get("pyagent.usage.cached_tokens"))
        if cached:
            self._cached_tokens.add(cached, series)
        first_chunk = _number(attributes.get("pyagent.time_to_first_token_s"))
        if first_chunk is not None:
            self._first_chunk.record(first_chunk, series)

    def _read_gauges(self) -> dict[str, float]:
        """The latest reading of `gauges()`, shared by the callbacks of one collection."""
        with self._lock:
            if time.monotonic() - self._read_at < GAUGE_READING_TTL_S:
                return self._reading
            self._read_at = time.monotonic()
            try:
                raw = dict(self._gauges()) if self._gauges is not None else {}
            except Exception:
                log.exception("OTLP export: gauges() failed")
                raw = {}
            reading: dict[str, float] = {}
            for name, value in raw.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    reading[str(name)] = float(value)
            self._reading = reading
            self._new_gauges |= reading.keys() - self._gauge_names
            return reading

    def _register_gauges(self) -> None:
        """Create an observable gauge per name seen in `gauges()` but not yet registered; never
        from inside a collection, whose lock the SDK holds while calling the callbacks."""
        with self._lock:
            names, self._new_gauges = self._new_gauges - self._gauge_names, set()
            self._gauge_names |= names
        for name in sorted(names):
            if not INSTRUMENT_NAME.fullmatch(name):
                log.warning("OTLP export: %r is not a valid instrument name; not exported", name)
                continue
            self._meter.create_observable_gauge(name, callbacks=[self._observer(name)])

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            value = self._read_gauges().get(name)
            return [] if value is None else [Observation(value)]
        return observe

    # -- lifecycle -------------------------------------------------------------------------------

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send every span recorded so far and the current metrics; whether both finished within
        `timeout_s`. An export the endpoint refused counts as finished: the SDK logs it and does
        not report it. Never raises."""
        if self._closed:
            return False
        if self._new_gauges:
            self._register_gauges()
        return _within(timeout_s, self._spans.force_flush,
                       lambda: self._meters.force_flush(timeout_millis=timeout_s * 1000))[1]

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is pending and stop; returns within about `timeout_s` even when the endpoint
        does not answer (then what is left is dropped). Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        finished, _ = _within(timeout_s, self._spans.shutdown,
                              lambda: self._meters.shutdown(timeout_millis=timeout_s * 1000))
        if finished:
            return
        log.warning("OTLP export: %s did not answer within %.3g s; dropping what is left",
                    self.endpoint, timeout_s)
        for exporter in (self._span_exporter, self._metric_exporter):  # ends their retry waits
            try:
                exporter.shutdown()
            except Exception:
                log.exception("OTLP export: could not stop %r", exporter)

    def __enter__(self) -> OTLPExport:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
