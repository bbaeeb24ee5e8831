"""The live fleet dashboard as a user sees it: a real `pyagent observe` serving it, a real
`pyagent run` of examples/bugfix (the tiny random-weight model) writing to the observer's data
folder, and headless chromium (WebGL through SwiftShader) showing it.

One observer, one run and one browser serve the whole module: the page is opened before the run
starts (its data folder does not exist yet), and watched while the run runs. Screenshots go to
`PYAGENT_ARTIFACTS` when set."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src"
EXAMPLE = ROOT / "examples" / "bugfix"
RUN = "dash"
AGENTS = ("coder", "tester")
TOKEN = "dashboard-test-token"
ARGS = ["--headless", "--no-sandbox", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
VIEWPORT = {"width": 1280, "height": 900}
NO_WEBGL = """(() => {
  const real = HTMLCanvasElement.prototype.getContext;
  HTMLCanvasElement.prototype.getContext = function (kind, ...rest) {
    return /webgl/i.test(kind) ? null : real.call(this, kind, ...rest);
  };
})();"""
# what a browser logs by itself when a request is answered 401 or 503 (the page then explains it)
HTTP_ERROR = r"^Failed to load resource: the server responded with a status of {}"


def environment() -> dict[str, str]:
    """The subprocesses run this checkout's code, without a token from the environment."""
    env = dict(os.environ)
    env.pop("PYAGENT_TOKEN", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def query(url: str) -> dict[str, list[str]]:
    """The parameters of a request's URL."""
    return parse_qs(urlsplit(url).query)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, token: str | None = None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


class ObserverProcess:
    """`pyagent observe` on a free port, until stopped."""

    def __init__(self, data: Path, log: Path, token: str | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log = log
        command = [sys.executable, "-m", "pyagent", "observe", "--data", str(data),
                   "--port", str(self.port)] + (["--token", token] if token else [])
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            env=environment())
        deadline = time.monotonic() + 30
        while True:  # until the API answers, whatever it says (the port may still be held)
            try:
                urllib.request.urlopen(self.url + "/api/observability", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"pyagent observe did not start:\n{log.read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Console:
    """The page's console errors and warnings (and uncaught exceptions)."""

    def __init__(self, page):
        self.messages: list[tuple[str, str]] = []
        page.on("console", lambda m: self.messages.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.messages.append(("pageerror", str(e))))

    def problems(self, *allowed: str) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in self.messages
                if kind in ("error", "warning", "pageerror")
                and not any(re.search(pattern, text) for pattern in allowed)]


def open_page(browser, url: str, context=None):
    page = context.new_page() if context else browser.new_page(viewport=VIEWPORT)
    console = Console(page)
    page.goto(url)
    page.wait_for_function("() => window.pyagentDashboard && window.pyagentDashboard.ready",
                           timeout=30_000)
    return page, console


def flatten(spans: list[dict]) -> list[dict]:
    out = []
    for span in spans:
        out.append(span)
        out.extend(flatten(span["children"]))
    return out


def wait_until(check, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def click_node(page, node_id: str) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    """Click a node on the canvas with the mouse; the list only when it has no position there.
    Returns how it was clicked."""
    page.evaluate("window.scrollTo(0, 0)")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        position = page.evaluate("id => pyagentDashboard.nodeScreenPosition(id)", node_id)
        if position is None:
            time.sleep(0.25)
            continue
        page.mouse.move(position["x"], position["y"])
        try:  # the graph finds what is under the pointer on its next frames
            page.wait_for_function("id => pyagentDashboard.hovered === id", arg=node_id,
                                   timeout=1500)
        except PlaywrightTimeout:  # moving, or behind another node: look again
            page.mouse.move(position["x"] + 40, position["y"] + 40)
            continue
        page.mouse.down()
        page.mouse.up()
        return "canvas"
    page.locator(f'#node-list tr[data-id="{node_id}"]').click()
    return "list"


@dataclass
class Live:
    page: object
    console: Console
    observer: ObserverProcess
    data: Path
    shots: Path
    banner_before: str = ""
    first_seen_ms: dict[str, int] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    run_seconds: float = 0.0


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PYAGENT_ARTIFACTS") or tmp_path_factory.mktemp("dashboard"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-dash"), context=16384)


