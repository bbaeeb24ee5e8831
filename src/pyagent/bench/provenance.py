"""Where a benchmark result came from: command, commit, date, machine and library versions."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil


def git_state(root: Path) -> dict[str, Any]:
    """The commit checked out at `root` and whether the tree has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpuinfo(key: str) -> str | None:
    """The first value of `key` in /proc/cpuinfo (None where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def machine() -> dict[str, Any]:
    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    return {"cpu": cpu, "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "memory_gib": psutil.virtual_memory().total / 2**30, "platform": platform.platform()}


def command(root: Path) -> str:
    """The command line as typed, with the interpreter shown relative to `root`."""
    if Path(sys.argv[0]).name == "pyagent":
        return shlex.join(["pyagent", *sys.argv[1:]])
    exe = Path(sys.executable)
    shown = exe.relative_to(root) if exe.is_relative_to(root) else exe
    return shlex.join([str(shown), *sys.argv])


def provenance(root: Path, packages: tuple[str, ...] = ("torch", "transformers")) -> dict[str, Any]:
    """Everything a result file records about how it was made."""
    import torch

    return {"command": command(root), "git": git_state(root),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
            "threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "pyagent": version("pyagent"),
                         **{p: version(p) for p in packages}}}


def markdown_lines(meta: dict[str, Any] | None) -> list[str]:
    """A result's provenance as Markdown list items (none when it has no record)."""
    if not meta:
        return []
    git, box = meta["git"], meta["machine"]
    return [f"- command: `{meta['command']}`",
            f"- commit: `{git['commit']}`" + (" (uncommitted changes)" if git["dirty"] else ""),
            f"- date: {meta['date']}",
            f"- machine: {box['cpu']}, {box['logical_cores']} cores, "
            f"{box['memory_gib']:.0f} GiB; {meta['threads']} torch threads",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())]


def write_atomic(path: Path, text: str) -> None:
    """Write so that an interrupted run leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_result(folder: Path, stem: str, result: dict[str, Any], table: list[str]) -> None:
    """Write `stem`.json (the result) and `stem`.md (its table) atomically; print the table."""
    import json

    write_atomic(folder / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(folder / f"{stem}.md", "\n".join(table) + "\n")
    print("\n".join(table))


def write_sections(root: Path, folder: Path, stem: str, result: dict[str, Any],
                   sections: set[str], table: Callable[[dict[str, Any]], list[str]]
                   ) -> dict[str, Any]:
    """Write a benchmark of the project at `root` whose run measured only `sections`: the other
    sections' latest figures in `stem`.json are kept, and each section's provenance is under
    `sections_meta`."""
    import json

    earlier = folder / f"{stem}.json"
    kept = json.loads(earlier.read_text()) if earlier.exists() else {}
    result["meta"] = provenance(root)
    measured = {name: result["meta"] for name in sections}
    merged = {**kept, **result, "sections_meta": {**kept.get("sections_meta", {}), **measured}}
    write_result(folder, stem, merged, table(merged))
    return merged
