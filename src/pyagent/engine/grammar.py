"""Grammar-constrained decoding: the engine only samples tokens that keep the output valid JSON for
a given JSON schema (llguidance computes the allowed-token mask, ~0.2 ms for Gemma's 262k vocab).
"""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.hf
import torch

from pyagent.errors import RequestError

BITS = torch.arange(32, dtype=torch.int32)


def grammar_tokenizer(tokenizer: Any, eos_ids: set[int]) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance sees it (about a second for a large vocabulary: cache it)."""
    return llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos_ids) or None)


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of JSON valid for `schema`; a `RequestError` naming `param` if the schema is
    not one llguidance can use."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False})  # compact: always terminates
        problem = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as exc:
        problem = str(exc)
    if problem:
        raise RequestError(f"{param} is not a usable JSON schema: {problem}", param=param,
                           code="invalid_value")
    return grammar


class JsonConstraint:
    """Tracks one generation against a JSON schema (`param` names the schema in errors)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, schema: dict[str, Any],
                 vocab_size: int, param: str = "response_format"):
        self.matcher = llguidance.LLMatcher(tokenizer, schema_grammar(schema, param), log_level=0)
        if self.matcher.is_error():
            raise RequestError(f"{param} is not a usable JSON schema: "
                               f"{self.matcher.get_error()}", param=param)
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """Boolean mask over the vocabulary of the tokens that may come next."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words[:, None] >> BITS) & 1).bool().flatten()[:self.vocab_size]

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        mask = self.allowed()
        out = torch.full_like(logits, float("-inf"))
        count = min(mask.numel(), logits.numel())
        out[:count] = torch.where(mask[:count], logits[:count], out[:count])
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RequestError(f"token {token} broke the JSON grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but end-of-sequence may follow."""
        return self.matcher.is_stopped()
