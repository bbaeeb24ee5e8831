"""Prompt-lookup speculative decoding: draft the next tokens from the request's own context.

Agents rewrite files, repeat tool outputs and quote earlier steps, so what they write next often
stands in their context already. `Drafter` keeps an index of the n-grams of a request's tokens
(prompt and generated); after each step it looks up the longest recent n-gram that ends the text
and proposes the tokens that followed its latest earlier occurrence. The scheduler then computes
the last token and the draft in one pass, and the request's `Decoder` takes the rows in order,
choosing each token exactly as it would without a draft (argmax, or a draw from its sampling
distribution, constrained by its grammar), until a choice differs from the draft. Under greedy
decoding the output is therefore identical; under sampling each token is still drawn from the
target distribution given the tokens before it (for a one-token draft, accepting it with
probability p(draft) and otherwise drawing from p without it is rejection sampling), and a seed
draws the same tokens. The KV of the rejected draft tokens is dropped (`PagedKVCache.truncate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyagent.errors import ConfigError


@dataclass(frozen=True)
class SpeculationSettings:
    """How many tokens to draft per step (0: off), and the n-gram lengths to look up."""

    draft_tokens: int = 8
    ngram_max: int = 4
    ngram_min: int = 2

    def __post_init__(self) -> None:
        for name in ("draft_tokens", "ngram_max", "ngram_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"speculation {name} must be an integer >= 0, got {value!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"speculation needs 1 <= ngram_min <= ngram_max, got "
                              f"{self.ngram_min} and {self.ngram_max}")


class Drafter:
    """An n-gram index over one request's tokens, extended as it generates."""

    def __init__(self, tokens: list[int], settings: SpeculationSettings):
        self.settings = settings
        self.tokens: list[int] = []
        # n -> n-gram -> the index just after its latest occurrence whose successor is known
        self.index: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(settings.ngram_min, settings.ngram_max + 1)}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append `tokens` to the context."""
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams ending before the new token now have it
            for n, grams in self.index.items():
                if end >= n:
                    grams[tuple(self.tokens[end - n:end])] = end

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        n-gram ending the context; [] if none occurs."""
        limit = min(limit, self.settings.draft_tokens)
        if limit <= 0:
            return []
        for n in range(self.settings.ngram_max, self.settings.ngram_min - 1, -1):
            if len(self.tokens) <= n:
                continue
            start = self.index[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + limit]
        return []
