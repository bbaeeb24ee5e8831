"""The `embedded` backend: PyAgent's in-process engine."""

from __future__ import annotations

from collections.abc import Iterator

from pyagent.engine.generate import Engine
from pyagent.types import Completion, CompletionRequest, StreamEvent


class EmbeddedBackend:
    """Runs requests on an `Engine` in this process (loaded on construction unless one is given)."""

    name = "embedded"

    def __init__(self, engine: Engine | None = None, model: str | None = None,
                 dtype: str = "float32"):
        self.engine = engine or Engine.load(model, dtype=dtype)

    def complete(self, request: CompletionRequest) -> Completion:
        return self.engine.generate(request)

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        return self.engine.stream(request)
