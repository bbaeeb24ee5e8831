"""One embedded engine per node, shared by every run on that node: requests from all its agents
meet in one scheduler, so batching and prefix sharing work as they do in one process.

The engine is a threaded actor pinned to its node and named for the node and the model; the first
run on a node that needs it starts it. It lives until the supervisor ends the batch
(`stop_engines`). `RayEngineBackend` is the `Backend` that agents on the node use; it streams
through Ray's streaming generators.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pyagent.cluster.connect import NAMESPACE
from pyagent.errors import PyAgentError
from pyagent.types import Completion, CompletionRequest, StreamEvent

ENGINE_PREFIX = "engine-"
CONCURRENCY = 64  # requests in flight per node engine (its scheduler batches them)


class NodeEngine:
    """The actor's class: an `Engine` loaded on this node."""

    def __init__(self, model: str, dtype: str):
        from pyagent.engine.generate import Engine

        self.engine = Engine.load(model, dtype=dtype)

    def complete(self, request: CompletionRequest) -> Completion:
        return self.engine.generate(request)

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        yield from self.engine.stream(request)


def engine_name(node_id: str, model: str, dtype: str) -> str:
    digest = hashlib.sha256(f"{model}|{dtype}".encode()).hexdigest()[:12]
    return f"{ENGINE_PREFIX}{node_id}-{digest}"


def node_engine(model: str, dtype: str = "float32") -> Any:
    """The handle of this node's engine for `model`, started if it is not running."""
    node = ray.get_runtime_context().get_node_id()
    return ray.remote(NodeEngine).options(
        name=engine_name(node, model, dtype), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True, num_cpus=0, max_concurrency=CONCURRENCY, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(model, dtype)


def stop_engines(nodes: list[str], model: str, dtype: str = "float32") -> int:
    """End the engines for `model` on `nodes`; how many were running."""
    stopped = 0
    for node in nodes:
        try:
            ray.kill(ray.get_actor(engine_name(node, model, dtype), namespace=NAMESPACE))
            stopped += 1
        except ValueError:
            continue
    return stopped


class RayEngineBackend:
    """The embedded backend through this node's shared engine actor."""

    name = "embedded"

    def __init__(self, handle: Any):
        self.handle = handle

    def complete(self, request: CompletionRequest) -> Completion:
        return _unwrapped(lambda: ray.get(self.handle.complete.remote(request)))

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        refs = self.handle.stream.remote(request)
        for ref in refs:
            yield _unwrapped(lambda ref=ref: ray.get(ref))


def _unwrapped(call: Any) -> Any:
    """Run `call`; a PyAgent error raised in the engine comes back as itself, not wrapped."""
    try:
        return call()
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, PyAgentError):
            raise cause from None
        raise
