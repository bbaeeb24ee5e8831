"""The observer over a data folder, through its HTTP API on a real loopback server: the snapshot
and its schema, runs, lineage, the resumable stream, slow clients, auth, redaction, gauges and
bad data folders."""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from conftest import LoopbackServer
from pyagent.errors import ConfigError
from pyagent.observe.api import create_observer_app
from pyagent.observe.events import EventBus, Span
from pyagent.observe.gauges import GaugeSampler
from pyagent.observe.live import Observer
from pyagent.observe.redact import Redactor
from pyagent.observe.schema import Snapshot
from pyagent.observe.traces import TraceStore
from pyagent.observing import observing

SECRET = "sk-test-0123456789abcdefghij"


def fleet_run(bus: EventBus, run_id: str, agents: tuple[str, ...] = ("coder", "tester"),
              fail_tool: bool = False) -> None:
    """A run as the orchestrator writes it: steps, agents with LLM and tool calls, and a
    sub-agent delegated to through a tool call."""
    definitions = {name: {"name": name, "role": f"the {name}", "tools": ["read_file"]}
                   for name in agents}
    with bus.span("run", "run bugfix", run_id, **{"pyagent.manifest.agents": definitions}) as run:
        for index, name in enumerate(agents):
            with run.child("step", f"step s{index}", **{"pyagent.step.id": f"s{index}"}
                           ) as step, step.child("agent", f"invoke_agent {name}",
                                                 **{"gen_ai.agent.name": name}) as agent:
                _llm(agent, 100 + index, 10 + index)
                _tool(agent, "read_file", f'{{"path": "a.py", "key": "{SECRET}"}}',
                      fail=fail_tool and index == 0)
                if index == 0:
                    with agent.child("tool_call", "execute_tool delegate",
                                     **{"gen_ai.tool.name": "delegate"}) as call, \
                            call.child("agent", "invoke_agent helper",
                                       **{"gen_ai.agent.name": "helper"}) as helper:
                        _llm(helper, 7, 3)


def _llm(parent: Span, prompt: int, output: int) -> None:
    with parent.child("llm_call", "chat gemma-3-270m",
                      **{"gen_ai.request.model": "gemma-3-270m"}) as call:
        call.update({"gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": output,
                     "pyagent.usage.cached_tokens": 0, "pyagent.kv.peak_bytes": 1000 * prompt})


def _tool(parent: Span, name: str, arguments: str, fail: bool = False) -> None:
    try:
        with parent.child("tool_call", f"execute_tool {name}",
                          **{"gen_ai.tool.name": name,
                             "gen_ai.tool.call.arguments": arguments}) as call:
            if fail:
                raise ValueError("no such file: a.py")
            call.set("gen_ai.tool.call.result", f"print(1)  # password={SECRET}")
    except ValueError:
        pass


@contextmanager
def serving(data: Path, token: str | None = None, **options: Any
            ) -> Iterator[tuple[Observer, str]]:
    """A started observer of `data` behind a real server; yields it and the base URL."""
    with observing(data, **options) as observer, \
            LoopbackServer(create_observer_app(observer, token)) as server:
        yield observer, f"http://127.0.0.1:{server.port}"


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[EventBus, TraceStore, Path]]:
    data = tmp_path / "data"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    yield bus, traces, data
    traces.close()


