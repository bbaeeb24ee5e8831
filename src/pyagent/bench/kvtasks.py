"""Long-context tasks for the KV benchmark, generated locally from text that ships with Python.

Every sample is token ids: a `context` (what eviction may shrink), a `query` appended after it,
and a `target` that is scored teacher-forced (and, for needle tasks, an `answer` checked by greedy
generation). Samples are reproducible: each draws from its own seeded generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

LICENSES = Path("/usr/share/common-licenses")
WORDS = ("harbor", "violet", "granite", "falcon", "meadow", "lantern", "copper", "glacier",
         "orchid", "saddle", "thunder", "walnut", "ember", "quartz", "willow", "beacon")


@dataclass(frozen=True)
class Sample:
    """One scored item: context -> (eviction) -> query -> target."""

    task: str
    length: int
    context: list[int]
    query: list[int]
    target: list[int]
    answer: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def corpus_text() -> str:
    """Python's own documentation topics, then Debian's license texts when present."""
    parts = [topics[key] for key in sorted(topics)]
    if LICENSES.is_dir():
        parts += [p.read_text(errors="replace") for p in sorted(LICENSES.iterdir()) if p.is_file()]
    return "\n\n".join(parts)


class TaskBuilder:
    """Builds samples with one tokenizer over one tokenized corpus."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.corpus = self.ids(corpus_text())

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def haystack(self, rng: random.Random, count: int) -> list[int]:
        start = rng.randrange(0, len(self.corpus) - count)
        return self.corpus[start:start + count]

    def continuation(self, length: int, continuation: int, seed: int) -> Sample:
        """Natural text: score the `continuation` tokens that follow a `length`-token context
        (its last token is the query, so every scored prediction sees the evicted cache)."""
        rng = random.Random(f"continuation-{length}-{seed}")
        text = self.haystack(rng, length - 1 + continuation)
        return Sample("continuation", length, [self.bos, *text[:length - 2]], [text[length - 2]],
                      text[length - 1:], detail={"seed": seed})

    def _with_needles(self, rng: random.Random, length: int,
                      needles: list[tuple[float, list[int]]]) -> list[int]:
        """A haystack of `length` tokens (BOS included) with needles at relative depths."""
        filler = length - 1 - sum(len(n) for _, n in needles)
        return plant(self.bos, self.haystack(rng, filler), needles)[0]

    def passkey(self, length: int, depth: float, seed: int) -> Sample:
        """A five-digit pass key hidden at `depth` (0 = start, 1 = end) of the context."""
        rng = random.Random(f"passkey-{length}-{depth}-{seed}")
        key = str(rng.randrange(10000, 100000))
        needle = self.ids(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
        context = self._with_needles(rng, length, [(depth, needle)])
        query = self.ids("\nWhat is the pass key? The pass key is")
        return Sample("passkey", length, context, query, self.ids(f" {key}"), key,
                      {"depth": depth, "seed": seed})

    def multikey(self, length: int, keys: int, seed: int) -> Sample:
        """RULER-style multi-key needles: `keys` magic numbers, one asked for, the rest
        distractors."""
        rng = random.Random(f"multikey-{length}-{keys}-{seed}")
        words = rng.sample(WORDS, keys)
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in words]
        needles = [(rng.random(), self.ids(
            f"\nOne of the special magic numbers for {w} is: {v}.\n")) for w, v in
            zip(words, values, strict=True)]
        asked = rng.randrange(keys)
        context = self._with_needles(rng, length, needles)
        query = self.ids(f"\nWhat is the special magic number for {words[asked]} mentioned in "
                         f"the text? The special magic number for {words[asked]} is")
        return Sample("multikey", length, context, query, self.ids(f" {values[asked]}"),
                      values[asked], {"keys": keys, "seed": seed})

    def variable_tracking(self, length: int, hops: int, seed: int) -> Sample:
        """RULER-style variable tracking: a chain of `hops` assignments from a value, plus a
        distractor chain; the query asks for the value of the chain's last variable."""
        rng = random.Random(f"vartrack-{length}-{hops}-{seed}")
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))
                 for _ in range(2 * (hops + 1))]
        value, other = str(rng.randrange(10000, 100000)), str(rng.randrange(10000, 100000))
        asked = _chain(names[:hops + 1], value)
        statements = _interleave(asked, _chain(names[hops + 1:], other))
        depths = sorted(rng.random() for _ in statements)
        needles = [(d, self.ids(f"\n{s}.\n")) for d, s in zip(depths, statements, strict=True)]
        context = self._with_needles(rng, length, needles)
        last = names[hops]
        query = self.ids(f"\nQuestion: what is the value of VAR {last}? Answer: VAR {last} =")
        return Sample("vartrack", length, context, query, self.ids(f" {value}"), value,
                      {"hops": hops, "seed": seed})


def plant(bos: int, hay: list[int], needles: list[tuple[float, list[int]]]
          ) -> tuple[list[int], list[int]]:
    """BOS, then `hay` with each needle inserted at its relative depth (0 = start, 1 = end);
    the tokens, and where each needle starts (in the order given)."""
    out, used, starts = [bos], 0, {}
    for index, (depth, needle) in sorted(enumerate(needles), key=lambda item: item[1][0]):
        cut = int(depth * len(hay))
        out += hay[used:cut]
        starts[index] = len(out)
        out += needle
        used = cut
    return out + hay[used:], [starts[i] for i in range(len(needles))]


def _chain(names: list[str], value: str) -> list[str]:
    """`VAR A = value`, `VAR B = VAR A`, ... in order."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in pairwise(names)]


def _interleave(first: list[str], second: list[str]) -> list[str]:
    """Alternate two lists, keeping each one's order."""
    out = []
    for i in range(max(len(first), len(second))):
        out += first[i:i + 1] + second[i:i + 1]
    return out
