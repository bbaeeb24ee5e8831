"""Reading result files for the analyzer: JSON with one-line errors, benchmark-suite results, and
the numeric metrics of any result.

A metric is a dotted path to numbers. A numeric leaf (booleans count as 0 and 1) is one sample;
a list contributes each of its items at the list's own path, so a list of numbers is a list of
repeated samples and a list of records pools each field (`records.latency_s`). The top-level
`meta` (provenance) holds no metrics.

Benchmark-suite results (a `records` list of attempts, each with a `family` and `latency_s`)
give per-family samples instead, `suite.<family>.<field>` and `suite.all.<field>`, one sample
per attempt (`correct` and `error` as 0/1), and `memory.peak_rss`. A trace store gives
`run.wall_s` per run, and per call `llm_call.duration_s`, `.ttft_s`, `.queue_s`,
`.input_tokens`, `.output_tokens` and `tool.<name>.duration_s`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pyagent.errors import ConfigError
from pyagent.observe.traces import TraceReader

Metrics = dict[str, list[float]]
SUITE_FIELDS = ("latency_s", "ttft_s", "queue_s", "score", "correct", "prompt_tokens",
                "completion_tokens", "cached_tokens")
SQLITE_HEADER = b"SQLite format 3\x00"


def load_json(path: str | Path) -> Any:
    """The JSON in `path`; a missing, unreadable or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def is_suite(data: Any) -> bool:
    """Whether `data` looks like a benchmark-suite result (a non-empty `records` list of attempts
    with a `family` and `latency_s`)."""
    records = data.get("records") if isinstance(data, dict) else None
    return (isinstance(records, list) and bool(records) and isinstance(records[0], dict)
            and {"family", "latency_s"} <= records[0].keys())


def suite_records(path: str | Path, data: Any) -> list[dict[str, Any]]:
    """The attempts of a suite result, checked: each a mapping with a `family` and a numeric
    `latency_s`; anything else is a ConfigError naming the file."""
    if not is_suite(data):
        raise ConfigError(f"{path}: not a benchmark-suite result (expected a 'records' list of "
                          "attempts with 'family' and 'latency_s')")
    for index, record in enumerate(data["records"]):
        if not isinstance(record, dict) or not is_number(record.get("latency_s")) \
                or "family" not in record:
            raise ConfigError(f"{path}: records[{index}] is not an attempt (needs 'family' and "
                              "a numeric 'latency_s')")
    return data["records"]


def metrics(path: str | Path) -> Metrics:
    """Every metric of one result file or trace store, as samples (see the module's doc)."""
    path = Path(path)
    if _is_sqlite(path):
        return _trace_metrics(path)
    data = load_json(path)
    found: Metrics = defaultdict(list)
    if is_suite(data):
        _suite_metrics(suite_records(path, data), found)
        peak = (data.get("memory") or {}).get("peak_rss")
        if is_number(peak):
            found["memory.peak_rss"].append(float(peak))
    elif isinstance(data, dict):
        _walk({k: v for k, v in data.items() if k != "meta"}, "", found)
    if not found:
        raise ConfigError(f"{path}: not a result (it holds no numeric metrics)")
    return dict(found)


def pooled(paths: list[str | Path]) -> Metrics:
    """The metrics of several result files, samples of the same metric pooled."""
    out: Metrics = defaultdict(list)
    for path in paths:
        for name, values in metrics(path).items():
            out[name].extend(values)
    return dict(out)


def result_time(path: str | Path) -> float | None:
    """When a result was made: its `meta.date` (ISO 8601) as a POSIX timestamp, if it has one."""
    if _is_sqlite(Path(path)):
        return None
    data = load_json(path)
    date = data.get("meta", {}).get("date") if isinstance(data, dict) else None
    if not isinstance(date, str):
        return None
    try:
        return datetime.fromisoformat(date).timestamp()
    except ValueError:
        return None


def _walk(value: Any, path: str, out: Metrics) -> None:
    if is_number(value):
        out[path].append(float(value))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _walk(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list):
        for item in value:
            _walk(item, path, out)


def _suite_metrics(records: list[dict[str, Any]], out: Metrics) -> None:
    for record in records:
        for group in (f"suite.{record['family']}", "suite.all"):
            for name in SUITE_FIELDS:
                if is_number(record.get(name)):
                    out[f"{group}.{name}"].append(float(record[name]))
            out[f"{group}.error"].append(float(bool(record.get("error"))))


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(16) == SQLITE_HEADER
    except OSError:
        return False


def _trace_metrics(path: Path) -> Metrics:
    out: Metrics = defaultdict(list)
    with TraceReader(path) as reader:
        for run in reader.runs():
            if run.start is not None and run.end is not None:
                out["run.wall_s"].append(run.end - run.start)
            for span in reader.spans(run.run_id):
                attributes = span.attributes
                if span.kind == "llm_call":
                    for key, name in (("duration_s", "duration_s"),
                                      ("pyagent.time_to_first_token_s", "ttft_s"),
                                      ("pyagent.queue_s", "queue_s"),
                                      ("gen_ai.usage.input_tokens", "input_tokens"),
                                      ("gen_ai.usage.output_tokens", "output_tokens")):
                        value = span.duration_s if key == "duration_s" else attributes.get(key)
                        if is_number(value):
                            out[f"llm_call.{name}"].append(float(value))
                elif span.kind == "tool_call" and is_number(span.duration_s):
                    tool = attributes.get("gen_ai.tool.name") or span.name
                    out[f"tool.{tool}.duration_s"].append(float(span.duration_s))  # type: ignore[arg-type]
    if not out:
        raise ConfigError(f"{path}: the trace store holds no finished runs")
    return dict(out)