def test_snapshot_topology_figures_and_schema(store):
    bus, traces, data = store
    fleet_run(bus, "r1", fail_tool=True)
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the events")
        body = httpx.get(f"{url}/api/observability").json()
        schema = httpx.get(f"{url}/api/observability/schema").json()
    jsonschema_rs.validate(schema, body)
    snapshot = Snapshot.model_validate(body)
    nodes = {n.id: n for n in snapshot.nodes}
    assert set(nodes) == {"run:r1", "step:r1:s0", "step:r1:s1", "agent:r1:coder",
                          "agent:r1:tester", "agent:r1:helper", "tool:read_file",
                          "tool:delegate", "backend:gemma-3-270m"}
    assert nodes["agent:r1:helper"].kind == "subagent" and nodes["agent:r1:coder"].kind == "agent"
    assert nodes["agent:r1:coder"].definition == {"name": "coder", "role": "the coder",
                                                  "tools": ["read_file"]}
    edges = {(e.source, e.target): e.kind for e in snapshot.edges}
    assert edges[("run:r1", "step:r1:s0")] == "contains"
    assert edges[("step:r1:s0", "step:r1:s1")] == "next"
    assert edges[("step:r1:s0", "agent:r1:coder")] == "delegates"
    assert edges[("agent:r1:coder", "agent:r1:helper")] == "delegates"
    assert edges[("agent:r1:coder", "tool:read_file")] == "calls"
    assert edges[("agent:r1:helper", "backend:gemma-3-270m")] == "uses"
    coder, run = nodes["agent:r1:coder"].figures, nodes["run:r1"].figures
    assert (coder.input_tokens, coder.output_tokens) == (100, 10)  # the sub-agent's are its own
    assert (run.input_tokens, run.output_tokens) == (100 + 101 + 7, 10 + 11 + 3)
    assert nodes["backend:gemma-3-270m"].figures.calls == 3
    assert nodes["tool:read_file"].figures.errors == 1 and nodes["tool:read_file"].status == "ok"
    assert coder.kv_bytes == 100_000 and coder.latency_p95_s is not None
    assert [s.status for s in nodes["tool:read_file"].recent] == ["error", "ok"]
    assert nodes["tool:read_file"].recent[0].error == "no such file: a.py"
    assert snapshot.metrics.llm_calls == 3 and snapshot.metrics.tool_calls == 3
    assert snapshot.metrics.errors == 1 and snapshot.metrics.runs == 1
    assert snapshot.health.checks and snapshot.source.status == "ok"
    assert nodes["run:r1"].outcome is None and nodes["run:r1"].status == "ok"


def test_a_run_that_missed_its_goal_is_never_ok_and_nodes_come_alone(store):
    bus, traces, data = store
    with bus.span("run", "run bugfix", "r1") as run:
        fleet_run(bus, "r1-inner")
        run.set("pyagent.run.status", "goal_not_met")
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the events")
        light = httpx.get(f"{url}/api/observability", params={"recent": 0}).json()
        run_node = next(n for n in light["nodes"] if n["id"] == "run:r1")
        coder = httpx.get(f"{url}/api/observability/nodes/agent:r1-inner:coder").json()
        missing = httpx.get(f"{url}/api/observability/nodes/agent:nope")
        runs = {r["run_id"]: r["status"] for r in httpx.get(f"{url}/api/runs").json()["runs"]}
        lineage = httpx.get(f"{url}/api/runs/r1/lineage").json()
        few = httpx.get(f"{url}/api/observability", params={"recent": 2}).json()
        detail = httpx.get(f"{url}/api/runs/r1").json()
    assert (run_node["status"], run_node["outcome"]) == ("error", "goal_not_met")
    assert detail["spans"][0]["status"] == "error" and detail["run"]["status"] == "goal_not_met"
    assert all(n["recent"] == [] for n in light["nodes"])
    assert [len(n["recent"]) for n in few["nodes"] if n["id"] == "agent:r1-inner:coder"] == [2]
    assert [s["name"] for s in coder["recent"]] == ["chat gemma-3-270m", "execute_tool read_file",
                                                    "execute_tool delegate", "invoke_agent coder"]
    assert missing.status_code == 404 and "no node 'agent:nope'" in missing.json()["error"][
        "message"]
    assert runs == {"r1": "goal_not_met", "r1-inner": "ok"}
    assert lineage["root"]["status"] == "goal_not_met"


