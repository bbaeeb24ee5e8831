"""A batch of tasks from a file: one task per line, or JSON lines `{"task": ..., "id": ...}`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pyagent.errors import ConfigError
from pyagent.fleet.orchestrator import RUN_ID


@dataclass(frozen=True)
class BatchTask:
    run_id: str
    task: str


def load_tasks(path: Path, prefix: str) -> list[BatchTask]:
    """The tasks in `path`, each with its run id (its `id`, else `PREFIX-N`); blank lines and
    lines starting with '#' are skipped. A bad line is a `ConfigError` naming its number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--tasks {path}: cannot read: {getattr(exc, 'strerror', None) or exc}"
                          ) from None
    tasks: list[BatchTask] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        run_id = f"{prefix}-{len(tasks) + 1}"
        if text.startswith("{"):
            try:
                entry = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON ({exc})") from None
            task = entry.get("task")
            if not isinstance(task, str) or not task.strip():
                raise ConfigError(f"{path}:{number}: a JSON line needs a non-empty \"task\" "
                                  "string")
            run_id = entry.get("id", run_id)
            if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
                raise ConfigError(f"{path}:{number}: id {run_id!r} must be 1 to 128 letters, "
                                  "digits, '.', '_' or '-', starting with a letter or digit")
            text = task
        if run_id in {t.run_id for t in tasks}:
            raise ConfigError(f"{path}:{number}: run id {run_id!r} appears twice")
        tasks.append(BatchTask(run_id, text))
    if not tasks:
        raise ConfigError(f"--tasks {path}: no tasks in it")
    return tasks
