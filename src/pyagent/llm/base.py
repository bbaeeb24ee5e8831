"""The `Backend` seam: everything that turns a `CompletionRequest` into a `Completion`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from pyagent.types import Completion, CompletionRequest, StreamEvent


@runtime_checkable
class Backend(Protocol):
    """A source of completions. `stream` yields text deltas; its last event holds the Completion."""

    name: str

    def complete(self, request: CompletionRequest) -> Completion: ...

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]: ...


def collect(events: Iterator[StreamEvent]) -> Completion:
    """Drain a stream and return its final `Completion`."""
    last = None
    for last in events:  # noqa: B007 - only the last event matters
        pass
    if last is None or last.completion is None:
        raise RuntimeError("stream ended without a completion")
    return last.completion
