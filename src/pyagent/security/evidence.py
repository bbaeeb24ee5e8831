"""Collecting `Evidence`: the tool calls and model calls a run's spans record, and what changed
on disk."""

from __future__ import annotations

from pathlib import Path

from pyagent.observe.events import Event, EventBus
from pyagent.security.judges import Evidence, ToolEvent


class Recorder:
    """Records the tool calls, model calls and detector flags of the spans a bus publishes."""

    def __init__(self, bus: EventBus) -> None:
        self.tools: list[ToolEvent] = []
        self.llm_calls = 0
        self.flagged = 0
        self.detach = bus.subscribe(self._on)

    def _on(self, event: Event) -> None:
        if event.phase not in ("end", "error"):
            return
        attributes = event.attributes
        if event.kind == "tool_call":
            error = attributes.get("exception.message") if event.phase == "error" else None
            self.tools.append(ToolEvent(str(attributes.get("gen_ai.tool.name", "")),
                                        str(attributes.get("gen_ai.tool.call.arguments", "")),
                                        str(attributes.get("gen_ai.tool.call.result", "")),
                                        None if error is None else str(error)))
        elif event.kind == "llm_call":
            self.llm_calls += 1
        elif event.kind in ("agent", "step"):  # tool results; results a step's instruction quotes
            self.flagged += int(attributes.get("pyagent.defense.flagged", 0))

    def evidence(self, answers: list[str], written: dict[str, str], escaped: list[str],
                 run: dict | None = None, before: dict[str, str] | None = None) -> Evidence:
        return Evidence(list(self.tools), answers, written, escaped, run, self.llm_calls,
                        self.flagged, before or {})


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> its bytes)."""
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file() and not path.is_symlink()}


def changed(root: Path, before: dict[str, bytes]) -> dict[str, str]:
    """The files under `root` created or changed since `before`, with their text."""
    return {path: data.decode(errors="replace") for path, data in snapshot(root).items()
            if before.get(path) != data}


def earlier(before: dict[str, bytes], written: dict[str, str]) -> dict[str, str]:
    """The text the changed files in `written` held in `before` (new files: none)."""
    return {path: before[path].decode(errors="replace") for path in written if path in before}
