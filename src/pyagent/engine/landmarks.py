"""Structural landmarks: what the text of a context says about which tokens a later question,
unknown when the context is compressed, is likely to need.

An agent's transcript mixes prose with facts that tools reported: ports, ids, line numbers, exit
codes, versions, sizes, paths. Such facts sit on short lines dense in digits, and no amount of
attention from the text around them says that a question will ask for them. Each token of such a
line gets that line's digit density as its salience (twice that for the digits themselves); other
tokens get 0. It is computed from the
token ids alone, so tokens served from the prefix cache have it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LONGEST_LINE = 64  # tokens: longer lines are prose or code, not one fact
NEWLINES = ("\n", "\u010a", "<0x0A>")  # as text, byte-level BPE, SentencePiece byte fallback


@dataclass(frozen=True)
class TokenTraits:
    """Per vocabulary entry: whether its text holds a digit, and whether it ends a line."""

    digit: torch.Tensor  # bool [vocab]
    newline: torch.Tensor  # bool [vocab]

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> TokenTraits:
        size = max(vocab_size, len(tokenizer))
        digit = torch.zeros(size, dtype=torch.bool)
        newline = torch.zeros(size, dtype=torch.bool)
        vocab = tokenizer.get_vocab()
        digit[[i for text, i in vocab.items() if not text.isalpha() and
               any(c.isdigit() for c in text)]] = True
        newline[[i for text, i in vocab.items() if any(m in text for m in NEWLINES)]] = True
        return cls(digit, newline)


def line_salience(tokens: list[int], traits: TokenTraits,
                  longest: int = LONGEST_LINE) -> torch.Tensor:
    """Per token of `tokens`: the share of digit tokens on its line (doubled for a digit), for
    lines of at most `longest` tokens that hold a digit; 0 elsewhere."""
    ids = torch.tensor(tokens, dtype=torch.long).clamp(max=traits.digit.numel() - 1)
    ends = traits.newline[ids].long()
    line = torch.cumsum(ends, 0) - ends  # a newline belongs to the line it ends
    digit = traits.digit[ids].float()
    lengths = torch.bincount(line).float()
    digits = torch.bincount(line, weights=digit)
    density = torch.where((lengths <= longest) & (digits > 0), digits / lengths,
                          torch.zeros_like(lengths))
    return density[line] * (1 + digit)  # the digits themselves first, then their line
