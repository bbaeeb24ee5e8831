"""Backends by name: adding a backend is one module and one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyagent.errors import ConfigError
from pyagent.llm.base import Backend


def _embedded(**options: Any) -> Backend:
    from pyagent.llm.embedded import EmbeddedBackend

    return EmbeddedBackend(**options)


def _openai(**options: Any) -> Backend:
    from pyagent.llm.openai import OpenAIBackend

    return OpenAIBackend(**options)


def _replay(**options: Any) -> Backend:
    from pyagent.llm.replay import ReplayBackend

    return ReplayBackend(**options)


BACKENDS: dict[str, Callable[..., Backend]] = {
    "embedded": _embedded,
    "openai": _openai,
    "replay": _replay,
}


def make_backend(kind: str, **options: Any) -> Backend:
    """Build the backend called `kind` with its own options."""
    try:
        factory = BACKENDS[kind]
    except KeyError:
        raise ConfigError(
            f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}") from None
    return factory(**options)
