"""Records (rows of flat values) out of nested results, written as JSON, CSV or SQLite.

Nested mappings flatten to dotted column names (`cost.total`); lists of scalars become JSON text.
The format follows the file's suffix: `.json`, `.csv`, `.sqlite` / `.db`. A SQLite file may hold
many tables; writing one replaces that table only, in one transaction.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pyagent.bench.provenance import write_atomic
from pyagent.errors import ConfigError

Record = dict[str, Any]
TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SUFFIXES = (".json", ".csv", ".sqlite", ".db")


def flatten(data: Mapping[str, Any], prefix: str = "") -> Record:
    """One flat record: nested mappings become dotted keys, other non-scalars JSON text."""
    flat: Record = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, str | int | float | bool):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def columns(records: Iterable[Record]) -> list[str]:
    """Every column of `records`, in order of first appearance."""
    return list(dict.fromkeys(key for record in records for key in record))


def write_records(records: list[Mapping[str, Any]], path: Path, table: str = "records") -> Path:
    """Write `records` (flattened) to `path` in the format its suffix names."""
    rows = [flatten(record) for record in records]
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: unknown record format {suffix or '(none)'!r}; use one of "
                          f"{', '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        write_atomic(path, json.dumps(rows, indent=1, default=str) + "\n")
    elif suffix == ".csv":
        _write_csv(rows, path)
    else:
        _write_sqlite(rows, path, table)
    return path


def _write_csv(rows: list[Record], path: Path) -> None:
    fields = columns(rows)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def _write_sqlite(rows: list[Record], path: Path, table: str) -> None:
    if not TABLE_NAME.match(table):
        raise ConfigError(f"{table!r} is not a valid table name (letters, digits, underscores)")
    fields = columns(rows)
    quoted = ", ".join(f'"{name}"' for name in fields)
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # one transaction
        db.execute(f'DROP TABLE IF EXISTS "{table}"')
        db.execute(f'CREATE TABLE "{table}" ({quoted or "empty"})')
        if fields:
            marks = ", ".join("?" for _ in fields)
            db.executemany(f'INSERT INTO "{table}" ({quoted}) VALUES ({marks})',
                           [[row.get(name) for name in fields] for row in rows])
