"""`pyagent observe` and `pyagent serve --data` as a user starts them, and the observer's OTLP
export received by a real OTLP/HTTP receiver."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.observing import observing
from test_observer import SECRET, fleet_run, wait_for
from test_otlp import attributes, receiver  # noqa: F401 (a fixture)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyagent", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def until_up(process: subprocess.Popen, url: str, headers: dict[str, str] | None = None,
             timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            httpx.get(url, headers=headers, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    _out, err = process.communicate(timeout=30)
    return err


def test_observe_refuses_to_expose_itself_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYAGENT_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "pyagent", "observe", "--data", str(tmp_path),
                             "--host", "0.0.0.0", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "binding 0.0.0.0 exposes the server beyond this machine" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "pyagent", "observe", "--data", str(tmp_path),
                          "--otlp-header", "no-equals-sign", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--otlp-header must be NAME=VALUE" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_observe_serves_a_folder_that_appears_later(tmp_path):
    data, port = tmp_path / "later", free_port()
    process = start("observe", "--data", str(data), "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        until_up(process, f"{url}/api/observability")
        assert httpx.get(f"{url}/api/observability").status_code == 503
        bus, traces = EventBus(), TraceStore(data / "traces.db")
        traces.attach(bus)
        fleet_run(bus, "r1")
        traces.close()
        snapshot = wait_for(lambda: (r := httpx.get(f"{url}/api/observability")).status_code
                            == 200 and r.json(), what="the run")
        assert snapshot["metrics"]["runs"] == 1
        assert "text/html" in httpx.get(url).headers["content-type"]
    finally:
        err = stop(process)
    assert f"observing {data} at {url}/" in err and "does not exist yet" in err


def test_otlp_export_of_what_runs_write_after_the_observer_starts(tmp_path, receiver):  # noqa: F811
    data = tmp_path / "data"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    fleet_run(bus, "before")
    traces.flush()  # stored before the observer starts
    with observing(data, otlp_endpoint=receiver.url) as observer:
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the history")
        fleet_run(bus, "after")
        wait_for(lambda: observer.cursor == traces.last_event_id(), what="the new run")
    traces.close()
    spans = [span for _resource, span in receiver.spans()]
    names = sorted(span.name for span in spans)
    assert {attributes(s.attributes)["pyagent.run_id"] for s in spans} == {"after"}
    assert names.count("chat gemma-3-270m") == 3 and "invoke_agent helper" in names
    assert "execute_tool read_file" in names and "run bugfix" in names
    llm = next(s for s in spans if s.name == "chat gemma-3-270m")
    assert attributes(llm.attributes)["gen_ai.usage.input_tokens"] in (100, 101, 7)
    assert all(SECRET.encode() not in body for body in receiver.raw)
    usage = receiver.metric("gen_ai.client.token.usage")
    assert sum(p.sum for p in usage.histogram.data_points) == (100 + 101 + 7) + (10 + 11 + 3)


def test_serve_with_data_and_token(tiny_model_dir, tmp_path):
    data, port, token = tmp_path / "data", free_port(), "serve-secret"
    bus, traces = EventBus(), TraceStore(data / "traces.db")
    traces.attach(bus)
    fleet_run(bus, "r1")
    traces.close()
    process = start("serve", "--model", str(tiny_model_dir), "--port", str(port),
                    "--data", str(data), "--token", token)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        until_up(process, f"{url}/health")
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        model = httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"]
        reply = httpx.post(f"{url}/v1/completions", headers=auth, timeout=60,
                           json={"model": model, "prompt": "The fox", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert httpx.get(f"{url}/api/observability").status_code == 401
        snapshot = wait_for(lambda: (s := httpx.get(f"{url}/api/observability",
                                                    headers=auth).json())
                            and s["metrics"]["sources"] == 1 and s, what="the engine's gauges")
        assert snapshot["metrics"]["runs"] == 1 and snapshot["metrics"]["kv_capacity_bytes"] > 0
        assert httpx.get(url).status_code == 200
    finally:
        stop(process)


def test_the_default_alerts_and_objectives_load(tmp_path):
    with observing(Path(tmp_path)) as observer:
        assert len(observer.objectives) == 4
        assert [group.name for group in observer.rules] == ["llm", "tools", "tokens", "security"]