def test_filters_by_run_agent_and_window(store):
    bus, traces, data = store
    fleet_run(bus, "r1")
    fleet_run(bus, "r2", agents=("auditor",))
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the events")
        only = httpx.get(f"{url}/api/observability", params={"run": "r2"}).json()
        agent = httpx.get(f"{url}/api/observability", params={"agent": "TEST"}).json()
        recent = httpx.get(f"{url}/api/observability", params={"window": 3600}).json()
    assert {n["run_id"] for n in only["nodes"]} == {"r2", None}
    assert "agent:r2:auditor" in {n["id"] for n in only["nodes"]}
    assert {n["id"] for n in agent["nodes"] if n["kind"] in ("agent", "subagent")} == {
        "agent:r1:tester"}
    assert {"run:r1", "step:r1:s1", "tool:read_file"} <= {n["id"] for n in agent["nodes"]}
    assert len(recent["nodes"]) == 13


def test_runs_span_tree_and_lineage_match_the_trace(store):
    bus, traces, data = store
    fleet_run(bus, "r1")
    with serving(data) as (_observer, url):
        runs = httpx.get(f"{url}/api/runs").json()["runs"]
        detail = httpx.get(f"{url}/api/runs/r1").json()
        lineage = httpx.get(f"{url}/api/runs/r1/lineage").json()
    assert [(r["run_id"], r["status"], r["llm_calls"], r["input_tokens"]) for r in runs] == [
        ("r1", "ok", 3, 208)]
    (root,) = detail["spans"]
    assert root["kind"] == "run" and [c["name"] for c in root["children"]] == ["step s0",
                                                                               "step s1"]
    flat = []

    def walk(span: dict[str, Any]) -> None:
        flat.append(span)
        for child in span["children"]:
            walk(child)

    walk(root)
    assert len(flat) == len(traces.spans("r1"))
    tool = next(s for s in flat if s["name"] == "execute_tool read_file")
    assert tool["attributes"]["gen_ai.tool.call.arguments"] == (
        '{"path": "a.py", "key": "[REDACTED]"}')
    assert "print(1)" in tool["attributes"]["gen_ai.tool.call.result"]
    llm = next(s for s in flat if s["kind"] == "llm_call")
    assert (llm["input_tokens"], llm["output_tokens"]) == (100, 10)
    steps = lineage["root"]["children"]
    assert [s["name"] for s in steps] == ["s0", "s1"]
    assert [a["name"] for a in steps[0]["children"]] == ["coder"]
    assert [(a["name"], a["kind"]) for a in steps[0]["children"][0]["children"]] == [
        ("helper", "subagent")]
    spans = {s.span_id: s for s in traces.spans("r1")}
    assert {spans[i].name for i in steps[1]["children"][0]["span_ids"]} == {
        "invoke_agent tester"}
    assert lineage["root"]["figures"]["input_tokens"] == 208


def read_stream(url: str, count: int, headers: dict[str, str] | None = None,
                params: dict[str, Any] | None = None, timeout: float = 20.0
                ) -> list[dict[str, Any]]:
    """The first `count` span events of the stream (with their SSE ids)."""
    found: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/api/stream", headers=headers, params=params,
                      timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        kind, event_id = None, None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: ") and kind == "span":
                data = json.loads(line[6:])
                assert data["id"] == event_id
                found.append(data)
                if len(found) == count:
                    return found
    return found


def test_the_stream_resumes_after_a_reconnect_without_gaps(store):
    bus, traces, data = store
    with serving(data) as (observer, url):
        wait_for(lambda: observer.error is None, what="the store")
        writer = threading.Thread(target=lambda: [fleet_run(bus, f"r{i}") for i in range(3)])
        writer.start()
        first = read_stream(url, 10, params={"last_event_id": 0})
        writer.join()
        total = traces.last_event_id()
        rest = read_stream(url, total - 10, headers={"Last-Event-ID": str(first[-1]["id"])})
        one_run = read_stream(url, 5, params={"run": "r1", "last_event_id": 0})
    ids = [e["id"] for e in first + rest]
    assert ids == list(range(1, total + 1))
    assert {e["run_id"] for e in one_run} == {"r1"}
    stored = traces.events_after(0, total)
    assert [(e["span_id"], e["phase"]) for e in first + rest] == [
        (event.span_id, event.phase) for _, event in stored]
    assert all(SECRET not in json.dumps(e) for e in first + rest)


