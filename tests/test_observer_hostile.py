"""The trace store and the observer against hostile and damaged input: attributes JSON cannot
hold, damaged rows, secrets in odd places, odd resume ids, a store replaced or deleted while
clients stream."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from typing import Any

import httpx
import pytest

from pyagent.errors import PyAgentError
from pyagent.observe.events import Event, EventBus
from pyagent.observe.redact import Redactor
from pyagent.observe.traces import TraceStore
from test_observer import fleet_run, read_stream, serving, wait_for


def poisoned() -> list[dict[str, Any]]:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    deep: dict[str, Any] = {}
    level = deep
    for _ in range(5000):
        level["n"] = {}
        level = level["n"]
    return [{(1, 2): "tuple key"}, {"cycle": cyclic}, {"deep": deep}, {"nan": math.nan},
            {"name": "caf\udce9.txt"}, {"b": b"\xff"}]


def test_the_writer_stores_what_json_cannot_hold_and_goes_on(tmp_path):
    with TraceStore(tmp_path / "traces.db") as store:
        for index, attributes in enumerate(poisoned()):
            store.record(Event("tool_call", "start", "execute_tool x\udce9", "r1", f"s{index}",
                               None, 1.0, attributes))
        with pytest.raises(PyAgentError, match="attributes must be a dict"):
            store.record(Event("run", "start", "run x", "r1", "bad", None, 1.0, [1]))  # type: ignore[arg-type]
        store.record(Event("run", "start", "run after", "r2", "after", None, 2.0, {}))
        spans = store.spans("r1")
        assert len(spans) == 6 and store.spans("r2")[0].name == "run after"
    by_id = {s.span_id: s for s in spans}
    assert by_id["s0"].attributes == {"(1, 2)": "tuple key"}
    assert by_id["s3"].attributes == {"nan": None}
    assert by_id["s4"].attributes == {"name": "caf\ufffd.txt"}
    assert by_id["s4"].name == "execute_tool x\ufffd"
    assert "nested too deep" in json.dumps(by_id["s1"].attributes)
    assert "nested too deep" in json.dumps(by_id["s2"].attributes)


def test_damaged_rows_are_skipped_once_and_later_runs_still_show(store_with_damage):
    data, traces, bus = store_with_damage
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the events")
        first = httpx.get(f"{url}/api/observability").json()
        time.sleep(1.0)  # several polls: nothing may be folded twice
        fleet_run(bus, "later")
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the later run")
        second = httpx.get(f"{url}/api/observability").json()
        detail = httpx.get(f"{url}/api/runs/r1")
    runs = {n["id"]: n["figures"]["input_tokens"] for n in second["nodes"] if n["kind"] == "run"}
    assert runs == {"run:r1": 208 - 100, "run:later": 208}  # row 5 held the first call's usage
    assert first["metrics"]["llm_calls"] == 3 and second["metrics"]["llm_calls"] == 6
    assert detail.status_code == 200
    assert "pyagent.unreadable" in detail.text  # the damaged rows say what they are


@pytest.fixture
def store_with_damage(tmp_path):
    data = tmp_path / "data"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    fleet_run(bus, "r1")
    traces.flush()
    with sqlite3.connect(data / "traces.db") as conn:  # as a crash or a foreign writer leaves
        conn.execute("UPDATE events SET attributes = '[1]' WHERE id = 3")
        conn.execute("UPDATE events SET attributes = '{not json' WHERE id = 5")
        conn.execute("UPDATE spans SET attributes = '{not json' WHERE rowid = 2")
    yield data, traces, bus
    traces.close()


def test_secrets_are_masked_in_nodes_definitions_errors_and_keys(tmp_path):
    data = tmp_path / "data"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    agents = {"coder": {"name": "coder", "role": "use api_key=sk-live-0123456789abcdef"}}
    with bus.span("run", "run x", "r1", **{"pyagent.manifest.agents": agents}) as run, \
            run.child("agent", "invoke_agent coder", **{"gen_ai.agent.name": "coder"}) as agent:
        try:
            with agent.child("tool_call", "execute_tool http",
                             **{"gen_ai.tool.name": "http", "password": "plain",
                                "env": {"DB_PASSWORD=hunter2": 1},
                                "notes": "AWS_SECRET_ACCESS_KEY=abcdEFGH1234"}):
                raise ValueError("401 for key sk-live-0123456789abcdef")
        except ValueError:
            pass
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the events")
        texts = [httpx.get(url + path).text for path in (
            "/api/observability", "/api/observability/nodes/tool:http",
            "/api/observability/nodes/agent:r1:coder", "/api/runs/r1")]
        texts.append(json.dumps(read_stream(url, 6, params={"last_event_id": 0})))
    traces.close()
    for text in texts:
        for secret in ("sk-live-0123456789abcdef", "hunter2", "abcdEFGH1234", '"plain"'):
            assert secret not in text
    assert "[REDACTED]" in texts[1] and "[REDACTED]" in texts[2]


@pytest.mark.parametrize("header", ["\u00b2", "1\u00b3", "9" * 5000, "-1", "1.5", ""])
def test_odd_last_event_ids_are_400s(tmp_path, header):
    data = tmp_path / "data"
    TraceStore(data / "traces.db").close()
    with serving(data) as (_observer, url):
        response = httpx.get(f"{url}/api/stream",
                             headers={"Last-Event-ID": header.encode("latin-1")})
    assert response.status_code == 400, response.text
    assert "Last-Event-ID header must be an event id" in response.json()["error"]["message"]


def test_odd_text_and_numbers_never_break_the_api(tmp_path):
    data = tmp_path / "data"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    with bus.span("run", "run x", "r1") as run, run.child(
            "agent", "invoke_agent a", **{"gen_ai.agent.name": "a"}) as agent, agent.child(
            "tool_call", "execute_tool caf\udce9", **{"gen_ai.tool.name": "caf\udce9",
                                                      "ratio": math.inf}):
        pass
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the events")
        answers = [httpx.get(url + path) for path in (
            "/api/observability", "/metrics", "/api/runs/r1", "/api/runs/r1/lineage")]
        events = read_stream(url, 6, params={"last_event_id": 0, "run": ""})
    traces.close()
    assert [a.status_code for a in answers] == [200, 200, 200, 200]
    assert "tool:caf\ufffd" in answers[0].text
    assert len(events) == 6  # an empty run filter is no filter


def test_a_replaced_store_restarts_its_clients_from_the_new_start(tmp_path):
    data = tmp_path / "data"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    fleet_run(bus, "old")
    traces.close()
    old_last = 24
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor == old_last, what="the old store")
        (data / "traces.db").unlink()
        for side in ("-wal", "-shm"):
            (data / f"traces.db{side}").unlink(missing_ok=True)
        bus, traces = EventBus(), TraceStore(data / "traces.db")
        traces.attach(bus)
        fleet_run(bus, "new", agents=("coder",))
        new_last = traces.last_event_id()
        wait_for(lambda: observer.snapshot().metrics.runs == 1
                 and any(n.id == "run:new" for n in observer.snapshot().nodes), what="the swap")
        lines = []
        with httpx.stream("GET", f"{url}/api/stream", headers={"Last-Event-ID": str(old_last)},
                          timeout=10) as response:
            for line in response.iter_lines():
                lines.append(line)
                if sum(x.startswith("event: span") for x in lines) == new_last:
                    break
        traces.close()
    assert "event: reset" in lines
    ids = [int(x[4:]) for x in lines if x.startswith("id: ")]
    assert ids == list(range(1, new_last + 1))


def test_lowercase_bearer_and_run_ids(tmp_path):
    data = tmp_path / "data"
    TraceStore(data / "traces.db").close()
    with serving(data, token="t0ken") as (_observer, url):
        assert httpx.get(f"{url}/api/runs", headers={"Authorization": "bearer t0ken"}
                         ).status_code == 200
        assert httpx.get(f"{url}/api/runs", headers={"Authorization": "Basic t0ken"}
                         ).status_code == 401
    from pyagent.fleet.orchestrator import RUN_ID

    for good in ("r1", "nightly-2026.11.30_a"):
        assert RUN_ID.fullmatch(good)
    for bad in ("", "..", "a/b", "x" * 129, "-x", "r 1", "caf\u00e9"):
        assert not RUN_ID.fullmatch(bad)


def test_redactor_depth_is_bounded():
    deep: dict[str, Any] = {}
    level = deep
    for _ in range(400):
        level["n"] = {}
        level = level["n"]
    assert "nested too deep" in json.dumps(Redactor().value(deep))
