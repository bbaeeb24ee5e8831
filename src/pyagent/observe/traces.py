"""A SQLite trace store: every published event, and one row per span, in a versioned schema.

One connection guarded by a lock serves every thread; the file is in WAL mode so readers in other
processes (the observer, the miner) do not block the writer. A writer thread stores recorded
events in batches, one transaction each, so publishing an event never waits for the disk; queries
through the store first wait for what was recorded before them. A process killed hard loses at most
the batch in flight. Events get increasing ids in the order they were committed, whichever process
wrote them, so a reader tails the file by id.

The file also keeps `samples`: gauges (KV bytes held by an engine, requests waiting) that a
running process writes every second or so under its own source name.

`TraceReader` opens a file read-only and never changes it (no migration, no write);
`TraceStore` is the writer.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from pyagent.errors import ConfigError, PyAgentError
from pyagent.observe.events import KINDS, PHASES, Event, EventBus

log = logging.getLogger(__name__)

# Migration N (1-based) brings a file from schema version N - 1 to N; append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_id TEXT,
            kind TEXT NOT NULL, phase TEXT NOT NULL, name TEXT NOT NULL,
            timestamp REAL NOT NULL, attributes TEXT NOT NULL)""",
        "CREATE INDEX events_run ON events (run_id)",
        """CREATE TABLE spans (
            span_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, parent_id TEXT,
            kind TEXT NOT NULL, name TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'ok', 'error')),
            start_time REAL, end_time REAL, duration_s REAL, attributes TEXT NOT NULL)""",
        "CREATE INDEX spans_run ON spans (run_id, start_time)",
        "CREATE INDEX spans_parent ON spans (parent_id)",
    ),
    (  # spans of a killed attempt are closed as 'interrupted' when the run resumes
        """CREATE TABLE spans_v2 (
            span_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, parent_id TEXT,
            kind TEXT NOT NULL, name TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'ok', 'error', 'interrupted')),
            start_time REAL, end_time REAL, duration_s REAL, attributes TEXT NOT NULL)""",
        "INSERT INTO spans_v2 SELECT * FROM spans",
        "DROP TABLE spans",
        "ALTER TABLE spans_v2 RENAME TO spans",
        "CREATE INDEX spans_run ON spans (run_id, start_time)",
        "CREATE INDEX spans_parent ON spans (parent_id)",
    ),
    (  # gauges sampled by running processes (engine KV bytes, queue depth)
        """CREATE TABLE samples (
            id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, timestamp REAL NOT NULL,
            name TEXT NOT NULL, labels TEXT NOT NULL, value REAL NOT NULL)""",
        "CREATE INDEX samples_time ON samples (timestamp)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
WRITE_BATCH = 2000  # events stored in one transaction at most
UNREADABLE = "pyagent.unreadable"  # what a damaged stored event says about itself
MAX_NESTING = 32  # levels of attribute values kept; deeper ones are stored as text
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = re.compile(r"(?<!\\)\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})"
                             r"|(?<!\\ud[89ab][0-9a-f]{2})(?<!\\)\\ud[c-f][0-9a-f]{2}",
                             re.IGNORECASE)
MAX_PENDING = 100_000  # events queued for the writer before `record` waits
MAX_DEPTH = 1000  # bound on lineage walks, so a damaged parent chain cannot loop forever
STATUS = {"start": "running", "end": "ok", "error": "error", "interrupted": "interrupted"}
SPAN_COLUMNS = ("span_id, run_id, parent_id, kind, name, status, start_time, end_time, duration_s, "
                "attributes")


@dataclass(frozen=True)
class SpanRecord:
    """One stored span; `attributes` merges those of its start and closing events."""

    span_id: str
    run_id: str
    parent_id: str | None
    kind: str
    name: str
    status: str
    start: float | None
    end: float | None
    duration_s: float | None
    attributes: dict[str, Any]


@dataclass(frozen=True)
class RunRecord:
    """One run, from its `run` span(s): first start, and end and status of the latest one."""

    run_id: str
    name: str
    start: float | None
    end: float | None
    status: str


@dataclass(frozen=True)
class RunTotals:
    """Token usage summed over a run's LLM calls, and counts of its calls and failed spans."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int
    llm_calls: int
    tool_calls: int
    errors: int


@dataclass(frozen=True)
class Sample:
    """One gauge reading a process wrote: `source` names the process (host:pid), `labels` the
    series (the engine's model, for instance)."""

    id: int
    source: str
    timestamp: float
    name: str
    labels: dict[str, str]
    value: float


class TraceReader:
    """Answers questions about runs and spans in a trace store file, opened read-only: it never
    migrates or writes the file, so any number of readers can tail a store that running
    processes write.

    While no writer has the file open (it is in WAL mode and has no `-wal` side file), the file
    is opened as immutable, so reading it creates nothing next to it; `stale` then turns true
    once a writer appears, and the caller opens a new reader that follows the writer's log. A
    file in another journal mode is read with SQLite's locks (a writer's lock makes reads fail
    as locked)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no trace store there (no run has written to it)")
        self._wal = self.path.with_name(self.path.name + "-wal")
        self.immutable = _in_wal_mode(self.path) and not self._wal.exists()
        self._stat = _stat(self.path)
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro" + (
            "&immutable=1" if self.immutable else "")
        try:
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open the trace store ({exc})") from exc
        self._prepare("PRAGMA busy_timeout = 2000", check=self._check_version)

    def _prepare(self, *pragmas: str, check: Callable[[], None]) -> None:
        """Set `pragmas` on the new connection and run `check`; on failure, close the file and
        raise a ConfigError saying why."""
        try:
            for pragma in pragmas:
                self._conn.execute(pragma)
            check()
        except ConfigError:
            self._conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if "locked" in str(exc):
                raise ConfigError(f"{self.path}: locked by another process ({exc}); "
                                  "retrying") from exc
            raise ConfigError(f"{self.path}: not a readable trace store ({exc})") from exc

    def _check_version(self) -> None:
        tables = {row[0] for row in self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables or "events" not in tables:
            raise ConfigError(f"{self.path}: not a trace store (no schema_version and events "
                              "tables)")
        version = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if not isinstance(version, int):
            raise ConfigError(f"{self.path}: not a readable trace store (its schema_version "
                              "table holds no version)")
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{self.path}: trace store schema version {version} is not one "
                              f"this PyAgent reads (1 to {SCHEMA_VERSION}); open it with a "
                              "newer PyAgent")
        self._has_samples = "samples" in tables

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        with self._lock:
            return self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    @property
    def stale(self) -> bool:
        """True when this reader may miss new data: it opened the file as immutable and a writer
        has opened it since, or the file was replaced."""
        if self.immutable:
            return self._wal.exists() or _stat(self.path) != self._stat
        return _stat(self.path)[:1] != self._stat[:1]

    def last_event_id(self) -> int:
        """The id of the newest stored event (0 when there is none)."""
        return self._query("SELECT COALESCE(MAX(id), 0) FROM events")[0][0]

    def events_after(self, cursor: int, limit: int = 1000,
                     run_id: str | None = None) -> list[tuple[int, Event]]:
        """Up to `limit` events stored after event id `cursor` (of one run when given), oldest
        first, each with its id."""
        where, params = ("id > ? AND run_id = ?", (cursor, run_id)) if run_id else (
            "id > ?", (cursor,))
        rows = self._query(
            "SELECT id, kind, phase, name, run_id, span_id, parent_id, timestamp, attributes "
            f"FROM events WHERE {where} ORDER BY id LIMIT ?", *params, limit)
        return [(row[0], _event(row[1:])) for row in rows]

    def samples_after(self, cursor: int, limit: int = 5000) -> list[Sample]:
        """Up to `limit` gauge samples stored after sample id `cursor`, oldest first."""
        if not self._has_samples:
            return []
        rows = self._query("SELECT id, source, timestamp, name, labels, value FROM samples "
                           "WHERE id > ? ORDER BY id LIMIT ?", cursor, limit)
        return [Sample(row[0], row[1], row[2], row[3], _loads(row[4]), row[5])
                for row in rows]

    def runs(self) -> list[RunRecord]:
        """Every run that has a `run` span, newest first."""
        rows = self._query(
            """SELECT run_id, name, first_start, end_time, status FROM (
                   SELECT run_id, name, end_time, status,
                          MIN(start_time) OVER (PARTITION BY run_id) AS first_start,
                          ROW_NUMBER() OVER (PARTITION BY run_id
                                             ORDER BY start_time DESC, rowid DESC) AS newest
                   FROM spans WHERE kind = 'run')
               WHERE newest = 1 ORDER BY first_start DESC""")
        return [RunRecord(*row) for row in rows]

    def spans(self, run_id: str) -> list[SpanRecord]:
        """The spans of one run, in the order they started."""
        return self._spans("WHERE run_id = ? ORDER BY start_time, rowid", run_id)

    def children(self, span_id: str) -> list[SpanRecord]:
        """The spans directly under `span_id`, in the order they started."""
        return self._spans("WHERE parent_id = ? ORDER BY start_time, rowid", span_id)

    def lineage(self, span_id: str) -> list[SpanRecord]:
        """The chain from the outermost ancestor (the run) down to `span_id` itself."""
        rows = self._query(
            f"""WITH RECURSIVE chain (span_id, depth) AS (
                    SELECT ?, 0
                    UNION ALL
                    SELECT s.parent_id, c.depth + 1 FROM chain c JOIN spans s USING (span_id)
                    WHERE s.parent_id IS NOT NULL AND c.depth < {MAX_DEPTH})
                SELECT {SPAN_COLUMNS} FROM spans JOIN chain USING (span_id)
                ORDER BY chain.depth DESC""",
            span_id)
        return [_span(row) for row in rows]

    def events(self, run_id: str) -> list[Event]:
        """The events of one run, in the order they were stored."""
        rows = self._query(
            "SELECT kind, phase, name, run_id, span_id, parent_id, timestamp, attributes "
            "FROM events WHERE run_id = ? ORDER BY id", run_id)
        return [_event(row) for row in rows]

    def totals(self, run_id: str) -> RunTotals:
        """Tokens over the run's LLM-call spans, number of LLM and tool calls, failed spans."""
        spans = self.spans(run_id)
        llm = [s.attributes for s in spans if s.kind == "llm_call"]
        return RunTotals(
            input_tokens=sum(_count(a, "gen_ai.usage.input_tokens") for a in llm),
            output_tokens=sum(_count(a, "gen_ai.usage.output_tokens") for a in llm),
            cached_tokens=sum(_count(a, "pyagent.usage.cached_tokens") for a in llm),
            llm_calls=len(llm),
            tool_calls=sum(s.kind == "tool_call" for s in spans),
            errors=sum(s.status == "error" for s in spans))

    def _spans(self, where: str, value: str) -> list[SpanRecord]:
        return [_span(row) for row in self._query(f"SELECT {SPAN_COLUMNS} FROM spans {where}",
                                                  value)]

    def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the file; calling it again is harmless."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class TraceStore(TraceReader):
    """Persists events from an `EventBus` (and gauge samples) and answers questions about runs
    and spans; creates the file, or migrates it to the current schema."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._detach: list[Callable[[], None]] = []
        self._has_samples = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"{self.path}: cannot open the trace store ({exc})") from exc
        self._prepare("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", check=self._migrate)
        self._cond = threading.Condition()
        self._pending: deque[Event] = deque()
        self._queued = self._stored = 0
        self._closed = False
        self._open_spans: dict[str, tuple[float, Any]] = {}  # the writer thread's
        self._writer = threading.Thread(target=self._write_loop, name="pyagent-traces",
                                        daemon=True)
        self._writer.start()
        atexit.register(self.flush)

    def _migrate(self) -> None:
        with self._transaction("BEGIN IMMEDIATE") as conn:
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
            if "schema_version" not in tables:
                if tables:
                    raise ConfigError(f"{self.path}: not a trace store (it holds tables "
                                      f"{', '.join(sorted(tables))} but no schema_version)")
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version VALUES (0)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] if row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(f"{self.path}: trace store schema version {version} is newer "
                                  f"than version {SCHEMA_VERSION}, the newest this PyAgent reads; "
                                  "open it with a newer PyAgent")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @contextmanager
    def _transaction(self, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
        self._conn.execute(begin)
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # some failures end the transaction themselves
                self._conn.execute("ROLLBACK")
            raise

    def attach(self, bus: EventBus) -> Callable[[], None]:
        """Store every event `bus` publishes from now on; returns the function that stops it."""
        unsubscribe = bus.subscribe(self.record)
        with self._lock:
            self._detach.append(unsubscribe)
        return unsubscribe

    def record(self, event: Event) -> None:
        """Queue one event for the writer thread, which stores it and folds it into its span's
        row (waits only while MAX_PENDING events are already queued)."""
        for name in ("run_id", "span_id", "name"):
            if not isinstance(getattr(event, name), str):
                raise PyAgentError(f"{event.kind} event {event.name!r}: its {name} must be a "
                                   f"string, got {getattr(event, name)!r}")
        if not isinstance(event.attributes, dict):
            raise PyAgentError(f"{event.kind} event {event.name!r}: its attributes must be a "
                               f"dict, got {type(event.attributes).__name__}")
        if not all(map(_is_text, (event.run_id, event.span_id, event.name))):
            event = replace(event, run_id=clean_text(event.run_id),
                            span_id=clean_text(event.span_id), name=clean_text(event.name))
        with self._cond:
            if self._closed:
                raise ConfigError(f"{self.path}: the trace store is closed")
            while len(self._pending) >= MAX_PENDING and self._writer.is_alive():
                self._cond.wait(0.1)
            self._pending.append(event)
            self._queued += 1
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every event recorded so far is stored."""
        with self._cond:
            target = self._queued
            while self._stored < target and self._writer.is_alive():
                self._cond.wait(0.1)

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = [self._pending.popleft()
                         for _ in range(min(WRITE_BATCH, len(self._pending)))]
            try:
                with self._lock, self._transaction() as conn:
                    _store(conn, batch, self._open_spans)
            except Exception:  # store them one by one: only the events that fail are lost
                for event in batch:
                    try:
                        with self._lock, self._transaction() as conn:
                            _store(conn, [event], self._open_spans)
                    except Exception:  # the writer goes on, and the log says what was lost
                        log.exception("%s: could not store the %s event of span %s",
                                      self.path, event.phase, event.span_id)
            with self._cond:
                self._stored += len(batch)
                self._cond.notify_all()

    def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        self.flush()
        return super()._query(sql, *params)

    def interrupt(self, run_id: str, bus: EventBus) -> int:
        """Close the spans of `run_id` still open (their process died) as `interrupted`,
        through `bus`, at the last moment the run was seen alive; returns how many."""
        self.flush()
        with self._lock:
            last = self._conn.execute("SELECT MAX(timestamp) FROM events WHERE run_id = ?",
                                      (run_id,)).fetchone()[0]
        open_spans = [s for s in self.spans(run_id) if s.status == "running"]
        for span in reversed(open_spans):  # innermost first, as a live run would close them
            seen = max(last or span.start or 0.0, span.start or 0.0)
            bus.publish(Event(span.kind, "interrupted", span.name, run_id, span.span_id,
                              span.parent_id, seen,
                              {"duration_s": seen - (span.start or seen),
                               "error.type": "Interrupted",
                               "exception.message": "the process running it died"}))
        return len(open_spans)

    def record_samples(self, source: str, timestamp: float,
                       values: Iterable[tuple[str, dict[str, str], float]],
                       keep_s: float | None = None) -> None:
        """Store one reading of gauges `(name, labels, value)` from `source`; with `keep_s`,
        drop this source's samples older than that many seconds."""
        rows = [(source, timestamp, name, _dumps(labels), float(value))
                for name, labels, value in values]
        with self._lock, self._transaction() as conn:
            conn.executemany("INSERT INTO samples (source, timestamp, name, labels, value) "
                             "VALUES (?, ?, ?, ?, ?)", rows)
            if keep_s is not None:
                conn.execute("DELETE FROM samples WHERE source = ? AND timestamp < ?",
                             (source, timestamp - keep_s))

    def close(self) -> None:
        """Stop listening to every attached bus, store what is queued and close the file;
        calling it again is harmless."""
        with self._lock:
            detach, self._detach = self._detach, []
        for unsubscribe in detach:
            unsubscribe()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        atexit.unregister(self.flush)
        super().close()

    def __enter__(self) -> TraceStore:
        return self


def _store(conn: sqlite3.Connection, events: list[Event],
           open_spans: dict[str, tuple[float, Any]]) -> None:
    """Insert events and fold each into its span's row; `open_spans` remembers the start time
    and attributes of spans this writer opened, so closing them needs no read."""
    event_rows, span_rows = [], {}  # a span started and ended in this batch: one row
    for event in events:
        attributes = _dumps(event.attributes)
        event_rows.append((event.run_id, event.span_id, event.parent_id, event.kind, event.phase,
                           event.name, event.timestamp, attributes))
        if event.phase == "start":
            start, end, duration = event.timestamp, None, None
            if len(open_spans) >= MAX_PENDING:
                del open_spans[next(iter(open_spans))]
            open_spans[event.span_id] = (start, event.attributes)
        else:
            row = open_spans.pop(event.span_id, None)
            if row is None:
                stored = conn.execute("SELECT start_time, attributes FROM spans "
                                      "WHERE span_id = ?", (event.span_id,)).fetchone()
                row = (stored[0], json.loads(stored[1])) if stored else None
            end = event.timestamp
            duration = event.attributes.get("duration_s")
            start = row[0] if row else end - (duration or 0.0)
            if row:
                attributes = _dumps({**row[1], **event.attributes})
        span_rows[event.span_id] = (event.span_id, event.run_id, event.parent_id, event.kind,
                                    event.name, STATUS[event.phase], start, end, duration,
                                    attributes)
    conn.executemany(
        "INSERT INTO events (run_id, span_id, parent_id, kind, phase, name, timestamp, "
        "attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", event_rows)
    conn.executemany(
        f"INSERT INTO spans ({SPAN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (span_id) DO UPDATE SET status = excluded.status, "
        "start_time = excluded.start_time, end_time = excluded.end_time, "
        "duration_s = excluded.duration_s, attributes = excluded.attributes",
        list(span_rows.values()))


def _is_text(text: str) -> bool:
    return clean_text(text) is text


def _in_wal_mode(path: Path) -> bool:
    """Whether the database header says WAL (its read and write format bytes are 2)."""
    try:
        with path.open("rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02"


def _stat(path: Path) -> tuple[int, int, int]:
    """Inode, size and modification time of `path` (zeros when it is gone)."""
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _dumps(attributes: dict[str, Any]) -> str:
    """Attributes as strict JSON that any reader can load and show: values JSON cannot hold
    (sets, bytes, objects) as text, NaN and infinities as null, lone surrogates (from names
    that are not UTF-8) as U+FFFD; values with keys that are not text, cycles or nesting
    deeper than MAX_NESTING are kept down to that depth, with text keys."""
    try:
        text = json.dumps(attributes, default=str, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(_plain(attributes, MAX_NESTING), default=str)
    if "\\ud" in text:
        text = _LONE_SURROGATE.sub(r"\\ufffd", text)
    return text


def _plain(value: Any, depth: int) -> Any:
    """`value` with string keys, finite numbers and at most `depth` levels of nesting."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict | list | tuple | set | frozenset):
        if depth <= 0:
            return f"[{type(value).__name__} nested too deep]"
        if isinstance(value, dict):
            return {str(key): _plain(item, depth - 1) for key, item in value.items()}
        return [_plain(item, depth - 1) for item in value]
    return value


def clean_text(text: str) -> str:
    """`text` with lone surrogates (from bytes that are not UTF-8) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _count(attributes: dict[str, Any], key: str) -> int:
    value = attributes.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _span(row: tuple[Any, ...]) -> SpanRecord:
    return SpanRecord(*row[:9], _loads(row[9]))


def _loads(text: Any) -> dict[str, Any]:
    """Stored attributes; a damaged value reads as an attribute saying so, never an error."""
    try:
        found = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return {UNREADABLE: "the stored attributes are not JSON"}
    return found if isinstance(found, dict) else {UNREADABLE: "the stored attributes are not "
                                                              "an object"}


def _event(row: tuple[Any, ...]) -> Event:
    """An event from its stored columns; damaged columns read as text and an attribute."""
    kind, phase = row[0], row[1]
    attributes = _loads(row[7])
    if kind not in KINDS or phase not in PHASES:
        attributes[UNREADABLE] = f"stored kind {kind!r} and phase {phase!r}"
        kind, phase = ("run" if kind not in KINDS else kind), ("end" if phase not in PHASES
                                                               else phase)
    return Event(kind, phase, *(str(value) for value in row[2:4]),  # type: ignore[arg-type]
                 str(row[4]), None if row[5] is None else str(row[5]),
                 float(row[6]) if isinstance(row[6], int | float) else 0.0, attributes)
