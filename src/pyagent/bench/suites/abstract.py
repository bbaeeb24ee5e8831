"""Abstract reasoning: inducing a rule from examples and applying it once more.

Items are number sequences ("What comes next? 3, 7, 11, 15, ?") or input -> output mappings on
numbers or words ("2 -> 5, 3 -> 7, 10 -> 21. What is 6 -> ?"), half each. The number, or the
word in any case, is graded exactly.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from pyagent.bench.suites.answers import grade_int, grade_word
from pyagent.bench.suites.base import Grade, Problem, Turn
from pyagent.bench.suites.lateral import WORDS

Rule = Callable[[int], int]
SHORT_WORDS = tuple(w for w in WORDS if 3 <= len(w) <= 5)


def sequence(rng: random.Random, level: int) -> tuple[str, list[int]]:
    """A rule's name and the terms of a sequence; the last term is the one to find."""
    if level == 1:
        start, step, length = rng.randint(1, 50), rng.randint(2, 12), rng.randint(6, 7)
        return "arithmetic", [start + step * i for i in range(length)]
    if level == 2:
        length = rng.randint(5, 6)
        if rng.random() < 0.5:
            step = rng.randint(2, 12)
            start = step * length + rng.randint(0, 40)
            return "descending", [start - step * i for i in range(length)]
        start, ratio = rng.randint(1, 9), rng.randint(2, 3)
        return "geometric", [start * ratio ** i for i in range(length)]
    kind = rng.choice(("second-order", "interleaved", "fibonacci"))
    if kind == "second-order":
        term, step, growth = rng.randint(1, 20), rng.randint(1, 6), rng.randint(1, 4)
        terms = [term]
        for i in range(5):
            terms.append(terms[-1] + step + growth * i)
        return kind, terms
    if kind == "interleaved":
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        da, db = rng.sample(range(1, 10), 2)
        return kind, [a + da * (i // 2) if i % 2 == 0 else b + db * (i // 2) for i in range(7)]
    terms = [rng.randint(1, 9), rng.randint(1, 9)]
    while len(terms) < 7:
        terms.append(terms[-1] + terms[-2])
    return kind, terms


def number_rule(rng: random.Random, level: int) -> tuple[str, Rule, list[int]]:
    """A rule's name, the rule and the inputs it may be shown on."""
    a, b, c = rng.randint(2, 6), rng.randint(1, 20), rng.randint(1, 9)
    if level <= 1:
        rules: list[tuple[str, Rule, range]] = [
            ("add", lambda x: x + b, range(1, 30)), ("multiply", lambda x: a * x, range(1, 20))]
    elif level == 2:
        rules = [("linear", lambda x: a * x + c, range(1, 15)),
                 ("square", lambda x: x * x, range(1, 13))]
    else:
        rules = [("linear-minus", lambda x: a * x - c, range(5, 20)),
                 ("square-plus", lambda x: x * x + b, range(1, 13)),
                 ("reverse-digits", lambda x: int(str(x)[::-1]), range(12, 990))]
    name, rule, domain = rng.choice(rules)
    if name == "reverse-digits":
        return name, rule, [x for x in domain if x % 10 and str(x) != str(x)[::-1]]
    return name, rule, list(domain)


def shift(word: str, k: int) -> str:
    letters = string.ascii_lowercase
    return "".join(letters[(letters.index(c) + k) % 26] for c in word)


def mapping(rng: random.Random, level: int) -> tuple[str, list[tuple[str, str]], str]:
    """A rule's name, the shown pairs (the last one to complete) and the answer's type."""
    shown = 4 if level == 1 else 3
    if level > 1 and rng.random() < 1 / 3:
        k = rng.randint(1, 3) * (1 if level == 2 else -1)
        inputs = rng.sample(SHORT_WORDS, shown + 1)
        return f"shift{k:+d}", [(w, shift(w, k)) for w in inputs], "word"
    name, rule, domain = number_rule(rng, level)
    inputs = rng.sample(domain, shown + 1)
    return name, [(str(x), str(rule(x))) for x in inputs], "number"


class Abstract:
    """`difficulty` is the rule's complexity: 1 = add a constant or multiply (5-6 terms shown,
    or 4 examples); 2 = descending or geometric sequences, a*x + b, x*x, letters shifted forward
    (4-5 terms, 3 examples); 3 = second-order, interleaved or Fibonacci-like sequences, a*x - b,
    x*x + b, digits reversed, letters shifted back (5-6 terms, 3 examples)."""

    name = "abstract"
    measures = "Inducing a rule from a few examples and applying it to a new case."
    instruction = ("Find the rule from the examples and give the missing value. Answer with the "
                   "number or word only.")
    difficulties = (1, 2, 3)
    max_tokens = 16

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        if rng.random() < 0.5:
            rule, terms = sequence(rng, difficulty)
            question = f"What comes next? {', '.join(map(str, terms[:-1]))}, ?"
            answer, kind = str(terms[-1]), "number"
        else:
            rule, pairs, kind = mapping(rng, difficulty)
            examples = ", ".join(f"{x} -> {y}" for x, y in pairs[:-1])
            question = f"{examples}. What is {pairs[-1][0]} -> ?"
            answer = pairs[-1][1]
        return Problem((Turn(question, answer),), {"kind": kind, "rule": rule}, tags=(rule,))

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        expected = problem.turns[turn].answer
        if problem.data["kind"] == "number":
            return grade_int(answer, int(expected))
        return grade_word(answer, expected)


FAMILY = Abstract()
