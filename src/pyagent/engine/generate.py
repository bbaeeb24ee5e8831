"""The generation loop: prefill once (logits for the last position only), then decode per token.

One request runs at a time per `Engine` (a lock queues the others), so concurrent callers never see
each other's tokens. Stop strings are honoured across token boundaries, and streamed text holds back
anything that could still turn into a stop string or an incomplete UTF-8 character.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache

from pyagent.engine.chat import chat_stop_token_ids, render_chat
from pyagent.engine.model import LoadedModel, load
from pyagent.engine.registry import resolve_model
from pyagent.engine.sampling import Sampler
from pyagent.errors import RequestError
from pyagent.types import Completion, CompletionRequest, StreamEvent, Timings, Usage

REPLACEMENT_CHAR = "\ufffd"


class Engine:
    """An in-process model with a generation loop; thread-safe, one request at a time."""

    def __init__(self, loaded: LoadedModel, context_length: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.spec.name
        config = self.model.config
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        if context_length is not None and not 1 < context_length <= limit:
            raise RequestError(f"context_length must be in 2..{limit}, got {context_length}",
                               param="context_length")
        self.context_length = context_length or limit
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids: set[int] = {eos} if eos is not None else set()
        self.chat_stop_ids = self.eos_ids | chat_stop_token_ids(self.tokenizer)
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers mutate state on every encode

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "float32",
             context_length: int | None = None, report=lambda _msg: None) -> Engine:
        return cls(load(resolve_model(model), dtype=dtype, report=report), context_length)

    def encode(self, request: CompletionRequest) -> list[int]:
        """The prompt's token ids (chat requests through the chat template)."""
        if request.messages is not None:
            text = render_chat(self.tokenizer, self.model.config.model_type, request.messages)
            return self.tokenize(text, add_special_tokens=False)
        assert request.prompt is not None
        return self.tokenize(request.prompt)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; safe to call from many threads."""
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def check_fits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        if prompt_tokens + max_tokens > self.context_length:
            raise RequestError(
                f"this request needs {prompt_tokens} prompt tokens + {max_tokens} max_tokens = "
                f"{prompt_tokens + max_tokens} tokens, but {self.name}'s context is "
                f"{self.context_length} tokens", param=param, code="context_length_exceeded")

    def generate(self, request: CompletionRequest) -> Completion:
        """Run `request` to completion."""
        *_, last = self.stream(request)
        assert last.completion is not None
        return last.completion

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        """Yield text deltas as they become final; the last event carries the `Completion`.

        The request is validated here, before the first event, so errors surface at the call.
        """
        prompt_ids = self.encode(request)
        self.check_fits(len(prompt_ids), request.sampling.max_tokens,
                        "messages" if request.is_chat else "prompt")
        stop_ids = self.chat_stop_ids if request.is_chat else self.eos_ids
        if request.sampling.ignore_eos:
            stop_ids = set()
        return self._locked(prompt_ids, request, stop_ids)

    def _locked(self, prompt_ids: list[int], request: CompletionRequest,
                stop_ids: set[int]) -> Iterator[StreamEvent]:
        with self._lock:
            yield from self._run(prompt_ids, request, stop_ids)

    def _forward(self, ids: list[int], cache: Any) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1]

    def _run(self, prompt_ids: list[int], request: CompletionRequest,
             stop_ids: set[int]) -> Iterator[StreamEvent]:
        params = request.sampling
        sampler = Sampler(params)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        generated: list[int] = []
        emitted = 0
        text = ""
        finish = "length"
        start = time.perf_counter()
        first_token_at = None
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            logits = self._forward(prompt_ids, cache)
            while True:
                token = sampler(logits)
                first_token_at = first_token_at or time.perf_counter()
                generated.append(token)
                if token in stop_ids:
                    finish = "stop"
                    break
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                cut = _find_stop(text, params.stop, max(0, emitted - holdback))
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                if len(generated) >= params.max_tokens:
                    break
                safe = len(text) - holdback
                while safe > emitted and text[safe - 1] == REPLACEMENT_CHAR:
                    safe -= 1
                if safe > emitted:
                    yield StreamEvent(text[emitted:safe])
                    emitted = safe
                logits = self._forward([token], cache)
        end = time.perf_counter()
        completion = Completion(
            text=text,
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(generated)),
            timings=Timings(time_to_first_token_s=(first_token_at or end) - start,
                            total_s=end - start, completion_tokens=len(generated)),
            model=self.name,
            backend="embedded",
        )
        yield StreamEvent(text[emitted:], completion)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