@pytest.fixture(scope="module")
def live(browser, tiny, tmp_path_factory, shots):
    """The page, opened on an observer whose data folder does not exist yet, watched (polled
    every 0.1 s) while `pyagent run` runs the bugfix example into that folder."""
    base = tmp_path_factory.mktemp("dash-live")
    data = base / "data"
    observer = ObserverProcess(data, base / "observe.log")
    state = run = None
    try:
        page, console = open_page(browser, observer.url + "/")
        state = Live(page, console, observer, data, shots)
        banner = page.locator("#banner")
        banner.wait_for(state="visible", timeout=10_000)
        state.banner_before = banner.inner_text()
        page.screenshot(path=str(shots / "dashboard-no-data-folder.png"))

        workspace = base / "workspace"
        shutil.copytree(EXAMPLE / "project", workspace)
        log = (base / "run.log").open("w")
        command = [sys.executable, "-m", "pyagent", "run", str(EXAMPLE / "manifest.yaml"),
                   "--task", "Fix remove() in stock.py", "--workspace", str(workspace),
                   "--model", str(tiny), "--data", str(data), "--run-id", RUN]
        started = time.monotonic()
        run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment())
        next_sample = 0.0
        shot_at = None
        while run.poll() is None:
            assert time.monotonic() - started < 300, "the run took more than 5 minutes"
            now_ms, ids = page.evaluate("() => [Date.now(), pyagentDashboard.nodeIds()]")
            for node in ids:
                state.first_seen_ms.setdefault(node, now_ms)
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + 1.0
                state.samples.append(page.evaluate("""() => {
                    const s = pyagentDashboard.series();
                    return {points: s.length, last: s[s.length - 1] || null,
                            tokens: document.querySelector(
                              '.chart[data-key=tokens_per_s] .chart-value').textContent};
                }"""))
            if shot_at is None and f"agent:{RUN}:tester" in state.first_seen_ms:
                shot_at = time.monotonic() + 1.0  # mid-run, once the tester works
            if shot_at is not None and 0 < shot_at < time.monotonic():
                shot_at = 0.0
                page.screenshot(path=str(shots / "dashboard-running-3d.png"))
            time.sleep(0.1)
        state.run_seconds = time.monotonic() - started
        log.close()
        output = (base / "run.log").read_text()
        assert run.returncode == 3, output  # random weights do not fix the bug: goal not met
        yield state
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        (state.observer if state else observer).stop()  # a test may have restarted it


def test_a_missing_data_folder_is_a_clear_banner_that_goes_once_a_run_writes(live):
    assert "cannot read its data folder" in live.banner_before
    assert "no such folder" in live.banner_before and str(live.data) in live.banner_before
    page = live.page
    page.locator("#banner").wait_for(state="hidden", timeout=10_000)
    assert page.locator("#graph canvas").count() >= 1  # the page was whole all along
    assert not live.console.problems(HTTP_ERROR.format(503))


