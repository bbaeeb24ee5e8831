"""Convergent reasoning: reaching the one right answer by chaining operations or facts.

Items are arithmetic expressions of small integers with + - * (the usual precedence) or
multi-hop lookups over facts like "Ana's coach is Ben." mixed with distractor facts. The
integer or the name (in any case) is graded exactly.
"""

from __future__ import annotations

import random
from itertools import pairwise

from pyagent.bench.suites.answers import grade_int, grade_word
from pyagent.bench.suites.base import Grade, Problem, Turn

NAMES = (
    "Ana", "Ben", "Cal", "Dan", "Eve", "Finn", "Gia", "Hal", "Ivy", "Jon", "Kai", "Leo", "Mia",
    "Ned", "Oli", "Pam", "Quin", "Rex", "Sam", "Tom", "Uma", "Val", "Yara", "Zoe", "Amir", "Bea",
    "Cora", "Dina", "Eli", "Fay", "Gil", "Hana", "Ian", "Jade", "Kim", "Lara", "Max", "Nia",
    "Omar", "Pia", "Raj", "Rosa", "Sara", "Tara", "Ugo", "Vera", "Will", "Xena", "Yuri", "Zack",
    "Alma", "Beth", "Clara", "Dev", "Emma", "Fred", "Greta", "Hugo", "Joel", "Kate", "Luke",
    "Maya", "Nora", "Owen", "Paul", "Ravi", "Seth", "Theo", "Vic", "Wade")
RELATIONS = ("boss", "mentor", "coach", "teacher", "doctor")


def evaluate(terms: list[int], operators: list[str]) -> int:
    """The value of terms[0] op terms[1] op ... with * before + and -."""
    total, sign, product = 0, 1, terms[0]
    for operator, term in zip(operators, terms[1:], strict=True):
        if operator == "*":
            product *= term
        else:
            total += sign * product
            sign, product = (1 if operator == "+" else -1), term
    return total + sign * product


def arithmetic(rng: random.Random, operations: int) -> Problem:
    terms, operators = [rng.randint(1, 20)], []
    text = str(terms[0])
    for _ in range(operations):
        operator = rng.choice("+-*")
        term = rng.randint(2, 12) if operator == "*" else rng.randint(1, 30)
        operators.append(operator)
        terms.append(term)
        text += f" {operator} {term}"
    return Problem((Turn(f"Compute {text}.", str(evaluate(terms, operators))),),
                   {"kind": "arithmetic"}, tags=("arithmetic",))


def lookup(rng: random.Random, hops: int) -> Problem:
    relation = rng.choice(RELATIONS)
    people = rng.sample(NAMES, 2 * hops + 2)
    chain, others = people[:hops + 1], people[hops + 1:]
    links = list(pairwise(chain))
    links += [(person, rng.choice([p for p in people if p != person])) for person in others]
    if rng.random() < 0.5:  # a trap for one hop too many
        links.append((chain[-1], rng.choice(others)))
    rng.shuffle(links)
    facts = " ".join(f"{a}'s {relation} is {b}." for a, b in links)
    question = f"{facts} Who is {f'the {relation} of ' * hops}{chain[0]}?"
    return Problem((Turn(question, chain[-1]),), {"kind": "lookup"},
                   choices=tuple(sorted(people)), tags=("lookup",))


class Convergent:
    """Arithmetic with `difficulty` operations, or lookups `difficulty` hops deep (half each)."""

    name = "convergent"
    measures = "Reaching the one right answer by chaining operations or facts."
    instruction = ("Answer the question on one line. For a calculation, apply * before + and - "
                   "and answer with the number only. For a question about people, answer with "
                   "the name only.")
    difficulties = (1, 2, 4)
    max_tokens = 16

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        kind = rng.choice((arithmetic, lookup))
        return kind(rng, difficulty)

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        expected = problem.turns[turn].answer
        if problem.data["kind"] == "arithmetic":
            return grade_int(answer, int(expected))
        return grade_word(answer, expected)


FAMILY = Convergent()
