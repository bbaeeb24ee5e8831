"""Divergent reasoning: producing several different answers that all satisfy a constraint.

Items ask for N different pairs of numbers with a given sum, multiples of k in a range, or words
with a property from a shown list, always with more than N valid answers. The score is the
number of valid, distinct answers among the first N entries over N (correct only at 1).
"""

from __future__ import annotations

import random
import re
from typing import Any

from pyagent.bench.suites.base import Grade, Problem, Turn, first_line
from pyagent.bench.suites.lateral import WORDS

SEPARATORS = {"pairs": ";", "multiples": ",", "words": ","}
PAIR = re.compile(r"\(?\s*(\d+)\s*,\s*(\d+)\s*\)?")
VOWELS = "aeiou"


def pair_count(total: int, high: int) -> int:
    """How many pairs a <= b of 1..high add up to `total`."""
    return max(0, total // 2 - max(1, total - high) + 1)


def pairs(rng: random.Random, n: int) -> tuple[str, dict[str, Any], list[str]]:
    high = rng.randint(2 * n + 6, 40)
    total = rng.choice([s for s in range(2, 2 * high + 1) if pair_count(s, high) > n])
    options = [f"{a},{total - a}" for a in range(max(1, total - high), total // 2 + 1)]
    question = (f"Give {n} different pairs of whole numbers from 1 to {high} that add up to "
                f"{total}. Write each pair as a,b and separate the pairs with semicolons; a pair "
                "and its reverse count once.")
    return question, {"high": high, "total": total}, options


def multiples(rng: random.Random, n: int) -> tuple[str, dict[str, Any], list[str]]:
    k = rng.randint(3, 12)
    low = rng.randint(1, 80)
    if low % k == 0:
        low += 1
    high = low + k * (n + rng.randint(2, 5))
    if high % k == 0:
        high += 1
    options = [str(m) for m in range(low + 1, high) if m % k == 0]
    question = (f"List {n} different multiples of {k} between {low} and {high}, separated by "
                "commas.")
    return question, {"k": k, "low": low, "high": high}, options


def has(word: str, rule: str, value: str) -> bool:
    """Whether `word` has the property `rule` (with `value`) that a words item asks for."""
    if rule == "vowel":
        return word[0] in VOWELS
    if rule == "length":
        return len(word) == int(value)
    if rule == "ends":
        return word.endswith(value)
    return value in word


def words(rng: random.Random, n: int) -> tuple[str, dict[str, Any], list[str]]:
    rule, value, phrase = rng.choice([
        ("vowel", "", "start with a vowel"),
        *[("length", str(k), f"have exactly {k} letters") for k in (4, 5, 6)],
        *[("ends", c, f"end with the letter '{c}'") for c in "enrty"],
        *[("contains", c, f"contain the letter '{c}'") for c in "aiou"]])
    matching = [w for w in WORDS if has(w, rule, value)]
    other = [w for w in WORDS if not has(w, rule, value)]
    options = rng.sample(matching, n + rng.randint(1, 3))
    shown = options + rng.sample(other, rng.randint(4, 7))
    rng.shuffle(shown)
    question = (f"Give {n} different words from this list that {phrase}: {', '.join(shown)}. "
                "Separate them with commas.")
    return question, {"rule": rule, "value": value, "words": shown}, options


def read(kind: str, entry: str) -> str | None:
    """An entry in its canonical form ('3,17' for a pair, '21', 'apple'), or None when it is
    not in the asked format."""
    if kind == "pairs":
        match = PAIR.fullmatch(entry)
        if match is None:
            return None
        return ",".join(map(str, sorted((int(match[1]), int(match[2])))))
    if kind == "multiples":
        return str(int(entry)) if entry.isascii() and entry.isdigit() else None
    word = entry.lower()
    return word if word.isalpha() and word.isascii() else None


def valid(data: dict[str, Any], entry: str) -> bool:
    """Whether a canonical entry satisfies the item's constraint."""
    if data["kind"] == "pairs":
        a, b = map(int, entry.split(","))
        return 1 <= a <= b <= data["high"] and a + b == data["total"]
    if data["kind"] == "multiples":
        return data["low"] < int(entry) < data["high"] and int(entry) % data["k"] == 0
    return entry in data["words"] and has(entry, data["rule"], data["value"])


class Divergent:
    """N = `difficulty` answers; a pair and its reverse count once; invalid, unparseable and
    repeated entries count for nothing, and entries past the N-th are ignored."""

    name = "divergent"
    measures = "Producing several distinct answers that each satisfy a constraint."
    instruction = ("Give exactly as many different answers as asked, all on one line, in the "
                   "format the question asks for, and nothing else.")
    difficulties = (2, 3, 5)
    max_tokens = 48

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        kind = rng.choice(tuple(SEPARATORS))
        make = {"pairs": pairs, "multiples": multiples, "words": words}[kind]
        question, data, options = make(rng, difficulty)
        reference = f"{SEPARATORS[kind]} ".join(rng.sample(options, difficulty))
        return Problem((Turn(question, reference),), {"kind": kind, "n": difficulty, **data},
                       tags=(kind,))

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        data = problem.data
        kind, n = data["kind"], data["n"]
        separator = SEPARATORS[kind]
        line = first_line(answer)
        if not line:
            return Grade.malformed("empty answer")
        entries = [e.strip() for e in line.split(separator) if e.strip()][:n]
        canonical = [read(kind, e) for e in entries]
        if all(c is None for c in canonical):
            return Grade.malformed("no entry in the asked format", line)
        good = {c for c in canonical if c is not None and valid(data, c)}
        parsed = f"{separator} ".join(c or e for c, e in zip(canonical, entries, strict=True))
        return Grade(len(good) / n, len(good) == n, parsed,
                     f"{len(good)} of {n} valid and distinct")


FAMILY = Divergent()