def test_the_agents_appear_in_the_3d_graph_within_two_seconds_of_their_first_span(live):
    page = live.page
    assert page.evaluate("pyagentDashboard.mode") == "3d"  # SwiftShader gives headless WebGL
    spans = flatten(get_json(f"{live.observer.url}/api/runs/{RUN}")["spans"])
    latencies = page.evaluate("pyagentDashboard.latencies")
    for agent in AGENTS:
        node = f"agent:{RUN}:{agent}"
        first = min(s["start"] for s in spans if s["kind"] == "agent"
                    and s["name"] == f"invoke_agent {agent}")
        assert node in live.first_seen_ms, f"{node} never appeared"
        delay = live.first_seen_ms[node] / 1000 - first
        assert -0.05 <= delay < 2.0, f"{node} appeared {delay:.2f} s after its first span"
        shown = [e for e in latencies if e["node"] == node]
        assert shown, f"no latency recorded for {node}"
        assert shown[0]["shown_at"] - shown[0]["event_ts"] < 2000
        assert shown[0]["event_ts"] == pytest.approx(first * 1000, abs=1)
    for node in (f"run:{RUN}", f"step:{RUN}:code", f"step:{RUN}:test", "tool:list_files",
                 "tool:run_tests", "backend:embedded"):
        assert node in live.first_seen_ms
    assert page.evaluate("pyagentDashboard.edgesLit") >= 20  # live edges lit as spans start
    # every start event that reached the graph is timed, in event order
    assert all({"id", "node", "event_ts", "shown_at"} <= set(e) for e in latencies)
    ids = [e["id"] for e in latencies]
    assert len(ids) >= 40 and ids == sorted(ids)
    waits = sorted(e["shown_at"] - e["event_ts"] for e in latencies)
    (live.shots / "dashboard-timings.json").write_text(json.dumps({
        "run_seconds": round(live.run_seconds, 1),
        "first_seen_after_first_span_ms": {
            agent: round(live.first_seen_ms[f"agent:{RUN}:{agent}"] - 1000 * min(
                s["start"] for s in spans if s["name"] == f"invoke_agent {agent}"))
            for agent in AGENTS},
        "start_event_to_shown_ms": {"count": len(waits), "p50": waits[len(waits) // 2],
                                    "p95": waits[int(len(waits) * 0.95)], "max": waits[-1]},
    }, indent=2))
    assert not live.console.problems(HTTP_ERROR.format(503))


def test_the_charts_move_while_the_run_runs(live):
    samples = live.samples
    assert len(samples) >= 5
    assert samples[-1]["points"] > samples[0]["points"]
    times = [s["last"]["t"] for s in samples if s["last"]]
    assert times == sorted(times) and times[-1] - times[0] >= 3
    assert any(s["last"] and s["last"]["tokens_per_s"] > 0 for s in samples)
    assert len({s["tokens"] for s in samples}) > 1  # the shown value changed
    page = live.page
    assert page.locator(".chart[data-key=cost_usd] .chart-value").inner_text() == "unknown"
    assert page.locator(".chart .uplot canvas").count() == 5
    health = page.locator("#health .badge").inner_text()
    assert health.startswith("health ")


def test_clicking_an_agent_on_the_canvas_shows_its_definition_and_spans(live):
    page = live.page
    node = f"agent:{RUN}:coder"
    how = click_node(page, node)
    assert how == "canvas"
    detail = page.locator(f'#detail[data-node="{node}"]')
    detail.wait_for(timeout=5000)
    def closed_own() -> set[str]:  # the coder's finished turns and their LLM and tool calls
        turns = [s for s in flatten(get_json(f"{live.observer.url}/api/runs/{RUN}")["spans"])
                 if s["kind"] == "agent" and s["name"] == "invoke_agent coder"]
        return {c["span_id"] for s in turns for c in [s, *s["children"]]
                if c["kind"] in ("agent", "llm_call", "tool_call") and c["status"] != "running"}

    def shown() -> list[str] | None:  # the panel lists what the API has for the node
        ids = detail.locator("table.recent tbody tr").evaluate_all(
            "rs => rs.map(r => r.dataset.span)")
        raw = get_json(f"{live.observer.url}/api/observability/nodes/{node}")
        listed = {s["span_id"] for s in raw["recent"]}
        own = closed_own()
        return ids if ids and set(ids) == listed and set(ids) <= own and len(ids) == min(
            20, len(own)) else None

    wait_until(shown, 20, "the coder's spans")  # the observer may trail the store a little
    rows = detail.locator("table.recent tbody tr").all_inner_texts()
    assert any("invoke_agent coder" in row for row in rows)
    assert any("execute_tool" in row for row in rows) and any("chat " in row for row in rows)
    text = detail.inner_text()
    assert "careful Python developer" in text  # its role, from the manifest
    assert "list_files" in text and "embedded" in text  # the tool it called, the backend
    assert page.evaluate("pyagentDashboard.selected") == node
    page.screenshot(path=str(live.shots / "dashboard-selected-agent.png"))
    assert not live.console.problems(HTTP_ERROR.format(503))


def test_the_waterfall_has_every_span_in_trace_order_and_shows_tool_calls(live):
    page = live.page
    spans = flatten(get_json(f"{live.observer.url}/api/runs/{RUN}")["spans"])
    rows_js = """() => [...document.querySelectorAll('#waterfall .wf-row')].map(r => ({
        span: r.dataset.span, kind: r.dataset.kind, name: r.dataset.name,
        status: r.dataset.status, left: parseFloat(r.querySelector('.wf-bar').style.left)}))"""
    final = [(s["span_id"], s["status"]) for s in spans]
    rows = wait_until(lambda: (r := page.evaluate(rows_js))
                      and [(x["span"], x["status"]) for x in r] == final and r,
                      15, "the whole finished trace in the waterfall")
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["name"] for r in steps] == [s["name"] for s in spans if s["kind"] == "step"]
    assert [r["name"] for r in steps] == ["step code", "step test"] * 3
    lefts = [r["left"] for r in steps]
    assert lefts == sorted(lefts) and lefts[-1] > lefts[0]
    tool = next(s for s in spans if s["kind"] == "tool_call")
    page.locator(f'#waterfall .wf-row[data-span="{tool["span_id"]}"]').click()
    box = page.locator(f'#span-detail .box[data-span="{tool["span_id"]}"]')
    box.wait_for(timeout=5000)
    result = tool["attributes"]["gen_ai.tool.call.result"]
    assert box.locator(".tool-result").inner_text().strip() == result.strip()
    assert box.locator(".tool-args").inner_text().strip() in ("{}", "")
    box.scroll_into_view_if_needed()
    page.screenshot(path=str(live.shots / "dashboard-waterfall.png"), full_page=True)


