"""The `embedded` backend: PyAgent's in-process engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from pyagent.engine.generate import Engine
from pyagent.types import Completion, CompletionRequest, StreamEvent


class EmbeddedBackend:
    """Runs requests on an `Engine` in this process (loaded on construction unless one is given)."""

    name = "embedded"

    def __init__(self, engine: Engine | None = None, model: str | None = None,
                 dtype: str = "auto"):
        self.engine = engine or Engine.load(model, dtype=dtype)

    def complete(self, request: CompletionRequest) -> Completion:
        return self.engine.generate(request)

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        return self.engine.stream(request)

    async def acomplete(self, request: CompletionRequest) -> Completion:
        """Run `request` from an event loop: the engine's scheduler serves it with the others
        in flight, and no thread waits for it."""
        completion = None
        async for event in self.engine.submit(request, asyncio.get_running_loop()):
            completion = event.completion or completion
        assert completion is not None
        return completion
