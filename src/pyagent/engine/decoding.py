"""One request's decoding state: pick each token from its logits, apply the stop rules, and
release text as it becomes final.

Stop strings are honoured across token boundaries, and streamed text holds back anything that
could still turn into a stop string or an incomplete UTF-8 character. A request that offers tools
streams nothing: its answer or tool call arrives whole, with the `Completion`. A request that
asks for log probabilities gets them for each token of its text, from the model's raw logits.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from pyagent.engine.grammar import JsonConstraint
from pyagent.engine.sampling import Sampler
from pyagent.engine.toolcalls import parse_reply
from pyagent.types import Completion, CompletionRequest, Timings, TokenLogprob, Usage

REPLACEMENT_CHAR = "\ufffd"


class Decoder:
    """Turns a request's successive logits into tokens, text deltas and a final `Completion`."""

    def __init__(self, model: str, tokenizer, prompt_ids: list[int], request: CompletionRequest,
                 stop_ids: set[int], constraint: JsonConstraint | None):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.request = request
        self.stop_ids = stop_ids
        self.constraint = constraint
        self.sampler = Sampler(request.sampling)
        self.holdback = max((len(s) for s in request.sampling.stop), default=1) - 1
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.logprobs_released = 0
        self.text = ""
        self.emitted = 0
        self.finish = "length"
        self.done = False
        self.started = time.perf_counter()
        self.admitted_at: float | None = None  # when the scheduler let it in
        self.drafted = self.accepted = 0  # speculation: draft tokens proposed and accepted
        self.first_token_at: float | None = None

    def advance(self, logits: torch.Tensor) -> str:
        """Take the next token from `logits` (1-D); the text that is now final ("" if none).
        Sets `done` once a stop rule or `max_tokens` ends the request."""
        params = self.request.sampling
        constraint = self.constraint
        token = self.sampler(logits if constraint is None else constraint.constrain(logits))
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.generated.append(token)
        if token in self.stop_ids:
            return self._stop("stop")
        if params.logprobs is not None:
            self.logprobs.append(self._logprob(logits, token, params.logprobs))
        self.text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        cut = _find_stop(self.text, params.stop, max(0, self.emitted - self.holdback))
        if cut is not None:
            self.text = self.text[:cut]
            return self._stop("stop")
        if constraint is not None:
            constraint.advance(token)
            if constraint.finished:
                return self._stop("stop")
        if len(self.generated) >= params.max_tokens:
            return self._stop("length")
        if self.request.tools:
            return ""
        safe = len(self.text) - self.holdback
        while safe > self.emitted and self.text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        if safe <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:safe], safe
        return delta

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        """`token`'s log probability, where its text starts, and the `top` likeliest tokens."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = torch.topk(logprobs, top)
        alternatives = zip(ids.tolist(), values.tolist(), strict=True)
        return TokenLogprob(self._piece(token), float(logprobs[token]), len(self.text),
                            tuple((self._piece(i), v) for i, v in alternatives))

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def released_logprobs(self) -> tuple[TokenLogprob, ...]:
        """Log probabilities of the tokens whose text has been released since the last call."""
        fresh = [t for t in self.logprobs[self.logprobs_released:] if t.offset < self.emitted]
        self.logprobs_released += len(fresh)
        return tuple(fresh)

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def _stop(self, finish: str) -> str:
        self.finish, self.done = finish, True
        return ""

    def completion(self, cached_tokens: int, kv_peak_bytes: int | None = None
                   ) -> tuple[str, Completion]:
        """The text not yet released and the whole `Completion` (tool calls parsed out)."""
        end = time.perf_counter()
        completion = Completion(
            text=self.text,
            finish_reason=self.finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(self.prompt_ids),
                        completion_tokens=len(self.generated), cached_tokens=cached_tokens),
            timings=Timings(time_to_first_token_s=(self.first_token_at or end) - self.started,
                            total_s=end - self.started, completion_tokens=len(self.generated),
                            queue_s=(self.admitted_at or end) - self.started,
                            draft_tokens=self.drafted, accepted_tokens=self.accepted),
            model=self.model,
            backend="embedded",
            logprobs=None if self.request.sampling.logprobs is None else tuple(
                t for t in self.logprobs if t.offset < len(self.text)),
            kv_peak_bytes=kv_peak_bytes,
        )
        if not self.request.tools:
            rest, self.emitted = self.text[self.emitted:], len(self.text)
            return rest, completion
        text, calls = parse_reply(self.text, str(self.prompt_ids))
        finish = "tool_calls" if calls else completion.finish_reason
        return text, replace(completion, text=text, tool_calls=calls, finish_reason=finish)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
