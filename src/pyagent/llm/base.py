"""The `Backend` seam: everything that turns a `CompletionRequest` into a `Completion`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from pyagent.errors import BackendError
from pyagent.types import Completion, CompletionRequest, StreamEvent


@runtime_checkable
class Backend(Protocol):
    """A source of completions. `stream` yields text deltas; its last event holds the Completion."""

    name: str

    def complete(self, request: CompletionRequest) -> Completion: ...

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]: ...


def collect(events: Iterator[StreamEvent]) -> Completion:
    """Drain a stream and return its final `Completion`."""
    completion = None
    for event in events:
        completion = event.completion or completion
    if completion is None:
        raise BackendError("the stream ended without a completion")
    return completion
