"""OTLP export against a real OTLP/HTTP receiver on loopback that decodes what it is sent."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

from pyagent.observe.events import Event, EventBus
from pyagent.observe.otlp import OTLPExport, otel_value, span_id_for, trace_id_for

SECRET = "sk-live-4f9a7c1e2b"
INPUT_TOKENS, OUTPUT_TOKENS, CACHED_TOKENS = 120, 30, 64


@dataclass
class Receiver:
    """What an OTLP/HTTP receiver was sent: raw (decompressed) bodies, decoded requests, and
    headers (names in lower case)."""

    url: str
    raw: list[bytes] = field(default_factory=list)
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spans(self) -> list[tuple[dict[str, Any], PbSpan]]:
        """Every received span with the attributes of its resource."""
        with self.lock:
            return [(attributes(resource.resource.attributes), span)
                    for request in self.traces for resource in request.resource_spans
                    for scope in resource.scope_spans for span in scope.spans]

    def metric(self, name: str) -> Metric:
        """The latest export of the metric `name` (metrics are cumulative, so it holds all)."""
        with self.lock:
            found = [metric for request in self.metrics for resource in request.resource_metrics
                     for scope in resource.scope_metrics for metric in scope.metrics
                     if metric.name == name]
        assert found, f"no {name} metric received"
        return found[-1]


def make_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            if self.path == "/v1/traces":
                request: Any = ExportTraceServiceRequest.FromString(body)
                answer = ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                request = ExportMetricsServiceRequest.FromString(body)
                answer = ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_error(404)
                return
            with receiver.lock:
                receiver.raw.append(body)
                receiver.headers.append({key.lower(): value
                                         for key, value in self.headers.items()})
                (receiver.traces if self.path == "/v1/traces" else receiver.metrics).append(
                    request)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(receiver))
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()
    thread.join(5)


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(item) for item in any_value.array_value.values]
    return None if kind is None else getattr(any_value, kind)


def attributes(pairs: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


def kinds(pairs: Any) -> dict[str, str | None]:
    """Which protobuf field holds each attribute: int_value, string_value, ..."""
    return {pair.key: pair.value.WhichOneof("value") for pair in pairs}


def fleet_run(bus: EventBus, run_id: str, arguments: str = '{"path": "notes.txt"}') -> dict[
        str, str]:
    """One run: a step, an agent that makes an LLM call and two tool calls, the second failing."""
    ids: dict[str, str] = {}
    with bus.span("run", "run demo.yaml", run_id) as run:
        ids["run"] = run.span_id
        with run.child("step", "step plan", **{"pyagent.step.id": "plan"}) as step:
            ids["step"] = step.span_id
            with step.child("agent", "invoke_agent coder",
                            **{"gen_ai.agent.name": "coder"}) as agent:
                ids["agent"] = agent.span_id
                with agent.child("llm_call", "chat gemma-3-270m",
                                 **{"gen_ai.request.model": "gemma-3-270m"}) as llm:
                    ids["llm"] = llm.span_id
                    time.sleep(0.01)
                    llm.update({"gen_ai.response.model": "gemma-3-270m-it",
                                "gen_ai.usage.input_tokens": INPUT_TOKENS,
                                "gen_ai.usage.output_tokens": OUTPUT_TOKENS,
                                "pyagent.usage.cached_tokens": CACHED_TOKENS,
                                "pyagent.time_to_first_token_s": 0.004,
                                "gen_ai.response.finish_reasons": ["tool_calls"]})
                with agent.child("tool_call", "execute_tool read_file",
                                 **{"gen_ai.tool.name": "read_file",
                                    "gen_ai.tool.call.arguments": arguments}) as tool:
                    ids["tool"] = tool.span_id
                    tool.set("pyagent.tool.output_chars", 42)
                with pytest.raises(FileNotFoundError), agent.child(
                        "tool_call", "execute_tool write_file",
                        **{"gen_ai.tool.name": "write_file"}) as failing:
                    ids["failing"] = failing.span_id
                    raise FileNotFoundError("no such directory: out/")
    return ids


def test_spans_keep_names_links_times_and_genai_attributes(receiver: Receiver) -> None:
    bus = EventBus()
    with OTLPExport(receiver.url, service_name="pyagent-test", metrics_interval_s=60) as export:
        bus.subscribe(export.record)
        first, second = fleet_run(bus, "run-1"), fleet_run(bus, "run-2")
        assert export.flush(10)
    received = receiver.spans()
    assert len(received) == 12  # start events are not exported: one span per span
    by_id = {span.span_id: (resource, span) for resource, span in received}
    assert all(resource["service.name"] == "pyagent-test" for resource, _ in received)

    for run_id, ids in (("run-1", first), ("run-2", second)):
        spans = {key: by_id[bytes.fromhex(span_id)][1] for key, span_id in ids.items()}
        assert {span.trace_id for span in spans.values()} == {
            trace_id_for(run_id).to_bytes(16, "big")}
        assert spans["run"].name == "run demo.yaml" and spans["run"].parent_span_id == b""
        for child, parent in (("step", "run"), ("agent", "step"), ("llm", "agent"),
                              ("tool", "agent"), ("failing", "agent")):
            assert spans[child].parent_span_id == spans[parent].span_id
        assert [spans[key].name for key in ("agent", "llm", "tool", "failing")] == [
            "invoke_agent coder", "chat gemma-3-270m", "execute_tool read_file",
            "execute_tool write_file"]
        for span in spans.values():
            duration = attributes(span.attributes)["duration_s"]
            assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
            assert abs((span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
                       - duration) < 1e-6
        assert spans["run"].start_time_unix_nano <= spans["llm"].start_time_unix_nano
        assert abs(spans["run"].end_time_unix_nano / 1e9 - time.time()) < 60

        llm = spans["llm"]
        assert llm.kind == PbSpan.SPAN_KIND_CLIENT and spans["tool"].kind == (
            PbSpan.SPAN_KIND_INTERNAL)
        llm_attributes, llm_kinds = attributes(llm.attributes), kinds(llm.attributes)
        assert llm_attributes["gen_ai.usage.input_tokens"] == INPUT_TOKENS
        assert llm_attributes["gen_ai.usage.output_tokens"] == OUTPUT_TOKENS
        assert llm_attributes["pyagent.usage.cached_tokens"] == CACHED_TOKENS
        assert llm_kinds["gen_ai.usage.input_tokens"] == "int_value"
        assert llm_kinds["duration_s"] == "double_value"
        assert llm_attributes["gen_ai.request.model"] == "gemma-3-270m"
        assert llm_attributes["gen_ai.response.model"] == "gemma-3-270m-it"
        assert llm_attributes["gen_ai.response.finish_reasons"] == ["tool_calls"]
        assert llm_attributes["gen_ai.operation.name"] == "chat"
        assert llm_attributes["pyagent.run_id"] == run_id
        assert llm_attributes["pyagent.span.kind"] == "llm_call"
        assert attributes(spans["agent"].attributes)["gen_ai.agent.name"] == "coder"
        assert attributes(spans["agent"].attributes)["gen_ai.operation.name"] == "invoke_agent"
        tool = attributes(spans["tool"].attributes)
        assert tool["gen_ai.operation.name"] == "execute_tool"
        assert tool["gen_ai.tool.name"] == "read_file" and tool["pyagent.tool.output_chars"] == 42
        assert "gen_ai.operation.name" not in attributes(spans["step"].attributes)

        assert spans["tool"].status.code == PbStatus.STATUS_CODE_UNSET
        failing = spans["failing"]
        assert failing.status.code == PbStatus.STATUS_CODE_ERROR
        assert failing.status.message == "no such directory: out/"
        assert attributes(failing.attributes)["error.type"] == "FileNotFoundError"
        assert [event.name for event in failing.events] == ["exception"]
        assert attributes(failing.events[0].attributes) == {
            "exception.type": "FileNotFoundError", "exception.message": "no such directory: out/"}
    assert trace_id_for("run-1") != trace_id_for("run-2")


def test_genai_metrics_and_gauges(receiver: Receiver) -> None:
    bus = EventBus()
    readings = {"pyagent.kv.bytes": 123.0, "pyagent.scheduler.waiting": 2}
    with OTLPExport(receiver.url, metrics_interval_s=60, gauges=lambda: readings) as export:
        bus.subscribe(export.record)
        fleet_run(bus, "run-1")
        fleet_run(bus, "run-2")
        bus.publish(Event("llm_call", "error", "chat gemma-3-270m", "run-3", "ab" * 8, None,
                          time.time(), {"duration_s": 0.5, "error.type": "BackendError",
                                        "exception.message": "connection reset",
                                        "gen_ai.request.model": "gemma-3-270m"}))
        readings["pyagent.kv.free_blocks"] = 7  # a gauge that appears later is picked up
        time.sleep(0.3)  # past the time one reading of gauges() is shared
        export.flush(10)
        export.flush(10)  # cumulative: the latest export holds everything

    usage = receiver.metric("gen_ai.client.token.usage")
    assert usage.unit == "{token}" and usage.WhichOneof("data") == "histogram"
    sums = {attributes(point.attributes)["gen_ai.token.type"]: point
            for point in usage.histogram.data_points}
    assert sums["input"].sum == 2 * INPUT_TOKENS and sums["input"].count == 2
    assert sums["output"].sum == 2 * OUTPUT_TOKENS and sums["output"].count == 2
    series = attributes(sums["input"].attributes)
    assert series == {"gen_ai.token.type": "input", "gen_ai.operation.name": "chat",
                      "gen_ai.request.model": "gemma-3-270m",
                      "gen_ai.response.model": "gemma-3-270m-it"}
    assert list(sums["input"].explicit_bounds)[:3] == [1, 4, 16]

    duration = receiver.metric("gen_ai.client.operation.duration")
    assert duration.unit == "s"
    points = {attributes(point.attributes).get("error.type"): point
              for point in duration.histogram.data_points}
    assert points[None].count == 2 and points[None].sum > 0.02
    assert points["BackendError"].count == 1 and points["BackendError"].sum == 0.5
    assert receiver.metric("gen_ai.client.operation.time_to_first_chunk").histogram.data_points[
        0].count == 2

    tools = {(attributes(point.attributes)["gen_ai.tool.name"],
              attributes(point.attributes)["pyagent.status"]): point.as_int
             for point in receiver.metric("pyagent.tool.calls").sum.data_points}
    assert tools == {("read_file", "ok"): 2, ("write_file", "error"): 2}
    cached = receiver.metric("pyagent.usage.cached_tokens").sum
    assert cached.is_monotonic and sum(p.as_int for p in cached.data_points) == 2 * CACHED_TOKENS

    for name, expected in (("pyagent.kv.bytes", 123.0), ("pyagent.scheduler.waiting", 2.0),
                           ("pyagent.kv.free_blocks", 7.0)):
        gauge = receiver.metric(name)
        assert gauge.WhichOneof("data") == "gauge"
        assert [point.as_double for point in gauge.gauge.data_points] == [expected]


def test_redaction_and_headers_reach_the_wire(receiver: Receiver) -> None:
    def redact(attributes: dict[str, Any]) -> dict[str, Any]:
        return {key: value.replace(SECRET, "[redacted]") if isinstance(value, str) else value
                for key, value in attributes.items()}

    bus = EventBus()
    with OTLPExport(receiver.url, headers={"Authorization": "Bearer token-1"}, redact=redact,
                    metrics_interval_s=60) as export:
        bus.subscribe(export.record)
        ids = fleet_run(bus, "run-1", arguments=f'{{"path": "notes.txt", "key": "{SECRET}"}}')
        assert export.flush(10)
    assert receiver.raw and not any(SECRET.encode() in body for body in receiver.raw)
    tool = next(span for _, span in receiver.spans()
                if span.span_id == bytes.fromhex(ids["tool"]))
    assert attributes(tool.attributes)["gen_ai.tool.call.arguments"] == (
        '{"path": "notes.txt", "key": "[redacted]"}')
    assert all(headers.get("authorization") == "Bearer token-1" for headers in receiver.headers)


def test_a_failing_redactor_withholds_the_event(receiver: Receiver,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def redact(attributes: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("redactor broke")

    with OTLPExport(receiver.url, redact=redact, metrics_interval_s=60) as export:
        export.record(Event("tool_call", "end", "execute_tool read_file", "r", "cd" * 8, None,
                            time.time(), {"duration_s": 0.1, "secret": SECRET}))
        export.flush(10)
    assert receiver.spans() == [] and "redact failed" in caplog.text


def test_odd_ids_and_attribute_values_export(receiver: Receiver) -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    now = time.time()
    odd = {"none": None, "dict": {"a": 1, "b": [1, "x"]}, "mixed": [1, "two", 3.0],
           "bytes": b"raw\xff", "ints": [1, 2, 3], "empty": [], "huge": 2**70,
           "object": Opaque(), "tuple_keys": {(1, 2): "x"}, "nested_none": [None, 1],
           "flag": True, "duration_s": 0.25}
    with OTLPExport(receiver.url, metrics_interval_s=60) as export:
        export.record(Event("goal", "end", "check_goal", "run:odd", "not-hex-id", "parent/1",
                            now, odd))
        export.record(Event("goal", "end", "check_goal", "run:odd", "parent/1", None, now, {}))
        export.record(Event("goal", "start", "check_goal", "run:odd", "other", None, now, {}))
        assert export.flush(10)
    spans = {span.span_id: span for _, span in receiver.spans()}
    assert len(spans) == 2  # the start event is not exported
    child = spans[span_id_for("not-hex-id").to_bytes(8, "big")]
    assert child.parent_span_id == span_id_for("parent/1").to_bytes(8, "big")
    assert child.trace_id == spans[child.parent_span_id].trace_id
    exported = attributes(child.attributes)
    assert "none" not in exported
    assert exported["dict"] == '{"a": 1, "b": [1, "x"]}'
    assert exported["mixed"] == '[1, "two", 3.0]'
    assert exported["bytes"] == "raw\ufffd"
    assert exported["ints"] == [1, 2, 3] and kinds(child.attributes)["ints"] == "array_value"
    assert exported["empty"] == []
    assert exported["huge"] == str(2**70)
    assert exported["object"] == "opaque"
    assert exported["tuple_keys"] == "{(1, 2): 'x'}"
    assert exported["nested_none"] == "[null, 1]"
    assert exported["flag"] is True
    assert child.end_time_unix_nano - child.start_time_unix_nano == 250_000_000


def test_value_conversion_and_ids() -> None:
    assert otel_value(None) is None and otel_value(3) == 3 and otel_value("x") == "x"
    assert otel_value([True, False]) == (True, False)
    assert otel_value([1, 2.0]) == "[1, 2.0]"  # int and float together are mixed
    assert span_id_for("00000000000000ff") == 255
    assert span_id_for("0000000000000000") != 0 and span_id_for("x") != 0
    assert trace_id_for("r1") == trace_id_for("r1") != trace_id_for("r2")
    assert 0 < trace_id_for("") < 2**128


def test_an_unreachable_endpoint_never_raises_and_close_is_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bus = EventBus()
    export = OTLPExport(f"http://127.0.0.1:{port}", metrics_interval_s=60,
                        gauges=lambda: {"pyagent.kv.bytes": 1.0})
    bus.subscribe(export.record)
    began = time.monotonic()
    fleet_run(bus, "run-1")
    assert time.monotonic() - began < 1  # recording only enqueues
    began = time.monotonic()
    export.flush(1)  # whatever the SDK does with the refused connection, within the bound
    fleet_run(bus, "run-2")
    export.close(timeout_s=1)
    assert time.monotonic() - began < 4
    export.close()  # idempotent
    export.record(Event("run", "end", "run demo.yaml", "r", "ef" * 8, None, time.time(), {}))
    assert export.flush(1) is False