def test_the_lineage_matches_the_api(live):
    page = live.page
    api = get_json(f"{live.observer.url}/api/runs/{RUN}/lineage")

    def tree(node):
        figures = node["figures"]
        return [node["id"], node["kind"], node["name"], node["status"],
                figures["input_tokens"], figures["output_tokens"],
                [tree(child) for child in node["children"]]]

    shown_js = """() => {
      const walk = (li) => [li.dataset.id, li.dataset.kind, li.dataset.name, li.dataset.status,
        Number(li.dataset.input), Number(li.dataset.output),
        [...li.querySelectorAll(':scope > details > ul > li')].map(walk)];
      const root = document.querySelector('#lineage > ul > li');
      return root ? walk(root) : null;
    }"""
    expected = tree(api["root"])
    wait_until(lambda: page.evaluate(shown_js) == expected, 15, "the lineage of the API")
    assert [c[0] for c in expected[6]] == [f"step:{RUN}:code", f"step:{RUN}:test"]
    assert expected[6][0][6][0][0] == f"agent:{RUN}:coder"
    # a branch folds and unfolds
    branch = page.locator(f'#lineage details[data-id="step:{RUN}:code"]')
    agent = page.locator(f'#lineage li[data-id="agent:{RUN}:coder"]')
    branch.locator(":scope > summary .kind-tag").click()
    assert not agent.is_visible()
    branch.locator(":scope > summary .kind-tag").click()
    assert agent.is_visible()


def test_the_filters_fetch_a_narrower_snapshot_and_narrow_the_graph(live):
    page = live.page
    everything = set(page.evaluate("pyagentDashboard.nodeIds()"))
    ids = lambda: set(page.evaluate("pyagentDashboard.nodeIds()"))  # noqa: E731
    with page.expect_request(lambda r: "/api/observability?" in r.url
                             and query(r.url) == {"recent": ["0"], "agent": ["tester"]}):
        page.fill("#f-agent", "tester")
    narrowed = wait_until(lambda: (now := ids()) and f"agent:{RUN}:coder" not in now and now,
                          10, "the agent filter")
    assert narrowed == {f"run:{RUN}", f"step:{RUN}:test", f"agent:{RUN}:tester",
                        "tool:run_tests", "backend:embedded"}
    listed = lambda: set(page.locator("#node-list tr[data-id]").evaluate_all(  # noqa: E731
        "rows => rows.map(r => r.dataset.id)"))
    wait_until(lambda: listed() == narrowed, 5, "the list to follow")
    page.screenshot(path=str(live.shots / "dashboard-filtered.png"))
    with page.expect_request(lambda r: "/api/observability" in r.url and "agent=" not in r.url):
        page.fill("#f-agent", "")
    wait_until(lambda: ids() == everything, 10, "every node back")
    with page.expect_request(lambda r: f"run={RUN}" in r.url and "window=300" in r.url):
        page.select_option("#f-run", RUN)
        page.select_option("#f-window", "300")
    time.sleep(0.5)
    assert ids() == everything  # one run, seen in the last 5 minutes
    with page.expect_request(lambda r: "/api/observability?" in r.url
                             and query(r.url) == {"recent": ["0"]}):
        page.select_option("#f-run", "")
        page.select_option("#f-window", "")
    assert not live.console.problems(HTTP_ERROR.format(503))


