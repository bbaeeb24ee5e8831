"""Systems reasoning: tracking state through a sequence of updates.

Items are straight-line programs ("x = 3; y = 5; x = x + y; ...") asking for the variable
assigned last, or stories ("Mia has 5 marbles. Mia gets 3 more. ...") asking how many are left;
the generator computes each value as it writes the update, keeping values in 0..99. The integer
is graded exactly ("y = 8" is accepted when y is asked).
"""

from __future__ import annotations

import random

from pyagent.bench.suites.answers import grade_int
from pyagent.bench.suites.base import Grade, Problem, Turn
from pyagent.bench.suites.convergent import NAMES

VARIABLES = ("a", "b", "c", "m", "n", "p", "x", "y", "z")
THINGS = ("apples", "marbles", "coins", "stickers", "books", "cards", "shells", "stamps")
LIMIT = 99


def update(rng: random.Random, values: dict[str, int]) -> str:
    """One statement `target = left op right` on the variables in `values`, which it updates."""
    while True:
        target, left = rng.choice(list(values)), rng.choice(list(values))
        operator = rng.choice("+-*")
        if operator == "*":
            right = str(rng.randint(2, 3))
        else:
            right = rng.choice([str(rng.randint(1, 9)),
                                rng.choice([v for v in values if v != left])])
        operand = values[right] if right in values else int(right)
        value = {"+": values[left] + operand, "-": values[left] - operand,
                 "*": values[left] * operand}[operator]
        if 0 <= value <= LIMIT:
            values[target] = value
            return f"{target} = {left} {operator} {right}"


def program(rng: random.Random, steps: int) -> Problem:
    values = {v: rng.randint(1, 9) for v in rng.sample(VARIABLES, 2 if steps < 3 else 3)}
    statements = [f"{v} = {value}" for v, value in values.items()]
    for _ in range(steps):
        statements.append(update(rng, values))
    target = statements[-1].split(" = ")[0]
    question = (f"Run this program: {'; '.join(statements)}. What is the value of {target} "
                "at the end?")
    return Problem((Turn(question, str(values[target])),), {"kind": "program", "name": target},
                   tags=("program",))


def story(rng: random.Random, steps: int) -> Problem:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    count = rng.randint(2, 20)
    sentences = [f"{name} has {count} {things}."]
    for _ in range(steps):
        k = rng.randint(1, 9)
        moves = [(f"{rng.choice(('gets', 'finds', 'buys'))} {k} more", count + k)]
        if k <= count:
            moves.append((f"{rng.choice(('gives away', 'loses'))} {k}", count - k))
        if 0 < 2 * count <= LIMIT:
            moves.append(("doubles them", 2 * count))
        if count and count % 2 == 0:
            moves.append(("gives away half of them", count // 2))
        move, count = rng.choice([m for m in moves if m[1] <= LIMIT])
        sentences.append(f"{name} {move}.")
    question = f"{' '.join(sentences)} How many {things} does {name} have now?"
    return Problem((Turn(question, str(count)),), {"kind": "story", "name": ""},
                   tags=("story",))


class Systems:
    """`difficulty` updates after the initial values, in a program or a story (half each)."""

    name = "systems"
    measures = "Tracking the state of a few quantities through a sequence of updates."
    instruction = ("Follow the steps in order and give the final value asked for. Answer with "
                   "the number only.")
    difficulties = (1, 3, 6)
    max_tokens = 16

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        kind = rng.choice((program, story))
        return kind(rng, difficulty)

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        names = (problem.data["name"],) if problem.data["name"] else ()
        return grade_int(answer, int(problem.turns[turn].answer), names)


FAMILY = Systems()
