"""Adaptive reasoning: noticing from feedback that a learned rule has changed.

An episode is 12 numbers to label A or B with feedback after each; the rule changes at turn 6
(0-based) on a number the old and new rules label differently, so that turn's feedback reveals
the change, and the score counts the 5 turns after it. Each turn is graded exactly against its
own reference label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from pyagent.bench.suites.base import Grade, Problem, Turn, first_line

LABELS = ("A", "B")
BEFORE, AFTER = 6, 6  # turns under the first rule, under the second
INTRO = ("You will classify numbers as A or B. Learn the rule from the feedback; the rule may "
         "change.")


@dataclass(frozen=True)
class Rule:
    """Parity (`first` for odd numbers) or threshold (`first` for numbers above `cut`)."""

    kind: str
    first: str
    cut: int = 0

    def __call__(self, number: int) -> str:
        hit = number % 2 == 1 if self.kind == "parity" else number > self.cut
        return self.first if hit else LABELS[1 - LABELS.index(self.first)]

    def swapped(self) -> Rule:
        return replace(self, first=LABELS[1 - LABELS.index(self.first)])

    def __str__(self) -> str:
        return f"{'odd' if self.kind == 'parity' else f'> {self.cut}'} -> {self.first}"


def rules(rng: random.Random, difficulty: int) -> tuple[str, Rule, Rule]:
    """The change's name, the rule before it and the rule after it."""
    first = rng.choice(LABELS)
    if difficulty <= 1:
        rule = Rule("parity", first)
        return "parity-swap", rule, rule.swapped()
    rule = Rule("threshold", first, rng.randint(30, 70))
    if difficulty == 2:
        return "threshold-swap", rule, rule.swapped()
    move = rng.randint(20, 30) * rng.choice((-1, 1))
    if not 15 <= rule.cut + move <= 85:
        move = -move
    return "threshold-move", rule, replace(rule, cut=rule.cut + move)


class Adaptive:
    """`difficulty` is how subtle the change is: 1 = a parity rule swaps its labels; 2 = a
    threshold rule (above a cut from 30 to 70) swaps its labels; 3 = the cut moves by 20 to 30,
    so only numbers in between change label (half the later numbers are drawn from there)."""

    name = "adaptive"
    measures = "Noticing from feedback that a learned rule has changed and following the new one."
    instruction = ("Classify each number as A or B. Learn the rule from the feedback after each "
                   "answer; the rule may change during the episode. Answer with A or B only.")
    difficulties = (1, 2, 3)
    max_tokens = 16

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        change, old, new = rules(rng, difficulty)
        while True:  # the first rule shows both labels at least twice
            numbers = [rng.randint(1, 99) for _ in range(BEFORE)]
            if all([old(n) for n in numbers].count(label) >= 2 for label in LABELS):
                break
        differ = [n for n in range(1, 100) if old(n) != new(n)]
        numbers.append(rng.choice(differ))
        numbers += [rng.choice(differ) if rng.random() < 0.5 else rng.randint(1, 99)
                    for _ in range(AFTER - 1)]
        turns = [Turn(f"Number: {n}?", (old if i < BEFORE else new)(n))
                 for i, n in enumerate(numbers)]
        turns[0] = Turn(f"{INTRO} {turns[0].question}", turns[0].answer)
        return Problem(tuple(turns), {"change": change, "before": str(old), "after": str(new)},
                       choices=LABELS, scored=tuple(range(BEFORE + 1, BEFORE + AFTER)),
                       tags=(change,))

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        line = first_line(answer).upper()
        if line not in LABELS:
            return Grade.malformed("not A or B", line)
        expected = problem.turns[turn].answer
        return Grade.exact(line == expected, line, expected)


FAMILY = Adaptive()
