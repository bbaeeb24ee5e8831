"""Any result shown by its shape: scalars as a figure/value table, lists of records and mappings
of records as tables, long numeric lists as plots, nested lists of records as tables of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyagent.bench.report import figures
from pyagent.bench.report.fmt import TIMES, unit_of
from pyagent.bench.report.tables import (
    SHORT_LIST,
    Table,
    is_distribution,
    is_numbers,
    is_records,
    pairs,
    table,
)

MAX_DEPTH = 6


def render(data: Mapping[str, Any], tables: list[Table], plots: list[str], path: str = "",
           depth: int = 0) -> None:
    """Append the tables and plots that show `data` (found at `path` in its result)."""
    if depth > MAX_DEPTH:
        return
    scalars = {k: v for k, v in data.items() if _scalar(v)}
    if scalars:
        tables.append(pairs(scalars, path, _title(path)))
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key in scalars:
            continue
        if is_numbers(value):
            plots.extend(_plot({str(key): value}, where))
        elif is_records(value):
            _records(value, where, tables, plots, depth)
        elif isinstance(value, Mapping) and value and all(
                isinstance(v, Mapping) and not is_distribution(v) for v in value.values()):
            _records(list(value.values()), where, tables, plots, depth, names=list(value))
        elif isinstance(value, Mapping) and value:
            render(value, tables, plots, where, depth + 1)


def _records(records: list[Mapping[str, Any]], path: str, tables: list[Table], plots: list[str],
             depth: int, names: list[str] | None = None) -> None:
    """A table of records, a plot per long numeric column, and a table per nested record list."""
    tables.append(table(records, path=path, title=_title(path), names=names))
    labels = names or [_name(record, index) for index, record in enumerate(records)]
    for key in dict.fromkeys(k for record in records for k, v in _nested(record)
                             if is_numbers(v) and len(v) > SHORT_LIST):
        series = {name: value for name, record in zip(labels, records, strict=True)
                  if is_numbers(value := dict(_nested(record)).get(key))}
        plots.extend(_plot(series, f"{path}.{key}"))
    if depth < MAX_DEPTH:
        for name, record in zip(labels, records, strict=True):
            for key, value in _nested(record):
                if is_records(value):
                    _records(value, f"{path}.{name}.{key}", tables, plots, depth + 1)


def _nested(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of a record's leaves, lists included, through nested mappings."""
    out = []
    for key, value in record.items():
        if isinstance(value, Mapping) and not is_distribution(value):
            out += _nested(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _plot(series: dict[str, list[float]], path: str) -> list[str]:
    """A line per series over its index, in the figure's unit (bytes in MiB); none when empty."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    unit = unit_of(path)
    if unit == "bytes":
        series = {k: [x / 2**20 for x in v] for k, v in series.items()}
        unit = "MiB"
    ylabel = {"fraction": "fraction", TIMES: "ratio", None: "value"}.get(unit, unit)
    return [figures.indexed(series, _title(path), ylabel)]


def _scalar(value: Any) -> bool:
    if isinstance(value, list):
        return len(value) <= SHORT_LIST and not any(isinstance(v, list | Mapping) for v in value)
    return not isinstance(value, Mapping)


def _name(record: Mapping[str, Any], index: int) -> str:
    """What labels a record in a plot: its first short text field, else its position."""
    return next((v for v in record.values() if isinstance(v, str) and len(v) <= 40),
                f"#{index + 1}")


def _title(path: str) -> str:
    return path.replace(".", " / ").replace("_", " ")
