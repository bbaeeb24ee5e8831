"""Turn chat messages into prompt text.

A tokenizer's own chat template wins. Gemma GGUFs often ship without one, so Gemma-family models
fall back to Gemma's turn format (`<start_of_turn>user ... <end_of_turn>`); other models without
a template are refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyagent.errors import RequestError
from pyagent.types import Message

GEMMA_TURN_END = "<end_of_turn>"


def render_gemma(messages: Sequence[Message], bos: str) -> str:
    """Gemma's format: system text joins the first user turn; the assistant speaks as `model`."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    parts = [bos]
    for message in (m for m in messages if m.role != "system"):
        role = "model" if message.role == "assistant" else "user"
        content = message.content
        if system and role == "user":
            content, system = f"{system}\n\n{content}", ""
        parts.append(f"<start_of_turn>{role}\n{content.strip()}{GEMMA_TURN_END}\n")
    if system:  # only system messages were given
        parts.append(f"<start_of_turn>user\n{system}{GEMMA_TURN_END}\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts)


def render_chat(tokenizer: Any, model_type: str, messages: Sequence[Message]) -> str:
    """Prompt text for `messages`, ending where the assistant's reply starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False, add_generation_prompt=True)
    if model_type.startswith("gemma"):
        return render_gemma(messages, tokenizer.bos_token or "")
    raise RequestError(f"model type {model_type!r} has no chat template; use a text prompt",
                       param="messages", code="no_chat_template")


def chat_stop_token_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an assistant turn, beyond the tokenizer's EOS."""
    ids = tokenizer.convert_tokens_to_ids([GEMMA_TURN_END])
    return {i for i in ids if i is not None and i != tokenizer.unk_token_id}
