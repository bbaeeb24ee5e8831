"""The generation loop on the paged KV cache: prefill the prompt tokens the prefix cache lacks (in
chunks, logits for the last position only), evict down to the KV budget, then decode token by
token, evicting again every `evict_every` tokens.

One request runs at a time per `Engine` (a lock queues the others), so concurrent callers never see
each other's tokens. Stop strings are honoured across token boundaries, and streamed text holds back
anything that could still turn into a stop string or an incomplete UTF-8 character.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from pyagent.engine import attention
from pyagent.engine.chat import chat_stop_token_ids, render_chat
from pyagent.engine.eviction import Budget, evict, make_policy
from pyagent.engine.grammar import JsonConstraint, grammar_tokenizer
from pyagent.engine.kvcache import DEFAULT_BLOCK_SIZE, PagedKVCache, Sequence
from pyagent.engine.model import LoadedModel, load
from pyagent.engine.registry import resolve_model
from pyagent.engine.sampling import Sampler
from pyagent.engine.toolcalls import as_text_messages, parse_reply, reply_schema
from pyagent.errors import ConfigError, RequestError
from pyagent.types import Completion, CompletionRequest, StreamEvent, Timings, Usage

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class KVSettings:
    """How the engine keeps KV: block size, prefix sharing, and eviction (policy and budget,
    applied after prefill and every `evict_every` decoded tokens)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    share_prefix: bool = True
    policy: str = "full"
    budget: Budget | None = None
    evict_every: int = 64
    prefill_chunk: int = 512
    max_tokens: int | None = None  # capacity of each layer group's block pool

    def __post_init__(self) -> None:
        if self.policy != "full" and self.budget is None:
            raise ConfigError(f"eviction policy {self.policy!r} needs a KV budget")
        for name in ("evict_every", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


class Engine:
    """An in-process model with a generation loop; thread-safe, one request at a time."""

    def __init__(self, loaded: LoadedModel, context_length: int | None = None,
                 kv: KVSettings | None = None):
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
        self.kv = kv or KVSettings()
        self.policy = make_policy(self.kv.policy)
        self.cache = PagedKVCache(config, dtype=self.model.dtype, block_size=self.kv.block_size,
                                  max_tokens=self.kv.max_tokens)
        config._attn_implementation = attention.NAME
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        self._no_masks = dict.fromkeys(layer_types)  # masks come from the paged cache
        self._grammar_tokenizer = None  # built on the first constrained request

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "float32",
             context_length: int | None = None, kv: KVSettings | None = None,
             report=lambda _msg: None, quantize: str | None = None) -> Engine:
        """Load `model` (default: the embedded one); `quantize="int8"` for weight-only int8."""
        return cls(load(resolve_model(model), dtype=dtype, report=report, quantize=quantize),
                   context_length, kv)

    # --- sequences on the paged cache ----------------------------------------------------------

    def open(self, prompt_ids: list[int]) -> Sequence:
        """A sequence for `prompt_ids`, starting from the longest cached prefix. Sequences share
        the engine's cache: use them under one thread (requests hold the engine lock)."""
        sequence = self.cache.new_sequence(prompt_ids, self.kv.share_prefix)
        sequence.prompt_length = len(prompt_ids)
        return sequence

    def close(self, sequence: Sequence) -> None:
        self.cache.release(sequence)

    def forward(self, sequence: Sequence, tokens: list[int], collect: bool | None = None,
                window: int | None = None) -> torch.Tensor:
        """Run `tokens` through the model on `sequence`'s cache; the final hidden states.

        `collect` (attention statistics) and `window` (recent queries kept) default to what the
        engine's eviction policy needs."""
        plan = self.cache.plan(sequence, tokens)
        if collect is None:
            collect = bool(self.policy and self.policy.collects)
        if window is None:
            window = self.policy.window if self.policy else 0
        paged = attention.PagedForward(self.cache, sequence, plan, collect, window)
        with torch.inference_mode():
            out = self.model.model(input_ids=torch.tensor([tokens]),
                                   position_ids=plan.query_positions[None],
                                   attention_mask=self._no_masks, use_cache=False, paged=paged)
        self.cache.finish(sequence)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits for hidden states ([n, hidden] -> [n, vocab])."""
        with torch.inference_mode():
            logits = self.model.lm_head(hidden)
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            return torch.tanh(logits / cap) * cap if cap else logits

    def prefill(self, sequence: Sequence, prompt_ids: list[int]) -> torch.Tensor:
        """Compute the prompt tokens the cache lacks, in chunks, then apply the eviction budget;
        return the logits after the last prompt token."""
        todo = prompt_ids[sequence.length:]
        chunk = self.kv.prefill_chunk
        for start in range(0, len(todo), chunk):
            hidden = self.forward(sequence, todo[start:start + chunk])
        self.enforce_budget(sequence)
        return self.logits(hidden[-1])

    def decode(self, sequence: Sequence, token: int) -> torch.Tensor:
        """Append one token; evict every `evict_every` decoded tokens; the next logits."""
        logits = self.logits(self.forward(sequence, [token])[-1])
        if (sequence.length - sequence.prompt_length) % self.kv.evict_every == 0:
            self.enforce_budget(sequence)
        return logits

    def enforce_budget(self, sequence: Sequence) -> int:
        """Evict down to the budget now; the number of tokens dropped."""
        if self.policy is None or self.kv.budget is None:
            return 0
        keep = self.kv.budget.global_tokens(self.cache, sequence)
        return evict(self.cache, sequence, self.policy, keep)

    def json_constraint(self, schema: dict) -> JsonConstraint:
        """A fresh constraint for one generation against `schema`."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.chat_stop_ids)
        return JsonConstraint(self._grammar_tokenizer, schema, self.model.config.vocab_size)

    # --- requests ------------------------------------------------------------------------------

    def encode(self, request: CompletionRequest) -> list[int]:
        """The prompt's token ids (chat requests through the chat template)."""
        if request.messages is not None:
            messages = as_text_messages(request.messages, request.tools)
            text = render_chat(self.tokenizer, self.model.config.model_type, messages)
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
        A request that offers tools yields its answer or call once it is complete.
        """
        prompt_ids = self.encode(request)
        self.check_fits(len(prompt_ids), request.sampling.max_tokens,
                        "messages" if request.is_chat else "prompt")
        stop_ids = self.chat_stop_ids if request.is_chat else self.eos_ids
        if request.sampling.ignore_eos:
            stop_ids = set()
        schema = request.sampling.json_schema or reply_schema(request)
        constraint = self.json_constraint(schema) if schema is not None else None
        events = self._locked(prompt_ids, request, stop_ids, constraint)
        if not request.tools:
            return events
        return _with_tool_calls(events, str(prompt_ids))

    def _locked(self, prompt_ids: list[int], request: CompletionRequest, stop_ids: set[int],
                constraint: JsonConstraint | None) -> Iterator[StreamEvent]:
        with self._lock:
            yield from self._run(prompt_ids, request, stop_ids, constraint)

    def _run(self, prompt_ids: list[int], request: CompletionRequest, stop_ids: set[int],
             constraint: JsonConstraint | None) -> Iterator[StreamEvent]:
        params = request.sampling
        sampler = Sampler(params)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        generated: list[int] = []
        emitted = 0
        text = ""
        finish = "length"
        start = time.perf_counter()
        first_token_at = None
        sequence = self.open(prompt_ids)
        try:
            logits = self.prefill(sequence, prompt_ids)
            while True:
                token = sampler(logits if constraint is None else constraint.constrain(logits))
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
                if constraint is not None:
                    constraint.advance(token)
                    if constraint.finished:
                        finish = "stop"
                        break
                if len(generated) >= params.max_tokens:
                    break
                safe = len(text) - holdback
                while safe > emitted and text[safe - 1] == REPLACEMENT_CHAR:
                    safe -= 1
                if safe > emitted:
                    yield StreamEvent(text[emitted:safe])
                    emitted = safe
                logits = self.decode(sequence, token)
        finally:
            self.close(sequence)
        end = time.perf_counter()
        completion = Completion(
            text=text,
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(generated),
                        cached_tokens=sequence.cached_tokens),
            timings=Timings(time_to_first_token_s=(first_token_at or end) - start,
                            total_s=end - start, completion_tokens=len(generated)),
            model=self.name,
            backend="embedded",
        )
        yield StreamEvent(text[emitted:], completion)


def _with_tool_calls(events: Iterator[StreamEvent], context: str) -> Iterator[StreamEvent]:
    """The reply of a tool-calling request as its answer text or its tool calls."""
    *_, last = events
    completion = last.completion
    assert completion is not None
    text, calls = parse_reply(completion.text, context)
    finish = "tool_calls" if calls else completion.finish_reason
    yield StreamEvent(text, replace(completion, text=text, tool_calls=calls, finish_reason=finish))


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
