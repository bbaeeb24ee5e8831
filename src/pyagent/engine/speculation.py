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
    """How many tokens to draft per step at most (0: off), the n-gram lengths to look up, and
    what a drafted row costs against a pass of one token (int8 on the AVX-512 kernels: 0.17 of a
    pass, mostly arithmetic; the weights are read once per pass; engine/avx512.py)."""

    draft_tokens: int = 8
    ngram_max: int = 4
    ngram_min: int = 2
    row_cost: float = 0.17

    def __post_init__(self) -> None:
        for name in ("draft_tokens", "ngram_max", "ngram_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"speculation {name} must be an integer >= 0, got {value!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"speculation needs 1 <= ngram_min <= ngram_max, got "
                              f"{self.ngram_min} and {self.ngram_max}")
        if not 0 < self.row_cost <= 1:
            raise ConfigError(f"speculation row_cost must be in (0, 1], got {self.row_cost}")


PRIOR = 0.75  # the chance a drafted token is accepted, assumed before any draft
MEMORY = 0.8  # weight of the past in the acceptance estimate, per step


class Drafter:
    """An n-gram index over one request's tokens, extended as it generates, and an estimate of
    how often this request's drafts are accepted, which sizes them."""

    def __init__(self, tokens: list[int], settings: SpeculationSettings):
        self.settings = settings
        self.accepted, self.tried = 4 * PRIOR, 4.0  # as if 4 tokens had been tried
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

    def feedback(self, drafted: int, accepted: int) -> None:
        """Learn from a step: each accepted token was a success, and the first rejected one
        (if any) a failure; a step without a draft drifts the estimate back toward the prior,
        so a request that stopped drafting tries again later."""
        if drafted:
            self.accepted = MEMORY * self.accepted + accepted
            self.tried = MEMORY * self.tried + accepted + (accepted < drafted)
        else:
            self.accepted = MEMORY * self.accepted + (1 - MEMORY) * PRIOR
            self.tried = MEMORY * self.tried + (1 - MEMORY)

    def length(self, limit: int) -> int:
        """The draft length that yields the most tokens per unit of pass time: with a chance
        `a` that each next drafted token is accepted, k drafted tokens yield
        (1 - a^(k+1)) / (1 - a) tokens for 1 + k * row_cost of a pass; 0 when even one
        drafted token does not pay (a <= row_cost)."""
        rate = min(self.accepted / self.tried, 0.999)
        cost = self.settings.row_cost
        if rate <= cost:
            return 0
        best, best_yield = 0, 1.0
        for k in range(1, limit + 1):
            yield_ = (1 - rate ** (k + 1)) / (1 - rate) / (1 + k * cost)
            if yield_ > best_yield:
                best, best_yield = k, yield_
        return best

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        n-gram ending the context, as many as pay off (`length`); [] if none occurs."""
        limit = self.length(min(limit, self.settings.draft_tokens))
        if limit <= 0:
            return []
        for n in range(self.settings.ngram_max, self.settings.ngram_min - 1, -1):
            if len(self.tokens) <= n:
                continue
            start = self.index[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + limit]
        return []
