"""Prompt compression for long runs: old tool results shrink to their first line.

Before each step, every tool result except the `keep_recent` newest, if longer than `min_chars`,
is replaced by its first line and a note of how much was cut. The change is written into the run's
transcript (and so into its checkpoints), so every later prompt sees the same shortened history:
the engine's prefix cache and a provider's prompt cache stay valid from there on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyagent.errors import ConfigError

MARK = "[... {count} more characters of this old tool result were elided]"


@dataclass(frozen=True)
class Compaction:
    keep_recent: int = 2
    min_chars: int = 200

    def __post_init__(self) -> None:
        if self.keep_recent < 0 or self.min_chars < 1:
            raise ConfigError(f"compaction needs keep_recent >= 0 and min_chars >= 1, got {self}")

    def apply(self, transcript: list[dict[str, Any]]) -> int:
        """Shorten old tool results in place; the number of characters removed."""
        results = [m for m in transcript if m["role"] == "tool"]
        old = results[:len(results) - self.keep_recent] if self.keep_recent else results
        removed = 0
        for message in old:
            content = message["content"]
            if len(content) <= self.min_chars or content.endswith("elided]"):
                continue
            head = content.split("\n", 1)[0][:self.min_chars]
            message["content"] = f"{head}\n{MARK.format(count=len(content) - len(head))}"
            removed += len(content) - len(message["content"])
        return removed