def test_the_2d_graph_forced_and_as_the_fallback_without_webgl(live, browser):
    page, console = open_page(browser, live.observer.url + "/?mode=2d")
    assert page.evaluate("pyagentDashboard.mode") == "2d"
    assert "forced" in page.locator("#mode-label").inner_text()
    wait_until(lambda: {f"agent:{RUN}:{a}" for a in AGENTS} <= set(
        page.evaluate("pyagentDashboard.nodeIds()")), 10, "the agents in 2D")
    node = f"agent:{RUN}:tester"
    assert click_node(page, node) == "canvas"
    page.locator(f'#detail[data-node="{node}"]').wait_for(timeout=5000)
    page.screenshot(path=str(live.shots / "dashboard-2d.png"))
    assert not console.problems()
    page.close()

    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(NO_WEBGL)
    page, console = open_page(browser, live.observer.url + "/", context)
    assert page.evaluate("pyagentDashboard.mode") == "2d"
    assert "WebGL unavailable" in page.locator("#mode-label").inner_text()
    wait_until(lambda: f"agent:{RUN}:coder" in page.evaluate("pyagentDashboard.nodeIds()"), 10,
               "the agents in the fallback")
    assert not console.problems()
    context.close()


def test_a_token_protected_observer_needs_the_token_in_the_fragment(live, browser,
                                                                   tmp_path):
    observer = ObserverProcess(live.data, tmp_path / "observe.log", token=TOKEN)
    try:
        page, console = open_page(browser, f"{observer.url}/#token={TOKEN}")
        wait_until(lambda: f"agent:{RUN}:coder" in page.evaluate("pyagentDashboard.nodeIds()"),
                   10, "the graph with the token")
        assert TOKEN not in page.url  # kept for the tab, out of the address bar
        assert page.locator("#banner").is_hidden()
        page.reload()  # the tab remembers it
        page.wait_for_function("() => window.pyagentDashboard && pyagentDashboard.ready")
        wait_until(lambda: page.evaluate("pyagentDashboard.nodeIds()"), 10, "the graph again")
        assert page.locator("#banner").is_hidden()
        page.wait_for_function(
            "() => document.querySelectorAll('#waterfall .wf-row').length > 0", timeout=10_000)
        assert not console.problems()
        page.close()

        page, console = open_page(browser, observer.url + "/")
        banner = page.locator('#banner[data-kind="auth"]')
        banner.wait_for(timeout=10_000)
        text = banner.inner_text()
        assert "Unauthorized" in text and "#token=" in text
        assert page.locator("#conn").inner_text() == "unauthorized"
        assert page.evaluate("pyagentDashboard.nodeIds()") == []
        page.screenshot(path=str(live.shots / "dashboard-unauthorized.png"))
        assert not console.problems(HTTP_ERROR.format(401))
        page.close()
    finally:
        observer.stop()


def test_the_stream_resumes_with_last_event_id_after_the_observer_restarts(live, tmp_path):
    from pyagent.observe.events import Event
    from pyagent.observe.traces import TraceStore

    page = live.page
    resumed_from = []
    page.on("request", lambda r: resumed_from.append(r.headers.get("last-event-id"))
            if "/api/stream" in r.url else None)
    last = get_json(f"{live.observer.url}/api/observability")["source"]["last_event_id"]
    live.observer.stop()
    page.locator('#banner[data-kind="network"]').wait_for(timeout=10_000)
    assert "Cannot reach the observer" in page.locator("#banner").inner_text()
    # while nothing observes, a run stores more
    store = TraceStore(live.data / "traces.db")
    now = time.time()
    for kind, phase, name, span, parent, attributes in [
            ("run", "start", "run late", "late-run", None, {}),
            ("step", "start", "step review", "late-step", "late-run",
             {"pyagent.step.id": "review"}),
            ("agent", "start", "invoke_agent reviewer", "late-agent", "late-step",
             {"gen_ai.agent.name": "reviewer"})]:
        store.record(Event(kind, phase, name, "late", span, parent, now, attributes))
    store.close()
    live.observer = ObserverProcess(live.data, tmp_path / "observe.log", port=live.observer.port)
    # the stream reconnects (with backoff) asking for what came after the last event it had,
    # and gets the events stored meanwhile: timed entries are made for stream events only
    wait_until(lambda: any(e["node"] == "agent:late:reviewer" for e in
                           page.evaluate("pyagentDashboard.latencies")), 30,
               "the events stored while the observer was down, from the stream")
    assert resumed_from and resumed_from[0] == str(last)
    assert "agent:late:reviewer" in page.evaluate("pyagentDashboard.nodeIds()")
    assert "step:late:review" in page.evaluate("pyagentDashboard.nodeIds()")
    page.locator("#banner").wait_for(state="hidden", timeout=10_000)
    assert not live.console.problems(HTTP_ERROR.format(503), r"net::ERR_", r"Failed to fetch")
