"""Observability: ingest rate, snapshot size and latency, event-to-screen latency in a real
browser, and what observing costs a real run.

    .venv/bin/python benchmarks/observe.py [--quick] [--sections ingest,snapshot,screen,overhead]

- ingest: a writer process publishes synthetic agent turns as fast as it can through an
  `EventBus` into `traces.db`; `pyagent observe` (another process) tails the file; a client reads
  `/api/stream` from the first event. Rate = events / (first publish -> last event received).
  Goal: at least 20,000 events/s.
- snapshot: stores holding 10, 100 and 1,000 agents (one step each, two LLM calls and a tool
  call per agent, ten agents per run); `GET /api/observability` timed 20 times after the observer
  read everything; the body's size. Goal: none stated beyond staying usable at 1,000 agents.
- screen: 1, 10 and 100 agents take turns concurrently (each turn: an agent span with an LLM call
  and a tool call, 0.5 to 1.5 s apart per agent); the dashboard runs in headless chromium and
  records, for each span start it draws, the time from the span's start in the writer process to
  the animation frame after the graph took it. Goal: p95 under 1 s at 100 agents.
- overhead: `pyagent run` of examples/bugfix on the embedded model, alone and with
  `pyagent observe` tailing its data folder and a client reading the stream, alternating
  (ABBA), each run in a fresh process. Goal: under 2% more wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from pyagent.bench.provenance import provenance, write_result
from pyagent.observe.events import EventBus, Span
from pyagent.observe.traces import TraceStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("fastapi", "uvicorn", "playwright", "opentelemetry-sdk")
CHROMIUM = "/usr/bin/chromium"
MODEL = "gemma-3-270m"


# --- synthetic fleets ------------------------------------------------------------------------

def turn(parent: Span, agent: str, rng: random.Random, pause: float = 0.0) -> None:
    """One agent turn: an agent span with an LLM call, a tool call and a second LLM call."""
    with parent.child("agent", f"invoke_agent {agent}", **{"gen_ai.agent.name": agent}) as span:
        for index in range(2):
            with span.child("llm_call", f"chat {MODEL}",
                            **{"gen_ai.request.model": MODEL}) as call:
                time.sleep(pause)
                call.update({"gen_ai.usage.input_tokens": rng.randint(200, 2000),
                             "gen_ai.usage.output_tokens": rng.randint(10, 200),
                             "pyagent.usage.cached_tokens": 0})
            if index == 0:
                with span.child("tool_call", "execute_tool read_file",
                                **{"gen_ai.tool.name": "read_file",
                                   "gen_ai.tool.call.arguments": '{"path": "src/app.py"}'}
                                ) as tool:
                    tool.set("gen_ai.tool.call.result", "def main():\n    return 0\n")


def write_fleet(path: Path, agents: int, per_run: int = 10) -> int:
    """A store with `agents` agents, `per_run` to a run, one step each; returns its events."""
    bus, store = EventBus(), TraceStore(path)
    store.attach(bus)
    rng = random.Random(0)
    for first in range(0, agents, per_run):
        with bus.span("run", "run fleet", f"run-{first // per_run}") as run:
            for index in range(first, min(agents, first + per_run)):
                with run.child("step", f"step s{index}", **{"pyagent.step.id": f"s{index}"}
                               ) as step:
                    turn(step, f"agent-{index}", rng)
    count = store.last_event_id()
    store.close()
    return count


def publish(path: Path, turns: int) -> None:
    """The ingest writer: `turns` agent turns back to back; prints when it started."""
    bus, store = EventBus(), TraceStore(path)
    store.attach(bus)
    rng = random.Random(1)
    print(json.dumps({"start": time.time()}), flush=True)
    with bus.span("run", "run ingest", "ingest") as run, run.child(
            "step", "step work", **{"pyagent.step.id": "work"}) as step:
        for index in range(turns):
            turn(step, f"agent-{index % 100}", rng)
    store.close()
    print(json.dumps({"end": time.time()}), flush=True)


def concurrent(path: Path, agents: int, seconds: float) -> None:
    """`agents` agents taking turns at once for `seconds`, each in its own run and step."""
    import threading

    bus, store = EventBus(), TraceStore(path)
    store.attach(bus)
    stop = time.monotonic() + seconds

    def agent(index: int) -> None:
        rng = random.Random(index)
        with bus.span("run", "run live", f"live-{index}") as run, run.child(
                "step", "step work", **{"pyagent.step.id": "work"}) as step:
            time.sleep(rng.uniform(0, 1))
            while time.monotonic() < stop:
                turn(step, f"agent-{index}", rng, pause=rng.uniform(0.1, 0.3))
                time.sleep(rng.uniform(0.5, 1.5))

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()


# --- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def observer(data: Path) -> Iterator[str]:
    """`pyagent observe` on `data` in its own process; yields its base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pyagent", "observe", "--data", str(data),
                                "--port", str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/api/observability/schema", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("pyagent observe did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def stream_count(url: str, count: int, timeout: float = 300) -> float:
    """Read the stream from the first event until `count` span events came; returns when the
    last arrived (wall clock)."""
    seen, tail = 0, b""
    with httpx.stream("GET", f"{url}/api/stream", params={"last_event_id": 0},
                      timeout=timeout) as response:
        for chunk in response.iter_raw():
            text = tail + chunk
            seen += text.count(b"\nevent: span\n")
            tail = text[-16:]
            seen -= tail.count(b"\nevent: span\n")
            if seen + tail.count(b"\nevent: span\n") >= count:
                return time.time()
    raise RuntimeError(f"the stream ended after {seen} of {count} events")


