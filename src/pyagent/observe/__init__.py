"""Observability: events, the event bus and the trace store; importable by every layer."""
