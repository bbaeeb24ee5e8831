"""A run's workspace travels with its checkpoints, so a run resumes on another node with the
files exactly as its last checkpoint saw them (a step killed half-way may have edited some).

`WorkspaceCheckpoints` wraps any `CheckpointStore`: each put adds the workspace as a gzipped tar
(base64) under `state["workspace_files"]`; `restore` rebuilds the folder from a checkpoint.
Caches (`__pycache__`, `.pytest_cache`) stay behind; a workspace above `MAX_BYTES` packed is
refused with a clear error (put such workspaces on storage every node shares).
"""

from __future__ import annotations

import base64
import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

from pyagent.errors import ConfigError
from pyagent.resilience.checkpoint import Checkpoint, CheckpointStore

KEY = "workspace_files"
MAX_BYTES = 16 << 20
SKIPPED = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def pack(folder: Path) -> str:
    """The folder's files as a gzipped tar in base64 (names relative, sorted, no mtimes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if SKIPPED & set(relative.parts) or not (path.is_file() or path.is_dir()):
                continue
            info = tar.gettarinfo(str(path), arcname=str(relative))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_file():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
            if buffer.tell() > MAX_BYTES:
                raise ConfigError(f"workspace {folder} is over {MAX_BYTES >> 20} MiB packed: too "
                                  "large to travel with checkpoints; use storage every node "
                                  "shares")
    return base64.b64encode(buffer.getvalue()).decode()


def unpack(text: str, folder: Path) -> None:
    """Make `folder` hold exactly the files `text` (from `pack`) holds."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(text)), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")


class WorkspaceCheckpoints:
    """A `CheckpointStore` whose puts carry `workspace`'s files."""

    def __init__(self, inner: CheckpointStore, workspace: Path):
        self.inner, self.workspace = inner, workspace
        self._restored: dict[str, Checkpoint] = {}

    def put(self, run_id: str, seq: int, state: dict[str, Any]) -> Checkpoint:
        self._restored.pop(run_id, None)
        return self.inner.put(run_id, seq, {**state, KEY: pack(self.workspace)})

    def restore(self, run_id: str) -> Checkpoint | None:
        """Rebuild the workspace from `run_id`'s latest checkpoint (None: it has none); until
        the next put, that checkpoint is the latest this store reports, so the state a run
        resumes from is the one its files came from."""
        checkpoint = self.inner.get(run_id)
        if checkpoint is not None and KEY in checkpoint.state:
            unpack(checkpoint.state[KEY], self.workspace)
            self._restored[run_id] = checkpoint
        return checkpoint

    def get(self, run_id: str, seq: int | None = None) -> Checkpoint | None:
        restored = self._restored.get(run_id)
        if restored is not None and seq in (None, restored.seq):
            return restored
        return self.inner.get(run_id, seq)

    def list(self, run_id: str) -> list[Checkpoint]:
        return self.inner.list(run_id)

    def runs(self) -> list[str]:
        return self.inner.runs()

    def delete_run(self, run_id: str) -> None:
        self.inner.delete_run(run_id)

    def close(self) -> None:
        self.inner.close()
