"""The event bus, spans and the SQLite trace store, on real files."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from pyagent.errors import ConfigError, PyAgentError
from pyagent.observe.events import Event, EventBus
from pyagent.observe.traces import SCHEMA_VERSION, TraceStore


def make_event(phase: str = "start", span_id: str = "s1") -> Event:
    return Event("run", phase, "run demo", "r1", span_id, None, 1.0, {})


def fleet_run(bus: EventBus, run_id: str = "r1") -> dict[str, str]:
    """One run: a step holding an agent that makes an LLM call and two tool calls, one failing."""
    ids: dict[str, str] = {}
    with bus.span("run", "run demo.yaml", run_id) as run:
        ids["run"] = run.span_id
        with run.child("step", "step plan", **{"pyagent.step.id": "plan"}) as step:
            ids["step"] = step.span_id
            with step.child("agent", "invoke_agent coder",
                            **{"gen_ai.operation.name": "invoke_agent",
                               "gen_ai.agent.name": "coder"}) as agent:
                ids["agent"] = agent.span_id
                with agent.child("llm_call", "chat gemma-3-270m",
                                 **{"gen_ai.request.model": "gemma-3-270m"}) as llm:
                    ids["llm"] = llm.span_id
                    llm.update({"gen_ai.usage.input_tokens": 120,
                                "gen_ai.usage.output_tokens": 30,
                                "pyagent.usage.cached_tokens": 64})
                with agent.child("tool_call", "execute_tool read_file",
                                 **{"gen_ai.tool.name": "read_file"}) as tool:
                    ids["tool"] = tool.span_id
                with pytest.raises(FileNotFoundError), agent.child(
                        "tool_call", "execute_tool write_file") as failing:
                    ids["failing"] = failing.span_id
                    raise FileNotFoundError("out/report.md")
                with agent.child("llm_call", "chat gemma-3-270m") as second:
                    second.set("gen_ai.usage.input_tokens", 200)
                    second.set("gen_ai.usage.output_tokens", 5)
    return ids


def test_subscribers_receive_events_until_they_unsubscribe() -> None:
    bus = EventBus()
    first: list[Event] = []
    second: list[Event] = []
    stop_first = bus.subscribe(first.append)
    bus.subscribe(second.append)
    bus.publish(make_event("start"))
    stop_first()
    stop_first()  # a second call changes nothing
    bus.publish(make_event("end"))
    assert [e.phase for e in first] == ["start"]
    assert [e.phase for e in second] == ["start", "end"]


def test_a_failing_subscriber_is_logged_and_does_not_stop_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    received: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken)
    bus.subscribe(received.append)
    with caplog.at_level(logging.ERROR, logger="pyagent.observe.events"):
        bus.publish(make_event())
    assert len(received) == 1
    assert "subscriber bug" in caplog.text


def test_events_reject_unknown_kinds_and_phases() -> None:
    with pytest.raises(PyAgentError, match="kind"):
        Event("job", "start", "x", "r1", "s1", None, 1.0)  # type: ignore[arg-type]
    with pytest.raises(PyAgentError, match="phase"):
        Event("run", "done", "x", "r1", "s1", None, 1.0)  # type: ignore[arg-type]


def test_span_publishes_start_then_end_with_duration_and_late_attributes() -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    with bus.span("agent", "invoke_agent coder", "r1", **{"gen_ai.agent.name": "coder"}) as span:
        span.set("gen_ai.usage.input_tokens", 7)
    start, end = events
    assert (start.phase, end.phase) == ("start", "end")
    assert start.span_id == end.span_id == span.span_id and len(span.span_id) == 16
    assert start.parent_id is None
    assert start.attributes == {"gen_ai.agent.name": "coder"}
    assert end.attributes["gen_ai.usage.input_tokens"] == 7
    assert end.attributes["duration_s"] >= 0
    assert end.timestamp >= start.timestamp


def test_nested_spans_take_their_parent_explicitly() -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    with bus.span("run", "run demo", "r1") as run, bus.span("step", "step a", "r1", parent=run):
        pass
    with bus.span("step", "step b", "r1", parent=run.span_id):
        pass
    parents = {e.name: e.parent_id for e in events}
    assert parents == {"run demo": None, "step a": run.span_id, "step b": run.span_id}


def test_error_span_records_the_exception_and_lets_it_propagate() -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    with pytest.raises(ValueError, match="bad path"), bus.span("tool_call", "execute_tool x", "r1"):
        raise ValueError("bad path")
    assert [e.phase for e in events] == ["start", "error"]
    assert events[1].attributes["error.type"] == "ValueError"
    assert events[1].attributes["exception.message"] == "bad path"
    assert "duration_s" in events[1].attributes


def test_span_end_without_start_is_refused_and_double_end_publishes_once() -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    span = bus.span("llm_call", "chat m", "r1")
    with pytest.raises(PyAgentError, match="before it started"):
        span.end()
    span.start()
    span.end()
    span.end()
    assert [e.phase for e in events] == ["start", "end"]


def test_store_keeps_spans_children_lineage_and_totals(tmp_path: Path) -> None:
    bus = EventBus()
    with TraceStore(tmp_path / "traces.db") as store:
        store.attach(bus)
        ids = fleet_run(bus)
        spans = store.spans("r1")
        assert [s.name for s in spans] == [
            "run demo.yaml", "step plan", "invoke_agent coder", "chat gemma-3-270m",
            "execute_tool read_file", "execute_tool write_file", "chat gemma-3-270m"]
        by_id = {s.span_id: s for s in spans}
        assert by_id[ids["llm"]].status == "ok"
        assert by_id[ids["llm"]].attributes["gen_ai.request.model"] == "gemma-3-270m"
        assert by_id[ids["llm"]].attributes["gen_ai.usage.output_tokens"] == 30
        failing = by_id[ids["failing"]]
        assert failing.status == "error"
        assert failing.attributes["error.type"] == "FileNotFoundError"
        assert failing.end is not None and failing.duration_s is not None
        assert failing.end >= failing.start

        assert [s.span_id for s in store.children(ids["agent"])] == [
            ids["llm"], ids["tool"], ids["failing"], spans[-1].span_id]
        assert [s.span_id for s in store.lineage(ids["tool"])] == [
            ids["run"], ids["step"], ids["agent"], ids["tool"]]
        assert store.lineage("no-such-span") == []

        totals = store.totals("r1")
        assert (totals.input_tokens, totals.output_tokens, totals.cached_tokens) == (320, 35, 64)
        assert (totals.llm_calls, totals.tool_calls, totals.errors) == (2, 2, 1)
        assert [e.phase for e in store.events("r1")][:2] == ["start", "start"]
        assert len(store.events("r1")) == 14


def test_runs_are_listed_newest_first_with_status(tmp_path: Path) -> None:
    bus = EventBus()
    with TraceStore(tmp_path / "traces.db") as store:
        store.attach(bus)
        with bus.span("run", "run first", "r1"):
            pass
        with pytest.raises(RuntimeError), bus.span("run", "run second", "r2"):
            raise RuntimeError("boom")
        open_run = bus.span("run", "run third", "r3").start()
        runs = store.runs()
        assert [(r.run_id, r.status) for r in runs] == [
            ("r3", "running"), ("r2", "error"), ("r1", "ok")]
        assert runs[0].end is None and runs[2].end is not None
        open_run.end()
        assert store.runs()[0].status == "ok"


def test_a_store_reopened_reads_back_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "traces.db"
    bus = EventBus()
    store = TraceStore(path)
    store.attach(bus)
    ids = fleet_run(bus)
    store.close()
    bus.publish(make_event())  # closed stores stop listening: no error, nothing written

    with TraceStore(path) as reopened:
        assert reopened.schema_version == SCHEMA_VERSION
        assert [r.run_id for r in reopened.runs()] == ["r1"]
        assert len(reopened.spans("r1")) == 7
        assert reopened.lineage(ids["llm"])[0].span_id == ids["run"]
        assert reopened.totals("r1").input_tokens == 320
        assert reopened.spans("s1") == [] and reopened.events("r1")[0].name == "run demo.yaml"


def test_concurrent_publishers_lose_no_rows(tmp_path: Path) -> None:
    bus = EventBus()
    threads_n, spans_n = 8, 50
    with TraceStore(tmp_path / "traces.db") as store:
        store.attach(bus)
        barrier = threading.Barrier(threads_n)

        def work(index: int) -> None:
            barrier.wait()
            with bus.span("run", f"run t{index}", f"r{index}") as run:
                for n in range(spans_n):
                    with run.child("tool_call", "execute_tool echo") as tool:
                        tool.set("pyagent.n", n)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(store.runs()) == threads_n
        for index in range(threads_n):
            spans = store.spans(f"r{index}")
            assert len(spans) == spans_n + 1
            assert all(s.status == "ok" for s in spans)
            assert len(store.events(f"r{index}")) == 2 * (spans_n + 1)
            assert sorted(s.attributes.get("pyagent.n", -1) for s in spans) == [
                -1, *range(spans_n)]


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    bus = EventBus()
    with TraceStore(path) as store:
        store.attach(bus)
        fleet_run(bus)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 41,))
    conn.close()
    with pytest.raises(ConfigError) as caught:
        TraceStore(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"version {SCHEMA_VERSION + 41}" in message and f"version {SCHEMA_VERSION}," in message
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM spans").fetchone()[0] == 7
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION + 41
    conn.close()


def test_a_corrupt_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    garbage = b"this is not a database, but someone's notes\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(ConfigError, match="not a readable trace store") as caught:
        TraceStore(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == garbage


def test_a_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="users") as caught:
        TraceStore(path)
    assert str(path) in str(caught.value)


def test_a_store_keeps_earlier_events_when_a_write_fails(tmp_path: Path) -> None:
    with TraceStore(tmp_path / "traces.db") as store:
        store.record(make_event("start", "s1"))
        with pytest.raises(PyAgentError, match="its run_id must be a string, got None"):
            store.record(Event("run", "start", "run x", None, "s2", None, 2.0))  # type: ignore[arg-type]
        store.record(make_event("end", "s1"))
        assert [s.status for s in store.spans("r1")] == ["ok"]
        assert len(store.events("r1")) == 2
