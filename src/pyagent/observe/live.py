"""The observer: tails a data folder's trace store and keeps the fleet's live picture.

One thread reads new events (by id) and gauge samples from `traces.db` every `poll_s`, folds them
into the topology and a metrics registry, and hands each event to the stream's clients. Runs in
other processes write that file; the observer opens it read-only, so it never changes it, and it
keeps trying while the folder is missing, empty, locked or damaged, reporting why.

The stream never loses an event and never waits for a client: each client has a bounded buffer;
when a slow client's buffer would overflow, the buffer is dropped (and counted) and that client
reads what it missed from the store by event id, as a client that reconnects with `Last-Event-ID`
does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyagent.errors import ConfigError
from pyagent.observe.events import Event
from pyagent.observe.metrics import MetricsFeed, MetricsRegistry
from pyagent.observe.metrics.alerts import AlertEngine, RuleGroup
from pyagent.observe.metrics.health import Objective, evaluate_health
from pyagent.observe.redact import Redactor
from pyagent.observe.schema import (
    AlertView,
    Check,
    Health,
    Metrics,
    Node,
    Point,
    Snapshot,
    Source,
    StreamStats,
)
from pyagent.observe.topology import RECENT, Pricer, Topology, node_of
from pyagent.observe.traces import Sample, TraceReader

TRACES = "traces.db"
BATCH = 2000  # events read per query
TICK_S = 1.0  # metrics, health, alerts and the charts' points
RETRY_S = 0.2  # between attempts to read a store that is missing or cannot be read
SERIES = 600  # points kept for the charts (10 minutes)
SOURCE_TTL_S = 15.0  # a process whose gauges are older than this is gone
TOKENS_WINDOW_S = 10.0
KEEPALIVE_S = 15.0
CLIENT_BUFFER = 4_000_000  # characters of events a client may have waiting (then: the store)
CHUNK = 256_000  # characters of events sent to a client at once
CATCH_UP = 500  # events read from the store at once for a client that fell behind
RECENT_CHARS = 32_000_000  # the latest events' stream text kept for clients that fell behind

Gauges = Callable[[], Iterable[tuple[str, dict[str, str], float]]]
"""In-process gauges `(name, labels, value)`, read every tick (the engine of `pyagent serve`)."""
Listener = Callable[[int, Event], None]
"""Called with every event read and its id, in order, on the reader thread (OTLP export)."""

log = logging.getLogger(__name__)


@dataclass
class Client:
    """One stream client's buffer, filled from the reader thread through its event loop. It
    holds the events' formatted text, shared by every client, and at most `limit` characters of
    it."""

    loop: asyncio.AbstractEventLoop
    limit: int
    pending: deque[tuple[int, str, str]] = field(default_factory=deque)  # (id, run, sse text)
    size: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lagging: bool = False
    reset: bool = False


@dataclass
class Counts:
    events: int = 0
    errors: int = 0
    skipped: int = 0  # events that could not be folded (a damaged store)
    delivered: int = 0
    dropped: int = 0


class Observer:
    """The live picture of the runs writing to `data_dir`; `start` begins tailing."""

    def __init__(self, data_dir: Path, *, redactor: Redactor | None = None,
                 pricer: Pricer | None = None, objectives: Iterable[Objective] = (),
                 rules: Iterable[RuleGroup] = (), gauges: Gauges | None = None,
                 listeners: Iterable[Listener] = (), poll_s: float = 0.05,
                 client_buffer: int = CLIENT_BUFFER):
        self.data_dir = data_dir
        self.path = data_dir / TRACES
        self.redactor = redactor or Redactor(defaults=False)
        self.pricer = pricer
        self.objectives = list(objectives)
        self.rules = list(rules)
        self.gauges = gauges
        self.listeners = list(listeners)
        self.poll_s = poll_s
        self.client_buffer = client_buffer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clients: list[Client] = []
        self._reset()
        self._reader: TraceReader | None = None
        self.error: str | None = f"{self.path}: waiting for the first read"

    def _reset(self) -> None:
        """Forget everything read (a new observer, or the store was replaced)."""
        self._now = time.time()
        self.registry = MetricsRegistry(clock=lambda: self._now)
        self.feed = MetricsFeed(self.registry)
        self.alerts = AlertEngine(self.rules, self.registry)
        self.topology = Topology(self.pricer, self.redactor.value)
        self.cursor = 0
        self.sample_cursor = 0
        self.counts = Counts()
        self._samples: dict[tuple[str, str, str], Sample] = {}
        self._outputs: deque[tuple[float, int]] = deque()
        self.series: deque[Point] = deque(maxlen=SERIES)
        self._recent: deque[tuple[int, str, str]] = deque()  # the latest events' stream text
        self._recent_size = 0
        self.metrics_version = 0
        self._health = Health(status="warn", score=None, checks=[], capped_by=[])
        self._kv_gauge = self.registry.gauge("pyagent_kv_bytes",
                                             "KV cache bytes an engine holds now.",
                                             ("source", "model"))
        self._waiting_gauge = self.registry.gauge("pyagent_scheduler_waiting",
                                                  "Requests waiting for a batch slot.",
                                                  ("source", "model"))
        self._clients_gauge = self.registry.gauge("pyagent_observer_stream_clients",
                                                  "Clients of the live stream.")
        self._dropped = self.registry.counter(
            "pyagent_observer_dropped_total",
            "Events dropped from slow clients' buffers (re-read from the store).")

    # -- the reader thread --------------------------------------------------------------------

    def start(self) -> Observer:
        """Start tailing in a background thread; returns self."""
        self._thread = threading.Thread(target=self._run, name="pyagent-observer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop tailing, end the streams and close the store; calling it again is harmless."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            clients = list(self._clients)
        self._offer(clients, [])
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            busy = False
            try:
                busy = self.poll()
            except Exception:  # a defect must not end the observer: log it and go on
                log.exception("the observer failed reading %s", self.path)
                self._fail("internal error while reading (see the log)")
            if time.time() >= next_tick:
                self.tick()
                next_tick = time.time() + TICK_S
            if not busy:  # a missing or unreadable store is retried a few times a second
                self._stop.wait(self.poll_s if self.error is None else RETRY_S)

    def poll(self) -> bool:
        """Read and fold what is new; True when a full batch came (more may be waiting)."""
        try:
            reader = self._open()
            events = reader.events_after(self.cursor, BATCH)
            samples = reader.samples_after(self.sample_cursor)
        except (ConfigError, sqlite3.Error) as exc:
            self._fail(_reason(exc, self.path))
            return False
        self.error = None
        if events or samples:
            self._ingest(events, samples)
        return len(events) == BATCH

    def _open(self) -> TraceReader:
        reader = self._reader
        if reader is not None and not reader.stale:
            return reader
        if reader is not None:
            reader.close()
            self._reader = None
        _check_folder(self.data_dir)
        reader = TraceReader(self.path)
        if reader.last_event_id() < self.cursor:  # a different store took its place
            with self._lock:
                self._reset()
                clients = list(self._clients)
            for client in clients:
                try:
                    client.loop.call_soon_threadsafe(self._restart, client)
                except RuntimeError:  # its event loop has closed
                    self._forget(client)
        self._reader = reader
        return reader

    def _fail(self, message: str) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.error = message

    def _ingest(self, events: list[tuple[int, Event]], samples: list[Sample]) -> None:
        batch = []
        with self._lock:
            for event_id, event in events:
                try:
                    touch = self.topology.fold(event)
                    self.feed.record(event)
                    payload = self._payload(event_id, event, touch.edge)
                except Exception:  # one bad event must not stop the rest: count it, go on
                    self.counts.skipped += 1
                    log.exception("the observer skipped event %d of %s", event_id, self.path)
                    continue
                self._now = max(self._now, event.timestamp)
                self.counts.events += 1
                if event.phase in ("error", "interrupted"):
                    self.counts.errors += 1
                if event.kind == "llm_call" and event.phase == "end":
                    output = event.attributes.get("gen_ai.usage.output_tokens")
                    if isinstance(output, int):
                        self._outputs.append((event.timestamp, output))
                batch.append((event_id, event.run_id, _sse("span", payload, event_id)))
            if events:
                self.cursor = events[-1][0]
            size = sum(len(text) for _, _, text in batch)
            self._recent.extend(batch)
            self._recent_size += size
            while self._recent_size > RECENT_CHARS:
                self._recent_size -= len(self._recent.popleft()[2])
            for sample in samples:
                self._samples[(sample.source, sample.name, json.dumps(sample.labels,
                                                                      sort_keys=True))] = sample
            if samples:
                self.sample_cursor = samples[-1].id
            clients = list(self._clients)
        if batch:
            self._offer(clients, batch, size)
        for listener in self.listeners:
            for event_id, event in events:
                try:
                    listener(event_id, event)
                except Exception:
                    log.exception("an observer listener failed on event %d", event_id)

    def payload(self, event_id: int, event: Event) -> str:
        """The stream's JSON for one stored event (secrets masked)."""
        return self._payload(event_id, event, None)

    def _payload(self, event_id: int, event: Event, edge: tuple[str, str] | None) -> str:
        body = {"id": event_id, "kind": event.kind, "phase": event.phase, "name": event.name,
                "run_id": event.run_id, "span_id": event.span_id, "parent_id": event.parent_id,
                "timestamp": event.timestamp, "node": node_of(event),
                "edge": list(edge) if edge else None,
                "attributes": self.redactor.attributes(event.attributes)}
        try:
            return json.dumps(body, default=str, allow_nan=False)
        except ValueError:  # NaN or an infinity from an older store: null, as JSON has no such
            return json.dumps(_finite(body), default=str)

    def tick(self) -> None:
        """Evaluate alerts and health, take the charts' point, and wake the stream's clients."""
        with self._lock:
            self._now = max(self._now, time.time())
            now = self._now
            live = self._live_gauges(now)
            for (source, name, labels), value in live.items():
                gauge = {"pyagent_kv_bytes": self._kv_gauge,
                         "pyagent_scheduler_waiting": self._waiting_gauge}.get(name)
                if gauge is not None:
                    gauge.labels(source=source, model=dict(labels).get("model", "")).set(value)
            self._clients_gauge.set(len(self._clients))
            self.alerts.evaluate(now)
            report = evaluate_health(self.objectives, self.registry, self.alerts.firing())
            self._health = Health(
                status=report.status, score=report.score, capped_by=list(report.capped_by),
                checks=[Check(name=c.objective.name, status=c.status, score=c.score,
                              value=c.value, target=c.objective.target) for c in report.checks])
            while self._outputs and self._outputs[0][0] < now - TOKENS_WINDOW_S:
                self._outputs.popleft()
            metrics = self._metrics(live)
            self.series.append(Point(t=now, tokens_per_s=metrics.tokens_per_s,
                                     cost_usd=metrics.cost_usd, kv_bytes=metrics.kv_bytes,
                                     queue_waiting=metrics.queue_waiting,
                                     health_score=self._health.score))
            self.metrics_version += 1
            clients = list(self._clients)
        self._offer(clients, [])

    def gauge_totals(self) -> dict[str, float]:
        """Each live gauge summed over the processes that report it (for OTLP)."""
        with self._lock:
            totals: dict[str, float] = {}
            for (_, name, _), value in self._live_gauges(max(self._now, time.time())).items():
                totals[name] = totals.get(name, 0.0) + value
            return totals

    def _live_gauges(self, now: float) -> dict[tuple[str, str, tuple[tuple[str, str], ...]],
                                                 float]:
        """The latest value of every gauge whose process is alive, by (source, name, labels)."""
        newest: dict[str, float] = {}
        for sample in self._samples.values():
            newest[sample.source] = max(newest.get(sample.source, 0.0), sample.timestamp)
        live = {(s.source, s.name, tuple(sorted(s.labels.items()))): s.value
                for s in self._samples.values() if now - newest[s.source] <= SOURCE_TTL_S}
        for source in [s for s, t in newest.items() if now - t > SOURCE_TTL_S]:
            for key in [k for k in self._samples if k[0] == source]:
                del self._samples[key]
            for gauge in (self._kv_gauge, self._waiting_gauge):
                for labels, child in gauge.series():
                    if labels.get("source") == source:
                        child.set(0)
        if self.gauges is not None:
            for name, labels, value in self.gauges():
                live[("local", name, tuple(sorted(labels.items())))] = value
        return live

    def _metrics(self, live: dict[tuple[str, str, tuple[tuple[str, str], ...]], float]
                 ) -> Metrics:
        def total(name: str) -> float:
            return sum(v for (_, n, _), v in live.items() if n == name)

        nodes = self.topology.nodes.values()
        runs = [n for n in nodes if n.kind == "run"]
        costs = [n.cost for n in runs if n.cost is not None]
        return Metrics(
            runs=len(runs), running_runs=sum(n.active > 0 for n in runs),
            llm_calls=sum(n.calls for n in nodes if n.kind == "backend"),
            tool_calls=sum(n.calls for n in nodes if n.kind == "tool"),
            errors=self.counts.errors,
            input_tokens=sum(n.tokens["input_tokens"] for n in runs),
            output_tokens=sum(n.tokens["output_tokens"] for n in runs),
            cached_tokens=sum(n.tokens["cached_tokens"] for n in runs),
            cost_usd=sum(costs) if costs else None,
            tokens_per_s=sum(o for _, o in self._outputs) / TOKENS_WINDOW_S,
            kv_bytes=int(total("pyagent_kv_bytes")),
            kv_capacity_bytes=int(total("pyagent_kv_capacity_bytes")),
            queue_waiting=int(total("pyagent_scheduler_waiting")),
            requests_running=int(total("pyagent_scheduler_running")),
            sources=len({source for source, _, _ in live}))

    # -- what the API serves ------------------------------------------------------------------

    def source(self) -> Source:
        return Source(data_dir=str(self.data_dir), status="ok" if self.error is None else
                      "unavailable", message=self.error, last_event_id=self.cursor,
                      events_read=self.counts.events, events_skipped=self.counts.skipped)

    def snapshot(self, runs: Iterable[str] = (), agent: str | None = None,
                 window_s: float | None = None, recent: int = RECENT) -> Snapshot:
        """The fleet now, optionally only `runs`, agents matching `agent`, or nodes seen in the
        last `window_s` seconds; each node with its `recent` latest spans."""
        with self._lock:
            now = max(self._now, time.time())
            live = self._live_gauges(now)
            nodes, edges = self.topology.view(
                runs, agent, None if window_s is None else now - window_s,
                _backend_kv(live), recent)
            return Snapshot(
                generated_at=now, source=self.source(), nodes=nodes, edges=edges,
                health=self._health.model_copy(),
                alerts=[_alert_view(a) for a in self.alerts.alerts() if a.state != "inactive"],
                metrics=self._metrics(live), series=list(self.series),
                stream=StreamStats(clients=len(self._clients), delivered=self.counts.delivered,
                                   dropped=self.counts.dropped))

    def node(self, node_id: str) -> Node | None:
        """One node with all its recent spans; None when there is no such node."""
        with self._lock:
            state = self.topology.nodes.get(node_id)
            if state is None:
                return None
            kv = _backend_kv(self._live_gauges(max(self._now, time.time())))
            return state.view(kv.get(state.label) if state.kind == "backend" else None)

    def reader(self) -> TraceReader:
        """A new read-only handle on the store for one request (close it after use)."""
        _check_folder(self.data_dir)
        try:
            return TraceReader(self.path)
        except sqlite3.Error as exc:
            raise ConfigError(_reason(exc, self.path)) from exc

    # -- the stream ---------------------------------------------------------------------------

    def _offer(self, clients: list[Client], batch: list[tuple[int, str, str]],
               size: int = 0) -> None:
        for client in clients:
            try:
                client.loop.call_soon_threadsafe(self._fill, client, batch, size)
            except RuntimeError:  # its event loop has closed
                self._forget(client)

    def _fill(self, client: Client, batch: list[tuple[int, str, str]], size: int) -> None:
        """Runs on the client's event loop; `size` is the batch's characters."""
        if batch and not client.lagging:
            if client.size + size > client.limit:
                dropped = len(client.pending) + len(batch)
                client.pending.clear()
                client.size = 0
                client.lagging = True
                with self._lock:
                    self.counts.dropped += dropped
                    self._dropped.inc(dropped)
            else:
                client.pending.extend(batch)
                client.size += size
        client.wake.set()

    def _restart(self, client: Client) -> None:
        """Runs on the client's event loop: the client reads the new store from its start."""
        client.pending.clear()
        client.size = 0
        client.reset = client.lagging = True
        client.wake.set()

    def _forget(self, client: Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    async def stream(self, cursor: int | None = None, run_id: str | None = None
                     ) -> AsyncIterator[str]:
        """Server-sent events: `span` events (each with its store id as the SSE id) after
        `cursor` (default: from now on), of one run when `run_id` is given, and a `metrics` event
        every tick. Resuming with the last id received continues without a gap."""
        client = Client(asyncio.get_running_loop(), self.client_buffer)
        with self._lock:
            self._clients.append(client)
            live_from = self.cursor
        if cursor is None:
            cursor = live_from
        elif cursor > live_from and cursor > await asyncio.to_thread(self._last_stored):
            cursor = 0  # an id from a store that has since been replaced: start it again
            client.reset = True
        client.lagging = cursor < live_from
        seen_metrics = -1
        try:
            yield _sse("hello", json.dumps({"version": 1, "cursor": cursor}))
            while not self._stop.is_set():
                if client.reset:  # the store was replaced: its ids start again
                    client.reset, cursor = False, 0
                    yield _sse("reset", json.dumps({"cursor": 0}))
                if client.lagging:
                    client.lagging = False
                    try:
                        async for chunk, last in self._catch_up(cursor, run_id):
                            cursor = last
                            yield chunk
                    except (ConfigError, sqlite3.Error) as exc:  # say so, and try again
                        client.lagging = True
                        yield _sse("error", json.dumps({"message": _reason(exc, self.path)}))
                        await asyncio.sleep(1.0)
                        continue
                parts, size = [], 0
                while client.pending and size < CHUNK:
                    event_id, run, text = client.pending.popleft()
                    client.size -= len(text)
                    if event_id > cursor and (run_id is None or run == run_id):
                        parts.append(text)
                        size += len(text)
                    cursor = max(cursor, event_id)
                if self.metrics_version != seen_metrics:
                    seen_metrics = self.metrics_version
                    parts.append(_sse("metrics", self._live_json()))
                if parts:
                    self.counts.delivered += len(parts)
                    yield "".join(parts)
                client.wake.clear()
                if client.pending or client.lagging:
                    continue
                try:
                    await asyncio.wait_for(client.wake.wait(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
        finally:
            self._forget(client)

    async def _catch_up(self, cursor: int, run_id: str | None
                        ) -> AsyncIterator[tuple[str, int]]:
        """What a client missed after `cursor`, in chunks of at most about CHUNK characters:
        from the recent events' shared text while it reaches back that far, else from the
        store."""
        reader: TraceReader | None = None
        try:
            while True:
                hit = self._from_recent(cursor, run_id)
                if hit is not None:
                    chunk, cursor, done = hit
                    if chunk:
                        yield chunk, cursor
                    if done:
                        return
                    continue
                if reader is None:
                    reader = await asyncio.to_thread(self.reader)
                rows = await asyncio.to_thread(reader.events_after, cursor, CATCH_UP, run_id)
                if not rows:
                    return
                parts, size = [], 0
                for event_id, event in rows:
                    parts.append(_sse("span", self.payload(event_id, event), event_id))
                    size += len(parts[-1])
                    cursor = event_id
                    if size >= CHUNK:
                        break
                yield "".join(parts), cursor
        finally:
            if reader is not None:
                reader.close()

    def _from_recent(self, cursor: int, run_id: str | None) -> tuple[str, int, bool] | None:
        """Up to CHUNK characters of the events after `cursor` from the recent ones kept in
        memory, the last id they reach and whether that is all; None when they do not reach
        back to `cursor`."""
        with self._lock:
            if not self._recent or self._recent[0][0] > cursor + 1:
                return None
            parts, size, last = [], 0, cursor
            for event_id, run, text in self._recent:
                if event_id <= cursor:
                    continue
                if size >= CHUNK:
                    return "".join(parts), last, False
                if run_id is None or run == run_id:
                    parts.append(text)
                    size += len(text)
                last = event_id
            return "".join(parts), last, True

    def _last_stored(self) -> int:
        try:
            with self.reader() as reader:
                return reader.last_event_id()
        except (ConfigError, sqlite3.Error):
            return 0

    def _live_json(self) -> str:
        with self._lock:
            point = self.series[-1] if self.series else None
            live = self._live_gauges(max(self._now, time.time()))
            return json.dumps({
                "metrics": self._metrics(live).model_dump(),
                "health": self._health.model_dump(),
                "alerts": [_alert_view(a).model_dump() for a in self.alerts.alerts()
                           if a.state != "inactive"],
                "point": point.model_dump() if point else None,
                "source": self.source().model_dump()})


def _backend_kv(live: dict[tuple[str, str, tuple[tuple[str, str], ...]], float]
                ) -> dict[str, int]:
    """KV bytes held now by model, over the live processes."""
    found: dict[str, int] = {}
    for (_, name, labels), value in live.items():
        if name == "pyagent_kv_bytes":
            model = dict(labels).get("model", "")
            found[model] = found.get(model, 0) + int(value)
    return found


def _alert_view(alert: Any) -> AlertView:
    return AlertView(name=alert.name, state=alert.state, severity=alert.severity,
                     summary=alert.annotations.get("summary", ""),
                     labels=alert.rule.alert_labels(), value=alert.value,
                     active_since=alert.active_since)


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (give the data folder that runs write to)")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (no run has used it yet)")


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _sse(kind: str, data: str, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n"


def _reason(exc: Exception, path: Path) -> str:
    """One line saying why the store cannot be read."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return f"{path}: locked by another process ({text}); retrying"
    if isinstance(exc, ConfigError):
        return text
    return f"{path}: cannot be read ({text})"

