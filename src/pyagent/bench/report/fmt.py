"""Numbers as a reader wants them: a unit guessed from the figure's name (`wall_s`, `peak_rss_mib`,
`kv_bytes`, `saving`, `cost`), about three significant digits, thousands separated."""

from __future__ import annotations

import contextlib
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

TIMES = "\u00d7"  # the unit of ratios
MAX_TEXT = 160  # longer strings are cut in a cell
# (pattern on the figure's last name part, unit), first match wins
UNITS: tuple[tuple[str, str], ...] = (
    (r"(^|_)(tok_s|tokens_per_s)$", "tok/s"),
    (r"(^|_)ms$", "ms"), (r"(^|_)us$", "µs"), (r"(^|_)ns$", "ns"),
    (r"(^|_)(s|seconds)$", "s"),
    (r"(^|_)mib$", "MiB"), (r"(^|_)mb$", "MB"), (r"(^|_)gib$", "GiB"),
    (r"(^|_)(bytes|rss|kv)$", "bytes"),
    (r"(^|_)pct$", "%"),
    (r"(^|_)(share|saving|success_rate|relative_error)$", "fraction"),
    (r"(^|_)cost$", "USD"),
)
RATIO = re.compile(r"ratio|speedup|_over_")
# unit suffixes `label` cuts from a figure's name
SUFFIXES = ("_tok_s", "_per_s", "_ms", "_us", "_ns", "_s", "_mib", "_mb", "_gib", "_pct")
SAVINGS = re.compile(r"(^|\.)savings?\.")  # figures under `savings` are fractions


def unit_of(key: str) -> str | None:
    """The unit a figure's name implies, or None. `key` may be a dotted path: a ratio or saving
    anywhere in it decides, else the nearest part that names a unit (`load_s.median`: s)."""
    path = key.lower().replace(" ", "_")
    if SAVINGS.search(path):
        return "fraction"
    if RATIO.search(path):
        return TIMES
    for name in reversed(path.split(".")):
        unit = next((unit for pattern, unit in UNITS if re.search(pattern, name)), None)
        if unit:
            return unit
    return None


def label(key: str) -> str:
    """A column heading for a figure's name, its unit left to the cells: `wall_s` -> `wall`,
    `cost.total` -> `cost / total`."""
    parts = key.split(".")
    last = parts[-1]
    suffix = next((s for s in SUFFIXES if last.lower().endswith(s) and len(last) > len(s)), "")
    parts[-1] = last[:len(last) - len(suffix)]
    return " / ".join(parts).replace("_", " ")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def number(value: float | Decimal) -> str:
    """About three significant digits, thousands separated; tiny values in scientific form."""
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    size = abs(float(value))
    if size == 0:
        return "0"
    if size < 1e-3:
        return f"{float(value):.2g}"
    decimals = max(0, 2 - math.floor(math.log10(size)))
    return f"{value:,.{decimals}f}"


def quantity(value: Any, unit: str | None) -> tuple[str, bool]:
    """A cell's text and whether it is a number (right-aligned)."""
    if unit == "USD" and isinstance(value, str):
        with contextlib.suppress(InvalidOperation):
            value = Decimal(value)
    if not is_number(value):
        return text(value), False
    if unit == "bytes":
        return _bytes(float(value)), True
    if unit == "fraction":
        return f"{number(float(value) * 100)}%", True
    if unit == "USD":
        return f"${_money(Decimal(str(value)))}", True
    if unit == TIMES:
        return f"{number(value)}{TIMES}", True
    return number(value) + (f" {unit}" if unit else ""), True


def text(value: Any) -> str:
    """A non-number for a cell: None empty, booleans yes/no, long strings cut."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    value = str(value)
    return value if len(value) <= MAX_TEXT else f"{value[:MAX_TEXT]}… ({len(value):,} chars)"


def _bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{number(value / size)} {unit}"
    return f"{number(value)} B"


def _money(value: Decimal) -> str:
    """Exact for small amounts (four significant digits), cents above a dollar."""
    if abs(value) >= 1:
        return f"{value:,.2f}"
    if value == 0:
        return "0"
    return f"{value:.{max(0, 3 - value.adjusted())}f}".rstrip("0").rstrip(".")
