"""Reading one-line answers shared by the reasoning families: integers, words and labels."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pyagent.bench.suites.base import Grade, first_line

NUMBER_WORDS = {word: value for value, word in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve"))}
INTEGER = re.compile(r"(?:([a-z_]\w*)\s*=\s*)?([+-]?\d{1,3}(?:,\d{3})+|[+-]?\d+)", re.IGNORECASE)
WORD = re.compile(r"[a-z]+")


def parse_int(line: str, names: Sequence[str] = ()) -> int | None:
    """The integer `line` states: '42', '-3', '1,200', 'seven', or 'x = 5' where x is one of
    `names`; None for anything else."""
    text = line.replace("\u2212", "-").strip()
    match = INTEGER.fullmatch(text)
    if match is None:
        return NUMBER_WORDS.get(text.lower())
    if match[1] is not None and match[1].lower() not in {n.lower() for n in names}:
        return None
    return int(match[2].replace(",", ""))


def grade_int(answer: str, expected: int, names: Sequence[str] = ()) -> Grade:
    """All or nothing: the first line must state exactly the expected integer."""
    line = first_line(answer)
    if not line:
        return Grade.malformed("empty answer")
    value = parse_int(line, names)
    if value is None:
        return Grade.malformed("not a number", line)
    return Grade.exact(value == expected, str(value), str(expected))


def grade_word(answer: str, expected: str) -> Grade:
    """All or nothing: the first line must be one word of letters equal to `expected`, in any
    case."""
    line = first_line(answer).lower()
    if not line:
        return Grade.malformed("empty answer")
    if not WORD.fullmatch(line):
        return Grade.malformed("not a single word", line)
    return Grade.exact(line == expected.lower(), line, expected)