def test_live_events_arrive_with_their_node_and_edge(store):
    bus, _traces, data = store
    with serving(data) as (observer, url):
        wait_for(lambda: observer.error is None, what="the store")
        got: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: got.extend(read_stream(url, 6)))
        reader.start()
        wait_for(lambda: observer.snapshot().stream.clients == 1, what="the client")
        fleet_run(bus, "live")
        reader.join(timeout=20)
    assert [(e["kind"], e["phase"], e["node"]) for e in got[:3]] == [
        ("run", "start", "run:live"), ("step", "start", "step:live:s0"),
        ("agent", "start", "agent:live:coder")]
    assert got[2]["edge"] == ["step:live:s0", "agent:live:coder"]


def test_a_stuck_client_neither_slows_others_nor_loses_events(store):
    bus, traces, data = store
    with serving(data, ) as (observer, url):
        observer.client_buffer = 50
        wait_for(lambda: observer.error is None, what="the store")
        port = int(url.rsplit(":", 1)[1])
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: observer.snapshot().stream.clients == 1, what="the stuck client")
        for i in range(40):  # 40 runs of 41 events: far more than the stuck client's buffers
            fleet_run(bus, f"r{i}")
        total = traces.last_event_id()
        started = time.monotonic()
        events = read_stream(url, total, params={"last_event_id": 0})
        took = time.monotonic() - started
        snapshot_s = time.monotonic()
        httpx.get(f"{url}/api/observability").raise_for_status()
        snapshot_s = time.monotonic() - snapshot_s
        wait_for(lambda: observer.snapshot().stream.dropped > 0, what="a drop")
        stuck.setblocking(True)
        stuck.settimeout(10)
        received = b""
        while received.count(b"event: span") < total:  # the stuck client catches up, no gap
            chunk = stuck.recv(1 << 16)
            assert chunk, "the server closed the stuck client"
            received += chunk
        stuck.close()
    assert [e["id"] for e in events] == list(range(1, total + 1))
    assert took < 10 and snapshot_s < 2
    ids = [int(line[4:]) for line in received.decode().splitlines() if line.startswith("id: ")]
    assert ids == [i for i in ids if i > 0] and ids[-1] == total
    assert ids == sorted(set(ids))