def pyagent_subcommand(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            text=True)


# --- sections --------------------------------------------------------------------------------

def ingest(turns: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        TraceStore(data / "traces.db").close()
        with observer(data) as url:
            writer = pyagent_subcommand("publish", str(data / "traces.db"), str(turns))
            started = json.loads(writer.stdout.readline())["start"]
            events = 4 + turns * 8  # run and step, then 4 spans per turn
            received = stream_count(url, events)
            ended = json.loads(writer.stdout.readline())["end"]
            writer.wait(60)
        return {"events": events, "published_s": ended - started,
                "received_s": received - started,
                "stored_per_s": events / (ended - started),
                "end_to_end_per_s": events / (received - started)}


def snapshot(agents: int, repeats: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        events = write_fleet(data / "traces.db", agents)
        with observer(data) as url:
            while httpx.get(f"{url}/api/observability").json()["source"]["last_event_id"] \
                    < events:
                time.sleep(0.1)
            found: dict[str, Any] = {"agents": agents, "events": events}
            for label, params in (("", {}), ("_no_spans", {"recent": 0})):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    response = httpx.get(f"{url}/api/observability", params=params, timeout=60)
                    times.append(time.perf_counter() - start)
                found.update({f"bytes{label}": len(response.content),
                              f"latency_ms_p50{label}": statistics.median(times) * 1e3,
                              f"latency_ms_p95{label}":
                                  sorted(times)[int(0.95 * (len(times) - 1))] * 1e3})
            found["nodes"] = len(response.json()["nodes"])
        return found


def screen(agents: int, seconds: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        TraceStore(data / "traces.db").close()
        with observer(data) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
                      "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            page.wait_for_function("window.pyagentDashboard && window.pyagentDashboard.ready",
                                   timeout=30_000)
            writer = pyagent_subcommand("concurrent", str(data / "traces.db"), str(agents),
                                        str(seconds))
            writer.wait(seconds + 120)
            time.sleep(2)
            latencies = page.evaluate("window.pyagentDashboard.latencies")
            mode = page.evaluate("window.pyagentDashboard.mode")
            browser.close()
    delays = sorted(max(0.0, entry["shown_at"] - entry["event_ts"]) / 1e3
                    for entry in latencies)
    if not delays:
        raise RuntimeError("the dashboard recorded no latency")
    return {"agents": agents, "mode": mode, "samples": len(delays),
            "p50_s": delays[len(delays) // 2], "p95_s": delays[int(0.95 * (len(delays) - 1))],
            "max_s": delays[-1], "console_errors": errors[:5]}


def overhead(pairs: int) -> dict[str, Any]:
    example = ROOT / "examples" / "bugfix"
    times: dict[str, list[float]] = {"alone": [], "observed": []}
    order = [kind for _ in range(pairs) for kind in ("alone", "observed", "observed", "alone")]
    for index, kind in enumerate(order[:2 * pairs]):
        with tempfile.TemporaryDirectory() as folder:
            data, workspace = Path(folder) / "data", Path(folder) / "workspace"
            shutil.copytree(example / "project", workspace)
            data.mkdir()
            TraceStore(data / "traces.db").close()
            command = [sys.executable, "-m", "pyagent", "run", str(example / "manifest.yaml"),
                       "--task", (example / "task.txt").read_text().strip(), "--workspace",
                       str(workspace), "--data", str(data), "--run-id", f"run-{index}"]
            with observer(data) if kind == "observed" else _nothing() as url:
                reader = None
                if url is not None:
                    reader = subprocess.Popen(
                        [sys.executable, "-c", "import httpx,sys\n"
                         "with httpx.stream('GET', sys.argv[1] + '/api/stream', timeout=None)"
                         " as r:\n    for _ in r.iter_lines(): pass", url])
                start = time.perf_counter()
                result = subprocess.run(command, capture_output=True, text=True)
                times[kind].append(time.perf_counter() - start)
                if reader is not None:
                    reader.kill()
            if result.returncode not in (0, 3):
                raise RuntimeError(f"pyagent run failed: {result.stderr[-2000:]}")
    alone, observed = statistics.median(times["alone"]), statistics.median(times["observed"])
    return {"pairs": pairs, "alone_s": times["alone"], "observed_s": times["observed"],
            "alone_median_s": alone, "observed_median_s": observed,
            "overhead": observed / alone - 1}


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# --- report ----------------------------------------------------------------------------------

def table(result: dict[str, Any]) -> list[str]:
    lines = [f"Observability ({'quick' if result['quick'] else 'full'} run)", ""]
    if "ingest" in result:
        i = result["ingest"]
        lines += ["| ingest | events | stored per s | bus -> store -> stream per s |",
                  "|---|---|---|---|",
                  f"| writer process -> pyagent observe -> SSE client | {i['events']:,} | "
                  f"{i['stored_per_s']:,.0f} | {i['end_to_end_per_s']:,.0f} |", ""]
    if "snapshot" in result:
        lines += markdown(["agents", "events", "nodes", "spans per node", "snapshot bytes",
                           "latency p50", "latency p95"],
                          [[f"{s['agents']:,}", f"{s['events']:,}", f"{s['nodes']:,}", spans,
                            f"{s['bytes' + key]:,}", f"{s['latency_ms_p50' + key]:.1f} ms",
                            f"{s['latency_ms_p95' + key]:.1f} ms"]
                           for s in result["snapshot"]
                           for spans, key in (("20", ""), ("0", "_no_spans"))])
    if "screen" in result:
        lines += markdown(["concurrent agents", "graph", "samples", "event -> screen p50", "p95",
                           "max"],
                          [[str(s["agents"]), s["mode"], str(s["samples"]),
                            *(f"{s[key] * 1e3:.0f} ms" for key in ("p50_s", "p95_s", "max_s"))]
                           for s in result["screen"]])
    if "overhead" in result:
        o = result["overhead"]
        lines += ["| pyagent run examples/bugfix | median wall time | runs |", "|---|---|---|",
                  f"| alone | {o['alone_median_s']:.1f} s | {len(o['alone_s'])} |",
                  f"| with pyagent observe and a stream client | {o['observed_median_s']:.1f} s"
                  f" | {len(o['observed_s'])} |",
                  f"| overhead | {o['overhead'] * 100:+.1f}% | |", ""]
    lines += ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |"
              for t in result["targets"]]
    return lines


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table and the blank line after it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    if "ingest" in result:
        rate = result["ingest"]["end_to_end_per_s"]
        found.append({"target": "ingest, bus -> store -> stream: at least 20,000 events/s",
                      "measured": f"{rate:,.0f} events/s", "met": rate >= 20_000})
    for entry in result.get("screen", []):
        if entry["agents"] == 100:
            found.append({"target": "event -> screen p95 under 1 s at 100 agents",
                          "measured": f"{entry['p95_s'] * 1e3:.0f} ms ({entry['mode']})",
                          "met": entry["p95_s"] < 1.0})
    if "overhead" in result:
        share = result["overhead"]["overhead"]
        found.append({"target": "observing adds under 2% to a run's wall time",
                      "measured": f"{share * 100:+.1f}%", "met": share < 0.02})
    return found


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("publish", "concurrent"):
        path = Path(sys.argv[2])
        if sys.argv[1] == "publish":
            publish(path, int(sys.argv[3]))
        else:
            concurrent(path, int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes, no overhead runs")
    parser.add_argument("--sections", default="ingest,snapshot,screen,overhead")
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs of overhead runs")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if args.quick:
        sections.discard("overhead")
    result: dict[str, Any] = {"benchmark": "observe", "quick": args.quick,
                              "meta": provenance(ROOT, PACKAGES)}
    if "ingest" in sections:
        result["ingest"] = ingest(2_000 if args.quick else 12_500)
    if "snapshot" in sections:
        result["snapshot"] = [snapshot(n) for n in (10, 100, 1000)]
    if "screen" in sections and os.path.exists(CHROMIUM):
        result["screen"] = [screen(n, 10 if args.quick else 30) for n in (1, 10, 100)]
    if "overhead" in sections:
        result["overhead"] = overhead(args.pairs)
    result["targets"] = targets(result)
    write_result(RESULTS, "observe-quick" if args.quick else "observe", result, table(result))


if __name__ == "__main__":
    main()
