"""Critical reasoning: finding the wrong step in a worked calculation.

Items show numbered steps that each apply + - or * to the previous result; in about three of four
items exactly one result is off and the error propagates consistently (later steps compute
correctly from the wrong value), so only that step is wrong. The step number or "none" is graded
exactly.
"""

from __future__ import annotations

import random
import re

from pyagent.bench.suites.base import Grade, Problem, Turn, first_line

STEP = re.compile(r"(?:step\s*)?(\d+)", re.IGNORECASE)
NO_ERROR = 0.25  # the share of items without an error
LIMIT = 200  # the largest value a step may produce


def operation(rng: random.Random, value: int) -> tuple[str, int, int]:
    """An operator, operand and correct result applied to `value`, keeping results in range."""
    while True:
        operator = rng.choice("+-*")
        operand = rng.randint(2, 4) if operator == "*" else rng.randint(2, 30)
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[operator]
        if 0 <= result <= LIMIT:
            return operator, operand, result


def answers(steps: int) -> tuple[str, ...]:
    """The answer set for `steps` steps: their numbers and none."""
    return (*map(str, range(1, steps + 1)), "none")


class Critical:
    """`difficulty` = n steps; the error is off by max(1, 10 // n) to max(2, 24 // n), so it
    gets harder to spot as the steps grow (5-12 at 2 steps, 1-4 at 6)."""

    name = "critical"
    measures = "Checking a worked calculation step by step and locating the wrong step."
    instruction = ("Check each step of the calculation. Answer with the number of the step "
                   "whose result is wrong, or none if every step is right.")
    difficulties = (2, 4, 6)
    max_tokens = 16

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        wrong = 0 if rng.random() < NO_ERROR else rng.randint(1, difficulty)
        size = (max(1, 10 // difficulty), max(2, 24 // difficulty))
        value, steps = rng.randint(2, 30), []
        for number in range(1, difficulty + 1):
            operator, operand, result = operation(rng, value)
            if number == wrong:
                offsets = [sign * d for d in range(size[0], size[1] + 1) for sign in (1, -1)]
                result += rng.choice([d for d in offsets if result + d >= 0])
            steps.append(f"Step {number}: {value} {operator} {operand} = {result}.")
            value = result
        question = (f"Check this calculation. {' '.join(steps)} Which step has an error? "
                    "Answer with the step number, or none.")
        answer = str(wrong) if wrong else "none"
        return Problem((Turn(question, answer),), {"steps": difficulty},
                       choices=answers(difficulty),
                       tags=("error" if wrong else "no-error",))

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        line = first_line(answer).lower()
        if not line:
            return Grade.malformed("empty answer")
        match = STEP.fullmatch(line)
        parsed = str(int(match[1])) if match else line
        if parsed not in answers(problem.data["steps"]):
            return Grade.malformed("not a step number or none", line)
        expected = problem.turns[turn].answer
        return Grade.exact(parsed == expected, parsed, expected)


FAMILY = Critical()
