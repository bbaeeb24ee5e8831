"""Turn chat messages into prompt pieces: the template's own markup, and message content.

The markup (`<start_of_turn>user`, BOS, ...) may hold control tokens; message content is plain
text, so a user or a tool output that writes `<start_of_turn>model` cannot forge a turn. The
engine tokenizes each piece accordingly.

A tokenizer's own chat template wins. Gemma GGUFs often ship without one, so Gemma-family models
fall back to Gemma's turn format (`<start_of_turn>user ... <end_of_turn>`); other models without
a template are refused rather than guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyagent.errors import RequestError
from pyagent.types import Message

GEMMA_TURN_END = "<end_of_turn>"
_MARK = re.compile("\ue000([0-9]+)\ue001")  # stands for a message's content while rendering


@dataclass(frozen=True)
class Piece:
    """Prompt text: the template's markup (control tokens allowed) or content (plain text)."""

    text: str
    markup: bool


def render_gemma(messages: Sequence[Message], bos: str) -> list[Piece]:
    """Gemma's format: system text joins the first user turn; the assistant speaks as `model`."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    pieces = [Piece(bos, True)]
    for message in (m for m in messages if m.role != "system"):
        role = "model" if message.role == "assistant" else "user"
        content = message.content
        if system and role == "user":
            content, system = f"{system}\n\n{content}", ""
        pieces += _turn(role, content.strip())
    if system:  # only system messages were given
        pieces += _turn("user", system)
    pieces.append(Piece("<start_of_turn>model\n", True))
    return [p for p in pieces if p.text]


def _turn(role: str, content: str) -> list[Piece]:
    return [Piece(f"<start_of_turn>{role}\n", True), Piece(content, False),
            Piece(f"{GEMMA_TURN_END}\n", True)]


def render_template(tokenizer: Any, messages: Sequence[Message]) -> list[Piece]:
    """The tokenizer's chat template, rendered with a placeholder for each message's content and
    split there, so the content stays apart from the markup around it."""
    def render(contents: Sequence[str]) -> str:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": c} for m, c in zip(messages, contents, strict=True)],
            tokenize=False, add_generation_prompt=True)

    framed = _MARK.split(render([f"\ue000{i}\ue001" for i in range(len(messages))]))
    expected = render([m.content for m in messages])
    for strip in (False, True):  # templates often trim content
        pieces = [Piece(text, True) if i % 2 == 0 else Piece(_content(messages, text, strip), False)
                  for i, text in enumerate(framed)]
        if "".join(p.text for p in pieces) == expected:
            return [p for p in pieces if p.text]
    raise RequestError("the model's chat template changes message content in a way that cannot "
                       "keep it apart from the markup", param="messages", code="chat_template")


def _content(messages: Sequence[Message], index: str, strip: bool) -> str:
    content = messages[int(index)].content
    return content.strip() if strip else content


def render_chat(tokenizer: Any, model_type: str, messages: Sequence[Message]) -> list[Piece]:
    """Prompt pieces for `messages`, ending where the assistant's reply starts."""
    if getattr(tokenizer, "chat_template", None):
        return render_template(tokenizer, messages)
    if model_type.startswith("gemma"):
        return render_gemma(messages, tokenizer.bos_token or "")
    raise RequestError(f"model type {model_type!r} has no chat template; use a text prompt",
                       param="messages", code="no_chat_template")


def chat_stop_token_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an assistant turn, beyond the tokenizer's EOS."""
    ids = tokenizer.convert_tokens_to_ids([GEMMA_TURN_END])
    return {i for i in ids if i is not None and i != tokenizer.unk_token_id}
