"""An item's turn as a request, completion-style (for base models) or chat-style (for
instruction-tuned ones), and the feedback an episode gives after each answer.

Completion style: the family's instruction, two worked examples as `Q: ... / A: ...`, the turns so
far with their answers and feedback, then `Q: <question> / A:`. Chat style: the instruction as a
system message, the worked examples as earlier exchanges, then the episode as a conversation.
Either way generation stops at the end of the line: every family asks for a one-line answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyagent.bench.suites.base import Item, Turn
from pyagent.types import CompletionRequest, Message, SamplingParams


def feedback(turn: Turn, correct: bool) -> str:
    """What an episode says after an answer, before the next question."""
    return "Correct." if correct else f"Wrong. The answer was {turn.answer}."


def request_for(item: Item, turn: int, answers: Sequence[str], verdicts: Sequence[bool],
                style: str, temperature: float = 0.0, seed: int | None = None
                ) -> CompletionRequest:
    """The request that asks turn `turn` of `item`, after `answers` to the turns before it were
    judged `verdicts`."""
    sampling = SamplingParams(max_tokens=item.max_tokens, temperature=temperature, seed=seed,
                              stop=("\n",))  # every family asks for a one-line answer
    if style == "completion":
        return CompletionRequest(prompt=_completion_prompt(item, turn, answers, verdicts),
                                 sampling=sampling)
    return CompletionRequest(messages=_chat_messages(item, turn, answers, verdicts),
                             sampling=sampling)


def _completion_prompt(item: Item, turn: int, answers: Sequence[str],
                       verdicts: Sequence[bool]) -> str:
    parts = [item.instruction.strip(), ""]
    for example in item.examples:
        parts += [f"Q: {example.question}", f"A: {example.answer}", ""]
    for index in range(turn):
        parts += [f"Q: {item.turns[index].question}", f"A: {answers[index].strip()}",
                  feedback(item.turns[index], verdicts[index]), ""]
    parts += [f"Q: {item.turns[turn].question}", "A:"]
    return "\n".join(parts)


def _chat_messages(item: Item, turn: int, answers: Sequence[str],
                   verdicts: Sequence[bool]) -> tuple[Message, ...]:
    messages = [Message("system", item.instruction.strip())]
    for example in item.examples:
        messages += [Message("user", example.question), Message("assistant", example.answer)]
    pending = ""
    for index in range(turn):
        messages += [Message("user", pending + item.turns[index].question),
                     Message("assistant", answers[index].strip() or "(no answer)")]
        pending = feedback(item.turns[index], verdicts[index]) + "\n"
    messages.append(Message("user", pending + item.turns[turn].question))
    return tuple(messages)
