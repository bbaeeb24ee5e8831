"""The `Suite` seam: items generated from seeds, graded by programs (never by a model).

A suite yields `Item`s. An item is either a question for a model (one turn, or an episode of
turns with feedback between them) or a task for a fleet (files of a workspace, the task's text and
a checker run on the workspace afterwards). Items come from seeded generators, so a suite gives
train, validation and test splits of any size; which split an item belongs to follows from a hash
of its content, so the same item can never fall in two splits.

A reasoning family is one `Family`: a generator of problems at a difficulty, a grader of answers,
and a sentence on what it measures. `FamilySuite` turns families into a suite.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pyagent.errors import ConfigError

SplitName = Literal["train", "validation", "test"]
SPLITS: dict[str, tuple[int, int]] = {  # buckets of 100 by content hash
    "train": (0, 60), "validation": (60, 80), "test": (80, 100)}
Style = Literal["completion", "chat"]
STYLES = ("completion", "chat")


@dataclass(frozen=True)
class Grade:
    """The verdict on one answer: `score` in [0, 1] (partial credit where the family gives it),
    `correct` when the answer is fully right, the answer as the grader read it, and why."""

    score: float
    correct: bool
    parsed: str = ""
    detail: str = ""

    @classmethod
    def exact(cls, right: bool, parsed: str, expected: str) -> Grade:
        """All or nothing against one expected answer."""
        return cls(1.0 if right else 0.0, right, parsed,
                   "right" if right else f"expected {expected!r}")

    @classmethod
    def malformed(cls, why: str, parsed: str = "") -> Grade:
        return cls(0.0, False, parsed, f"malformed: {why}")


@dataclass(frozen=True)
class Turn:
    """One question and the reference answer (what feedback reveals, what majority counts)."""

    question: str
    answer: str


@dataclass(frozen=True)
class Problem:
    """What a family's generator makes: turns (several for an episode with feedback), the data
    its grader needs, the finite answer set when there is one, the turns that count towards the
    score (default: all), and tags."""

    turns: tuple[Turn, ...]
    data: dict[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] | None = None
    scored: tuple[int, ...] | None = None
    tags: tuple[str, ...] = ()

    def key(self) -> str:
        """The content that identifies the problem (what decides its split)."""
        return "\x1f".join(t.question for t in self.turns)


@dataclass(frozen=True)
class Item:
    """One thing to run and grade.

    A question item has `turns` (and `instruction`, worked `examples` for completion-style
    prompts). A fleet item has `files` (workspace path -> text) and `task`; its checker runs on
    the workspace after the run."""

    id: str
    suite: str
    family: str
    difficulty: int
    split: str
    turns: tuple[Turn, ...] = ()
    instruction: str = ""
    examples: tuple[Turn, ...] = ()
    choices: tuple[str, ...] | None = None
    scored: tuple[int, ...] = (0,)
    data: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    max_tokens: int = 48
    files: dict[str, str] | None = None
    task: str = ""

    @property
    def is_fleet_task(self) -> bool:
        return self.files is not None


@runtime_checkable
class Family(Protocol):
    """A reasoning family: problems at a difficulty (an integer whose meaning the family states,
    e.g. hops or steps) and a grader for one turn's answer."""

    name: str
    measures: str  # one sentence: what accuracy on this family says about a model
    instruction: str  # what the model is told to do (and the answer's format)
    difficulties: tuple[int, ...]  # easy, medium, hard
    max_tokens: int

    def generate(self, rng: random.Random, difficulty: int) -> Problem: ...

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade: ...


