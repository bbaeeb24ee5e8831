"""Events the runtime emits for every run, step, agent invocation, LLM call and tool call.

Span names and attribute keys follow the OpenTelemetry GenAI semantic conventions where they exist
(`invoke_agent coder`, `execute_tool read_file`, `chat gemma-3-270m`, `gen_ai.usage.input_tokens`,
`error.type`); PyAgent's own keys live under `pyagent.` (`pyagent.usage.cached_tokens`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, get_args

from pyagent.errors import PyAgentError

EventKind = Literal["run", "step", "agent", "llm_call", "tool_call", "goal"]
Phase = Literal["start", "end", "error", "interrupted"]
KINDS: tuple[str, ...] = get_args(EventKind)
PHASES: tuple[str, ...] = get_args(Phase)

Subscriber = Callable[["Event"], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One point in a span's life: its `start`, its `end`, its `error` (an end that failed), or
    `interrupted` (closed after its process died, when the run resumed)."""

    kind: EventKind
    phase: Phase
    name: str
    run_id: str
    span_id: str
    parent_id: str | None
    timestamp: float
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PyAgentError(f"event kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.phase not in PHASES:
            raise PyAgentError(f"event phase must be one of {', '.join(PHASES)}, "
                               f"got {self.phase!r}")


class Span:
    """A timed unit of work: publishes `start` when entered, then `end` or `error` when left.

    Attributes added with `set` / `update` before the span ends go out with its closing event,
    which carries every attribute plus `duration_s` (and `error.type`, `exception.message` on
    failure). `child` opens a nested span with this one as its explicit parent.
    """

    def __init__(self, bus: EventBus, kind: EventKind, name: str, run_id: str,
                 parent_id: str | None, attributes: Mapping[str, Any]):
        self.bus = bus
        self.kind = kind
        self.name = name
        self.run_id = run_id
        self.parent_id = parent_id
        self.span_id = uuid.uuid4().hex[:16]
        self.attributes = dict(attributes)
        self._lock = threading.Lock()
        self._started: float | None = None
        self._ended = False

    def set(self, key: str, value: Any) -> Span:
        """Add or replace one attribute; returns the span for chaining."""
        self.attributes[key] = value
        return self

    def update(self, attributes: Mapping[str, Any]) -> Span:
        """Add or replace several attributes; returns the span for chaining."""
        self.attributes.update(attributes)
        return self

    def child(self, kind: EventKind, name: str, **attributes: Any) -> Span:
        """A new, not yet started span of the same run whose parent is this span."""
        return self.bus.span(kind, name, self.run_id, parent=self, **attributes)

    def start(self) -> Span:
        """Publish the `start` event; for work that cannot sit inside one `with` block."""
        with self._lock:
            if self._started is not None:
                raise PyAgentError(f"span {self.name!r} was already started")
            self._started = time.perf_counter()
        self._publish("start", dict(self.attributes))
        return self

    def end(self, error: BaseException | None = None) -> None:
        """Publish `end`, or `error` when `error` is given; later calls do nothing."""
        with self._lock:
            if self._started is None:
                raise PyAgentError(f"span {self.name!r} ended before it started")
            if self._ended:
                return
            self._ended = True
        attributes = {**self.attributes, "duration_s": time.perf_counter() - self._started}
        if error is None:
            self._publish("end", attributes)
            return
        attributes["error.type"] = type(error).__qualname__
        attributes["exception.message"] = str(error)
        self._publish("error", attributes)

    def _publish(self, phase: Phase, attributes: dict[str, Any]) -> None:
        self.bus.publish(Event(self.kind, phase, self.name, self.run_id, self.span_id,
                               self.parent_id, time.time(), attributes))

    def __enter__(self) -> Span:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.end(exc)


class EventBus:
    """Fans events out to subscribers; safe to publish and subscribe from any thread.

    Subscribers run in the publishing thread, so they may run concurrently when several threads
    publish; a subscriber that raises is logged and the others still receive the event.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Register `callback` for every event; returns a function that unregisters it."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                for index, subscriber in enumerate(self._subscribers):
                    if subscriber is callback:
                        self._subscribers = (*self._subscribers[:index],
                                             *self._subscribers[index + 1:])
                        return

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Hand `event` to every subscriber registered when the call began."""
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %s event of %r",
                              subscriber, event.phase, event.name)

    def span(self, kind: EventKind, name: str, run_id: str, parent: Span | str | None = None,
             **attributes: Any) -> Span:
        """A new span, started when entered as a context manager (or by `Span.start`).

        `parent` is the enclosing span or its id; dotted attribute names go in as
        `**{"gen_ai.agent.name": "coder"}`.
        """
        parent_id = parent.span_id if isinstance(parent, Span) else parent
        return Span(self, kind, name, run_id, parent_id, attributes)