def test_auth_token_protects_the_api_but_not_the_page(store, monkeypatch):
    bus, _traces, data = store
    fleet_run(bus, "r1")
    with serving(data, token="s3cret") as (_observer, url):
        assert httpx.get(f"{url}/api/runs").status_code == 401
        denied = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401 and "bearer token" in denied.json()["error"]["message"]
        assert httpx.get(f"{url}/api/runs",
                         headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/static/vendor/uPlot.min.css").status_code == 200
    from pyagent.auth import server_token

    monkeypatch.delenv("PYAGENT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="binding 0.0.0.0 exposes the server"):
        server_token("0.0.0.0", None)
    assert server_token("::1", None) is None and server_token("127.0.0.2", None) is None
    monkeypatch.setenv("PYAGENT_TOKEN", "from-env")
    assert server_token("0.0.0.0", None) == "from-env"


def test_redaction_patterns_reach_api_and_stream(store):
    bus, _traces, data = store
    fleet_run(bus, "r1")
    with serving(data, redact=[r"a\.py"]) as (_observer, url):
        detail = httpx.get(f"{url}/api/runs/r1").text
        streamed = json.dumps(read_stream(url, 10, params={"last_event_id": 0}))
    for text in (detail, streamed):
        assert SECRET not in text and "a.py" not in text and "[REDACTED]" in text
    assert "password=[REDACTED]" in detail
    redactor = Redactor(["(?P<secret>\\d{4})-\\d{4}"], defaults=False)
    assert redactor.value({"a": ["card 1234-5678"]}) == {"a": ["card [REDACTED]-5678"]}
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        Redactor(["("])


@pytest.mark.parametrize("query, message", [
    ("/api/observability?window=0", "invalid parameter 'window'"),
    ("/api/observability?window=abc", "invalid parameter 'window'"),
    ("/api/observability?agent=" + "x" * 300, "invalid parameter 'agent'"),
    ("/api/stream?last_event_id=-1", "invalid parameter 'last_event_id'"),
    ("/api/runs/nope", "no run 'nope'"),
    ("/api/nothing", "Not Found"),
])
def test_bad_parameters_are_4xx_with_a_message(store, query, message):
    bus, _traces, data = store
    fleet_run(bus, "r1")
    with serving(data) as (_observer, url):
        response = httpx.get(url + query)
    assert 400 <= response.status_code < 500
    assert message in response.json()["error"]["message"]


def test_a_bad_last_event_id_header(store):
    _bus, _traces, data = store
    with serving(data) as (_observer, url):
        response = httpx.get(f"{url}/api/stream", headers={"Last-Event-ID": "soon"})
    assert response.status_code == 400
    assert "Last-Event-ID header must be an event id" in response.json()["error"]["message"]


def folder_state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_missing_empty_and_corrupted_folders_are_503_and_untouched(tmp_path):
    missing = tmp_path / "missing"
    with serving(missing) as (observer, url):
        wait_for(lambda: observer.error and "no such folder" in observer.error, what="error")
        response = httpx.get(f"{url}/api/observability")
        assert response.status_code == 503 and "no such folder" in response.json()["error"][
            "message"]
        assert httpx.get(f"{url}/api/runs").status_code == 503
        assert httpx.get(f"{url}/").status_code == 200  # the page shows the error itself
        bus, traces = EventBus(), TraceStore(missing / "traces.db")  # a run starts: live
        traces.attach(bus)
        fleet_run(bus, "late")
        wait_for(lambda: httpx.get(f"{url}/api/observability").status_code == 200,
                 what="the late store")
        traces.close()
    assert not (tmp_path / "missing-observer").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with serving(empty) as (observer, url):
        wait_for(lambda: observer.error and "no trace store" in observer.error, what="error")
        assert httpx.get(f"{url}/api/observability").status_code == 503
    assert list(empty.iterdir()) == []

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "traces.db").write_bytes(b"this is not a database" * 100)
    before = folder_state(corrupt)
    with serving(corrupt) as (observer, url):
        wait_for(lambda: observer.error and "trace store" in observer.error, what="error")
        response = httpx.get(f"{url}/api/runs")
        assert response.status_code == 503
        assert "not a readable trace store" in response.json()["error"]["message"]
    assert folder_state(corrupt) == before


def test_a_locked_store_is_reported_and_read_once_free(tmp_path):
    data = tmp_path / "data"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    fleet_run(bus, "r1")
    traces.close()
    locker = sqlite3.connect(data / "traces.db", isolation_level=None)
    locker.execute("PRAGMA journal_mode=DELETE")
    locker.execute("BEGIN EXCLUSIVE")
    before = hashlib.sha256((data / "traces.db").read_bytes()).hexdigest()
    with serving(data) as (observer, url):
        wait_for(lambda: observer.error and "locked" in observer.error, timeout=15,
                 what="the lock")
        response = httpx.get(f"{url}/api/observability")
        assert response.status_code == 503 and "locked" in response.json()["error"]["message"]
        locker.execute("ROLLBACK")
        locker.close()
        wait_for(lambda: httpx.get(f"{url}/api/observability").status_code == 200,
                 timeout=15, what="the unlocked store")
    assert hashlib.sha256((data / "traces.db").read_bytes()).hexdigest() == before


def test_an_observer_changes_nothing_in_a_finished_folder(store):
    bus, traces, data = store
    fleet_run(bus, "r1")
    traces.close()
    before = folder_state(data)
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor > 0, what="the events")
        httpx.get(f"{url}/api/runs/r1").raise_for_status()
        read_stream(url, 5, params={"last_event_id": 0})
    assert folder_state(data) == before