@runtime_checkable
class Suite(Protocol):
    """A source of items and their grader."""

    name: str
    description: str
    families: tuple[str, ...]

    def items(self, split: str, count: int, seed: int = 0,
              difficulties: Sequence[int] | None = None,
              families: Sequence[str] | None = None) -> list[Item]:
        """`count` items per family and difficulty from `split`, the same for the same seed."""
        ...

    def grade(self, item: Item, turn: int, answer: str) -> Grade:
        """The grade of `answer` to turn `turn` of a question item."""
        ...

    def check(self, item: Item, workspace: Path) -> Grade:
        """The grade of a fleet item's workspace after its run."""
        ...


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def bucket(key: str) -> int:
    """0..99 from a content key: which split an item with that content belongs to."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def split_of(key: str) -> str:
    value = bucket(key)
    return next(name for name, (low, high) in SPLITS.items() if low <= value < high)


def draws(label: str, seed: int) -> Iterator[random.Random]:
    """Independent generators for `label` and `seed`, one per draw (reproducible, order-free)."""
    index = 0
    while True:
        yield random.Random(f"{label}:{seed}:{index}")
        index += 1


def first_line(text: str) -> str:
    """The answer as most graders read it: the first non-empty line, trimmed of spaces, quotes,
    a leading 'A:' or 'Answer:' and a final period."""
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            line = re.sub(r"^(?:A|Answer)\s*:\s*", "", line, flags=re.IGNORECASE).strip()
            return line.strip("`\"' ").rstrip(".").strip("`\"' ")
    return ""


MAX_MISSES = 2000  # draws in a row without a new item of the split before giving up
SHOT_POOL = 16  # train problems per family and difficulty that worked examples come from
SHOTS = 2


def worked_examples(problem: Problem, pool: Sequence[Problem]) -> tuple[Turn, ...]:
    """Two worked examples for `problem`: first turns of pool problems of the same kind of task
    (`data["kind"]`, e.g. arithmetic or lookup), else of any kind."""
    kind = problem.data.get("kind")
    same = [p for p in pool if kind is not None and p.data.get("kind") == kind]
    chosen = same if len(same) >= SHOTS else list(pool)
    return tuple(p.turns[0] for p in chosen[:SHOTS])


class FamilySuite:
    """A suite of reasoning families: per family and difficulty, items of one split, each with
    two worked examples of the same difficulty and kind of task from the train split (what
    completion prompts and chat prompts show before the question)."""

    def __init__(self, name: str, description: str, families: Sequence[Family]):
        self.name = name
        self.description = description
        self.by_name = {f.name: f for f in families}
        self.families = tuple(self.by_name)

    def family(self, name: str) -> Family:
        try:
            return self.by_name[name]
        except KeyError:
            raise ConfigError(f"suite {self.name!r} has no family {name!r}; it has "
                              f"{', '.join(self.families)}") from None

    def items(self, split: str, count: int, seed: int = 0,
              difficulties: Sequence[int] | None = None,
              families: Sequence[str] | None = None) -> list[Item]:
        check_split(split)
        if difficulties is not None and not all(
                isinstance(d, int) and d >= 1 for d in difficulties):
            raise ConfigError(f"difficulties must be integers >= 1, got {list(difficulties)}")
        chosen = [self.family(n) for n in (families or self.families)]
        items = []
        for family in chosen:
            for difficulty in difficulties or family.difficulties:
                shots = self._problems(family, difficulty, "train", SHOT_POOL, -1 - seed,
                                       required=False)
                for index, problem in enumerate(self._problems(
                        family, difficulty, split, count, seed, frozenset(p.key() for p in shots))):
                    examples = worked_examples(problem, shots)
                    items.append(Item(
                        id=f"{family.name}/d{difficulty}/{split}/{seed}/{index}",
                        suite=self.name, family=family.name, difficulty=difficulty,
                        split=split, turns=problem.turns, instruction=family.instruction,
                        examples=examples, choices=problem.choices,
                        scored=problem.scored or tuple(range(len(problem.turns))),
                        data=problem.data, tags=problem.tags, max_tokens=family.max_tokens))
        return items

    def _problems(self, family: Family, difficulty: int, split: str, count: int,
                  seed: int, shown: frozenset[str] = frozenset(), required: bool = True
                  ) -> list[Problem]:
        """`count` distinct problems of `split`, none of them one of the worked examples (or,
        not `required`, as many as there are up to `count`)."""
        found: list[Problem] = []
        seen: set[str] = set(shown)
        misses = 0
        for rng in draws(f"{family.name}:{difficulty}", seed):
            if len(found) == count:
                break
            if misses > MAX_MISSES:
                if not required:
                    break
                raise ConfigError(f"family {family.name!r} at difficulty {difficulty} has fewer "
                                  f"than {count} distinct {split} items (found {len(found)})")
            try:
                problem = family.generate(rng, difficulty)
            except (IndexError, ValueError, KeyError) as exc:
                raise ConfigError(f"family {family.name!r} cannot make items at difficulty "
                                  f"{difficulty} ({type(exc).__name__}: {exc}); its "
                                  f"difficulties: {', '.join(map(str, family.difficulties))}"
                                  ) from None
            key = problem.key()
            misses += 1
            if key not in seen and split_of(f"{family.name}\x1e{key}") == split:
                seen.add(key)
                found.append(problem)
                misses = 0
        return found

    def grade(self, item: Item, turn: int, answer: str) -> Grade:
        family = self.family(item.family)
        problem = Problem(item.turns, item.data, item.choices, item.scored, item.tags)
        return family.grade(problem, turn, answer)

    def check(self, item: Item, workspace: Path) -> Grade:
        raise ConfigError(f"suite {self.name!r} has question items, not fleet tasks")


SuiteFactory = Callable[[], Suite]
