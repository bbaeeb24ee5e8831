"""Tables for a report: raw values for CSV and SQLite, formatted cells for the page.

Nested records flatten to dotted columns. For the page, a `{median, min, max}` figure is one cell
("4.08 s [3.97, 4.11]"), a short numeric list is printed, a long one summarised (the report plots
it), and a list of records is counted (the report shows it as a table of its own).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyagent.bench.report.fmt import TIMES, is_number, label, quantity, text, unit_of

SHORT_LIST = 6  # numeric lists up to this long are printed; longer ones are plotted
MAX_ROWS = 100  # rows shown on the page; CSV and SQLite get them all


@dataclass(frozen=True)
class Cell:
    text: str
    numeric: bool = False


@dataclass
class Table:
    """Raw `rows` under `columns` (for CSV and SQLite) and the `cells` the page shows."""

    columns: list[str]
    rows: list[list[Any]]
    headers: list[str] = field(default_factory=list)
    cells: list[list[Cell]] = field(default_factory=list)
    title: str = ""
    note: str = ""


def is_distribution(value: Any) -> bool:
    return isinstance(value, Mapping) and {"median", "min", "max"} <= value.keys() and all(
        is_number(value[k]) for k in ("median", "min", "max"))


def is_numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_number(v) for v in value)


def is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def cells_of(record: Mapping[str, Any], path: str = "") -> dict[str, tuple[Any, Cell]]:
    """A record's flat columns, each as (raw value, shown cell); `path` names the record's place
    in the result, for units."""
    out: dict[str, tuple[Any, Cell]] = {}
    for key, value in record.items():
        name = f"{key}"
        where = f"{path}.{key}" if path else name
        if is_distribution(value):
            unit = unit_of(where)
            shown = (f"{quantity(value['median'], unit)[0]} "
                     f"[{_bare(value['min'], unit)}, {_bare(value['max'], unit)}]")
            out[name] = (value["median"], Cell(shown, True))
        elif isinstance(value, Mapping):
            out.update({f"{name}.{k}": v for k, v in cells_of(value, where).items()})
        elif isinstance(value, list):
            out[name] = (json.dumps(value, default=str), _list_cell(value, where))
        else:
            out[name] = (value, Cell(*quantity(value, unit_of(where))))
    return out


def table(records: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
          path: str = "", title: str = "", names: Sequence[str] | None = None) -> Table:
    """A table of `records` (all their flat columns unless `columns` is given); `names`, when
    given, label the rows in a first column `name`."""
    flat = [cells_of(record, path) for record in records]
    if names is not None:
        flat = [{"name": (name, Cell(text(name))), **row} for name, row in zip(names, flat,
                                                                               strict=True)]
    keys = list(columns or dict.fromkeys(key for row in flat for key in row))
    blank = (None, Cell(""))
    shown = flat[:MAX_ROWS]
    return Table(keys, [[row.get(k, blank)[0] for k in keys] for row in flat],
                 [label(k) for k in keys], [[row.get(k, blank)[1] for k in keys] for row in shown],
                 title, f"the first {MAX_ROWS} of {len(flat):,} rows (--tables writes every row)"
                 if len(flat) > MAX_ROWS else "")


def pairs(values: Mapping[str, Any], path: str = "", title: str = "") -> Table:
    """A two-column table, figure and value, of a mapping's scalars."""
    rows = [{"figure": key, "value": value} for key, value in values.items()]
    out = table(rows, ["figure", "value"], title=title)
    out.cells = [[Cell(label(key)), _list_cell(value, f"{path}.{key}")
                  if isinstance(value, list) else Cell(*quantity(value, unit_of(f"{path}.{key}")))]
                 for key, value in values.items()]
    return out


def _bare(value: Any, unit: str | None) -> str:
    """A number in the unit's scale without the unit's name (for brackets after a quantity)."""
    shown = quantity(value, unit)[0]
    return shown.rsplit(" ", 1)[0] if unit not in (None, "fraction", "USD", TIMES) else shown


def _list_cell(values: list[Any], path: str) -> Cell:
    unit = unit_of(path)
    if is_numbers(values) and len(values) <= SHORT_LIST:
        return Cell(", ".join(quantity(v, unit)[0] for v in values), True)
    if is_numbers(values):
        ordered = sorted(values)
        return Cell(f"{len(values)} values, median {quantity(ordered[len(values) // 2], unit)[0]}"
                    f" ({_bare(ordered[0], unit)} to {_bare(ordered[-1], unit)}; plotted)", True)
    if is_records(values):
        return Cell(f"{len(values)} records (table below)")
    if all(not isinstance(v, list | Mapping) for v in values) and len(values) <= SHORT_LIST:
        return Cell(", ".join(text(v) for v in values))
    return Cell(f"{len(values)} items")