WRITER = textwrap.dedent("""
    import sys, time
    from pyagent.observe.events import EventBus
    from pyagent.observe.traces import TraceStore
    bus, store = EventBus(), TraceStore(sys.argv[1])
    store.attach(bus)
    for step in range(int(sys.argv[3])):
        with bus.span("run", "run proc", sys.argv[2]) as run:
            with run.child("step", f"step {step}", **{"pyagent.step.id": str(step)}) as s:
                with s.child("agent", "invoke_agent a", **{"gen_ai.agent.name": "a"}):
                    time.sleep(0.01)
    store.close()
""")


def test_runs_from_several_processes_show_up_live(store):
    _bus, traces, data = store
    traces.close()
    with serving(data) as (_observer, url):
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(data / "traces.db"),
                                     f"proc{i}", "30"]) for i in range(3)]
        assert all(w.wait(timeout=60) == 0 for w in writers)
        events = read_stream(url, 3 * 30 * 6, params={"last_event_id": 0})
        snapshot = wait_for(lambda: (s := httpx.get(f"{url}/api/observability").json())
                            and s["metrics"]["runs"] == 3 and s, what="three runs")
    assert [e["id"] for e in events] == list(range(1, 541))
    assert {e["run_id"] for e in events} == {"proc0", "proc1", "proc2"}
    assert {n["id"] for n in snapshot["nodes"] if n["kind"] == "agent"} == {
        "agent:proc0:a", "agent:proc1:a", "agent:proc2:a"}


def test_gauges_from_a_running_process_and_their_end(store):
    _bus, traces, data = store
    held = {"value": 4096.0}
    sampler = GaugeSampler(traces, lambda: [("pyagent_kv_bytes", {"model": "m"}, held["value"]),
                                            ("pyagent_scheduler_waiting", {"model": "m"}, 3)],
                           interval_s=0.05).start()
    with serving(data) as (observer, url):
        def metrics() -> dict[str, Any]:
            return httpx.get(f"{url}/api/observability").json()["metrics"]

        wait_for(lambda: metrics()["kv_bytes"] == 4096, what="the gauge")
        held["value"] = 8192.0
        wait_for(lambda: metrics()["kv_bytes"] == 8192, what="the change")
        assert metrics()["queue_waiting"] == 3 and metrics()["sources"] == 1
        wait_for(lambda: 'pyagent_kv_bytes{model="m",source=' in httpx.get(f"{url}/metrics").text,
                 what="the gauge in /metrics")
        sampler.stop()
        wait_for(lambda: metrics()["kv_bytes"] == 0, what="zeros once the process is done")
        wait_for(lambda: observer.series and observer.series[-1].kv_bytes == 0, what="a point")


OPERATIONS = ["GET /api/observability", "GET /api/observability/schema",
              "GET /api/observability/nodes/{node_id}", "GET /api/runs",
              "GET /api/runs/{run_id}", "GET /api/runs/{run_id}/lineage", "GET /metrics"]


def test_answers_conform_to_the_openapi_document(tmp_path):
    """schemathesis sends valid and invalid parameters to every operation but the endless
    stream; every answer must be as documented, and never a 500."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    data = tmp_path / "data"
    with TraceStore(data / "traces.db") as traces:
        bus = EventBus()
        traces.attach(bus)
        fleet_run(bus, "r1", fail_tool=True)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, negative_data_rejection]
    with serving(data) as (observer, url):
        wait_for(lambda: observer.cursor > 0, what="the events")
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        labels = {result.ok().label for result in schema.get_all_operations()}
        assert labels == {*OPERATIONS, "GET /api/stream"}
        for label in OPERATIONS:
            typed = label == "GET /api/observability"  # the others take any string or none
            for mode in (GenerationMode.POSITIVE, *[GenerationMode.NEGATIVE] * typed):
                operation = schema.find_operation_by_label(label)
                known_run = mode is GenerationMode.POSITIVE

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                def check(case):
                    if known_run and case.path_parameters:  # noqa: B023 (run at once)
                        key = next(iter(case.path_parameters))
                        case.path_parameters[key] = "r1" if key == "run_id" else "agent:r1:coder"
                    case.call_and_validate(checks=checks, timeout=30)

                check()
