"""The engine: the model on the paged KV cache, and the generation of requests.

A forward pass computes new tokens of one or more sequences on the cache. A prompt's tokens that
the prefix cache lacks are computed in chunks (logits for the last position only), the cache
evicting down to the KV budget after every chunk, and decoding goes token by token, evicting
again every `evict_every` tokens. A request's KV therefore never exceeds its budget by more than
one chunk, and admission reserves only that much for it.

Requests run on the engine's `Scheduler`, which batches all of them into shared forward passes
(continuous batching), so concurrent callers share the weights' memory traffic and never see each
other's tokens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch

from pyagent.engine import attention
from pyagent.engine.chat import Piece, chat_stop_token_ids, render_chat
from pyagent.engine.decoding import Decoder
from pyagent.engine.eviction import Budget, evict, make_policy
from pyagent.engine.grammar import JsonConstraint, grammar_tokenizer
from pyagent.engine.kvcache import DEFAULT_BLOCK_SIZE, PagedKVCache, Sequence
from pyagent.engine.kvquant import INT4
from pyagent.engine.landmarks import TokenTraits
from pyagent.engine.model import LoadedModel, load
from pyagent.engine.quantize import DENSE_ROWS, dense_prompt
from pyagent.engine.registry import resolve_model
from pyagent.engine.scheduler import Job, Scheduler, SchedulerSettings, Ticket
from pyagent.engine.toolcalls import as_text_messages, reply_schema
from pyagent.errors import ConfigError, PyAgentError, RequestError
from pyagent.types import Completion, CompletionRequest, StreamEvent

# What reconstruction scoring (`Engine.reconstruct`) puts before the tokens it repeats
REPEAT_PROMPT = "\n\nRepeat the text above, word for word:\n"
DEFAULT_KV_SHARE = 0.25  # of the memory available at start, when no KV capacity is given
# How the paged cache stores keys and values: "auto" is the model's compute dtype; int8 keeps
# each token's key and value per head with a float32 scale (about 26% of float32's bytes); int4
# keeps values per token and keys per channel of each block, with float16 zero points and steps
# (about 17% of float32's bytes for Gemma 3 270M; engine/kvquant.py).
KV_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "int8": torch.int8, "int4": INT4}


@dataclass(frozen=True)
class KVSettings:
    """How the engine keeps KV: block size, prefix sharing, eviction (policy and budget,
    applied after every prefill chunk and every `evict_every` decoded tokens), the pool's
    capacity, and the storage dtype (quantization composes with eviction)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    share_prefix: bool = True
    policy: str = "full"
    budget: Budget | None = None
    evict_every: int = 64
    prefill_chunk: int = 512
    max_tokens: int | None = None  # capacity of each layer group's block pool (None: see Engine)
    dtype: str = "auto"  # how keys and values are stored: a KV_DTYPES name
    # "chunk": evict after every prefill chunk (the peak stays within the budget plus a chunk);
    # "prompt": once the whole prompt is in, so eviction can see the question at its end (the
    # peak is then the whole prompt)
    prefill_eviction: str = "chunk"

    def __post_init__(self) -> None:
        if self.policy != "full" and self.budget is None:
            raise ConfigError(f"eviction policy {self.policy!r} needs a KV budget")
        if self.policy == "full" and self.budget is not None:
            raise ConfigError("a KV budget needs an eviction policy (the policy is 'full')")
        for name in ("block_size", "evict_every", "prefill_chunk", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.prefill_eviction not in ("chunk", "prompt"):
            raise ConfigError(f"prefill_eviction must be 'chunk' or 'prompt', got "
                              f"{self.prefill_eviction!r}")
        if self.dtype not in KV_DTYPES:
            raise ConfigError(f"unknown KV dtype {self.dtype!r}; choose one of "
                              f"{', '.join(KV_DTYPES)}")
        for name in ("evict_every", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


class Engine:
    """An in-process model with a paged KV cache, serving requests with continuous batching."""

    def __init__(self, loaded: LoadedModel, context_length: int | None = None,
                 kv: KVSettings | None = None, scheduling: SchedulerSettings | None = None):
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
        self._lock = threading.RLock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers mutate state on every encode
        self.kv = kv or KVSettings()
        self.policy = make_policy(self.kv.policy)
        budget = self.kv.budget
        if self.policy is not None and budget is not None and budget.tokens is not None \
                and budget.tokens < self.policy.least(self.kv.block_size):
            raise ConfigError(f"a KV budget of {budget.tokens} tokens is below the "
                              f"{self.policy.least(self.kv.block_size)} tokens policy "
                              f"{self.kv.policy!r} always keeps")
        self.scheduling = scheduling or SchedulerSettings()
        self.cache = PagedKVCache(config, dtype=self.model.dtype, block_size=self.kv.block_size,
                                  max_tokens=self.kv.max_tokens or self._default_kv_tokens(),
                                  storage=KV_DTYPES[self.kv.dtype])
        self.cache.traits = TokenTraits.of(self.tokenizer, config.vocab_size)
        config._attn_implementation = attention.NAME
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        self._no_masks = dict.fromkeys(layer_types)  # masks come from the paged cache
        self._grammar_tokenizer = None  # built on the first constrained request
        self.scheduler = Scheduler(self, self.scheduling)

    @classmethod
    def load(cls, model: str | None = None, dtype: str = "auto",
             context_length: int | None = None, kv: KVSettings | None = None,
             report=lambda _msg: None, quantize: str | None = None,
             scheduling: SchedulerSettings | None = None, workload: str = "stream") -> Engine:
        """Load `model` (default: the embedded one) in precision `dtype` (one of PRECISIONS in
        engine/model.py: auto, float32, bfloat16, float16, int8, bf16-weights; `auto` chooses by
        the CPU and the `workload`, "stream" or "batch", and `engine.loaded.chosen` says why)."""
        return cls(load(resolve_model(model), dtype=dtype, report=report, quantize=quantize,
                        workload=workload), context_length, kv, scheduling)

    def shutdown(self) -> None:
        """Stop serving: requests still queued or running end with an error."""
        self.scheduler.close()

    def gauges(self) -> list[tuple[str, dict[str, str], float]]:
        """The engine's state now as gauges `(name, labels, value)`: KV bytes held, at peak,
        cached and the capacity; requests running and waiting."""
        memory = self.cache.memory()
        load = self.scheduler.load()
        labels = {"model": self.name}
        return [("pyagent_kv_bytes", labels, memory.bytes),
                ("pyagent_kv_peak_bytes", labels, memory.peak_bytes),
                ("pyagent_kv_cached_prefix_bytes", labels, memory.cached_prefix_bytes),
                ("pyagent_kv_capacity_bytes", labels, memory.capacity_bytes),
                ("pyagent_scheduler_running", labels, load["running"]),
                ("pyagent_scheduler_waiting", labels, load["waiting"])]

    # --- KV memory -----------------------------------------------------------------------------

    def _default_kv_tokens(self) -> int:
        """KV capacity when none is given: a full context for every request of a batch, within
        a quarter of the memory available now."""
        import psutil

        probe = PagedKVCache(self.model.config, dtype=self.model.dtype,
                             block_size=self.kv.block_size, max_tokens=self.kv.block_size,
                             storage=KV_DTYPES[self.kv.dtype])
        per_token = sum(p.bytes_per_block for p in probe.pools.values()) // self.kv.block_size
        affordable = int(psutil.virtual_memory().available * DEFAULT_KV_SHARE) // per_token
        wanted = self.context_length * self.scheduling.max_batch
        return max(self.context_length, min(wanted, affordable))

    def kv_token_budget(self) -> dict[str, int]:
        """Tokens of KV each layer group can hold: what admitted requests may reserve."""
        return {name: (pool.max_blocks or 0) * pool.block_size
                for name, pool in self.cache.pools.items()}

    def kv_reservation(self, prompt_tokens: int, max_tokens: int) -> dict[str, int]:
        """The most KV tokens a request can occupy per layer group at any moment (a block of
        slack each for a partly filled block and a copy on write). Under eviction the global
        layers hold at most the budget plus one prefill chunk (or the tokens decoded between
        two evictions), so a budget lets more requests in."""
        total = prompt_tokens + max_tokens
        step = max(self.kv.prefill_chunk, self.kv.evict_every)
        reserve = {}
        for group in self.cache.groups:
            if group.window is not None:
                live = min(total, group.window + self.kv.prefill_chunk)
            elif self.policy is not None and self.kv.budget is not None:
                kept = self.kv.budget.most_global_tokens(self.cache, total)
                held = kept + step if self.kv.prefill_eviction == "chunk" else max(
                    prompt_tokens, kept + self.kv.evict_every)
                live = min(total, held)
            else:
                live = total
            reserve[group.name] = (-(-live // self.kv.block_size) + 2) * self.kv.block_size
        return reserve

    # --- sequences on the paged cache ----------------------------------------------------------

    def exclusive(self) -> AbstractContextManager:
        """The cache's lock, to hold as `with engine.exclusive():`: the low-level sequence
        methods below need it while the engine may be serving requests."""
        return self._lock

    def open(self, prompt_ids: list[int]) -> Sequence:
        """A sequence for `prompt_ids`, starting from the longest cached prefix; under eviction
        after every chunk, a reused prefix longer than the budget is evicted at once (its tokens
        carry the statistics they gathered), so the sequence never holds more than admission
        reserved for it."""
        sequence = self.cache.new_sequence(prompt_ids, self.kv.share_prefix)
        sequence.prompt_length = len(prompt_ids)
        if sequence.cached_tokens and self.kv.prefill_eviction == "chunk":
            try:
                self.enforce_budget(sequence)
            except BaseException:
                self.close(sequence)
                raise
        return sequence

    def close(self, sequence: Sequence) -> None:
        """Let go of `sequence`'s blocks (its prompt prefix stays cached)."""
        self.cache.release(sequence)

    def forward(self, sequence: Sequence, tokens: list[int], collect: bool | None = None,
                window: int | None = None) -> torch.Tensor:
        """Run `tokens` through the model on `sequence`'s cache; the final hidden states.

        `collect` (attention statistics) and `window` (recent queries kept) default to what the
        engine's eviction policy needs."""
        return self.forward_batch([(sequence, tokens)], collect, window)[0]

    def forward_batch(self, items: list[tuple[Sequence | None, list[int]]],
                      collect: bool | None = None, window: int | None = None,
                      dense: bool | None = None, finish: bool = True, trim: bool = True
                      ) -> list[torch.Tensor]:
        """One forward pass over the new tokens of several sequences; each one's hidden states.
        An item without a sequence pads the pass: its tokens touch no cache. `dense`: whether
        int8 layers multiply through bfloat16 GEMM (None: for passes of prompt chunks only,
        see `_run`). A pass with drafts passes `finish=False` and `trim=False`: the caller
        drops the rejected tokens (`cache.truncate`) before sliding-window blocks are let go
        (`cache.finish`), and no block a committed token still needs dies inside the pass."""
        if collect is None:
            collect = bool(self.policy and self.policy.collects)
        if window is None:
            window = self.policy.window if self.policy else 0
        parts, positions, tokens = [], [], []
        for sequence, new in items:
            if sequence is None:
                parts.append(None)
                positions.append(torch.zeros(len(new), dtype=torch.long))
            else:
                sequence.trim_window = trim and self._trims(sequence, len(new))
                plan = self.cache.plan(sequence, new)
                parts.append(attention.PagedForward(self.cache, sequence, plan, collect, window))
                positions.append(plan.query_positions)
            tokens.extend(new)
        sizes = [len(new) for _, new in items]
        hidden = self._run(attention.BatchForward(parts, sizes), tokens, torch.cat(positions),
                           dense)
        for sequence, _ in items:
            if sequence is not None and finish:
                self.cache.finish(sequence)
        return list(hidden.split(sizes))

    def _run(self, paged: attention.BatchForward, tokens: list[int], positions: torch.Tensor,
             dense: bool | None = None) -> torch.Tensor:
        """The model over `tokens` at `positions` with paged attention; the final hidden states.
        Unless `dense` says otherwise, a pass of prompt tokens only (no part of one token) from
        `DENSE_ROWS` rows multiplies int8 weights through bfloat16 GEMM (engine/quantize.py)."""
        if dense is None:
            dense = min(paged.sizes) > 1 and sum(paged.sizes) >= DENSE_ROWS
        fused = getattr(self.model, "pyagent_fused", None)
        with torch.inference_mode(), dense_prompt() if dense else nullcontext():
            if fused is not None:
                return fused(torch.tensor(tokens), positions, paged)
            out = self.model.model(input_ids=torch.tensor([tokens]), position_ids=positions[None],
                                   attention_mask=self._no_masks, use_cache=False, paged=paged)
        return out.last_hidden_state[0]

    def reconstruct(self, sequence: Sequence) -> None:
        """Score the held global tokens for query-agnostic eviction, as KVzip does: the tokens
        not scored yet are fed again after an instruction to repeat the text, in chunks, as
        queries only (nothing is stored), and every held token's "recon" statistic becomes the
        most attention a reconstructing query paid it. Tokens the model must look up to repeat
        the context (names, numbers, paths) score high; what it can predict scores low."""
        chunk = self.kv.prefill_chunk
        for start in range(sequence.scored, sequence.length, chunk):
            tokens = self._repeat_ids + sequence.tokens[start:start + chunk]
            plan = self.cache.probe_plan(sequence, len(tokens))
            part = attention.PagedForward(self.cache, sequence, plan, probe=True)
            self._run(attention.BatchForward([part], [len(tokens)]), tokens,
                      plan.query_positions)
        sequence.scored = sequence.length

    @cached_property
    def _repeat_ids(self) -> list[int]:
        return self.tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]

    def _trims(self, sequence: Sequence, new: int) -> bool:
        """Whether a pass of `new` tokens on `sequence` trims its sliding-window layers: when
        the sequence is evicted, when eviction is due after the pass, or when a budget in bytes
        would otherwise be exceeded by more than the pass's global tokens."""
        budget = self.kv.budget
        if self.policy is None or budget is None:
            return False
        if sequence.evicted:
            return True
        try:
            keep = budget.global_tokens(self.cache, sequence, new)
        except RequestError:  # the budget cannot hold this sequence: eviction will say so
            return True
        bs = self.kv.block_size
        if sequence.tables["global"].tokens(bs) + new > keep:
            return True
        if budget.bytes is None:
            return False
        per_token = {name: pool.bytes_per_block // bs for name, pool in self.cache.pools.items()}
        after = self.cache.memory(sequence).bytes + new * sum(per_token.values())
        return after > budget.bytes + new * per_token["global"]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits for hidden states ([n, hidden] -> [n, vocab])."""
        with torch.inference_mode():
            logits = self.model.lm_head(hidden)
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            return torch.tanh(logits / cap) * cap if cap else logits

    def prefill(self, sequence: Sequence, prompt_ids: list[int]) -> torch.Tensor:
        """Compute the prompt tokens the cache lacks, in chunks, applying the eviction budget
        after every chunk (so the KV never exceeds the budget by more than a chunk); return the
        logits after the last prompt token."""
        todo = prompt_ids[sequence.length:]
        if not todo:
            raise RequestError("the whole prompt is in the cache already: at least its last "
                               "token must be computed", param="prompt")
        chunk = self.kv.prefill_chunk
        for start in range(0, len(todo), chunk):
            hidden = self.forward(sequence, todo[start:start + chunk])
            self.after_prompt_chunk(sequence, last=start + chunk >= len(todo))
        return self.logits(hidden[-1])

    def after_prompt_chunk(self, sequence: Sequence, last: bool) -> int:
        """Apply the budget after a prompt chunk: after every chunk, or only after the `last`
        one when `prefill_eviction` is "prompt"; the number of tokens dropped."""
        if self.kv.prefill_eviction == "prompt" and not last:
            return 0
        return self.enforce_budget(sequence)

    def decode(self, sequence: Sequence, token: int) -> torch.Tensor:
        """Append one token; evict every `evict_every` decoded tokens; the next logits."""
        logits = self.logits(self.forward(sequence, [token])[-1])
        if (sequence.length - sequence.prompt_length) % self.kv.evict_every == 0:
            self.enforce_budget(sequence)
        return logits

    def enforce_budget(self, sequence: Sequence) -> int:
        """Evict down to the budget now; the number of tokens dropped. A ratio budget never
        goes below what the policy always pins (a short prompt keeps its sink and recent
        window)."""
        if self.policy is None or self.kv.budget is None:
            return 0
        keep = self.kv.budget.global_tokens(self.cache, sequence)
        if self.kv.budget.ratio is not None:
            keep = max(keep, self.policy.least(self.kv.block_size))
        if self.policy.reconstructs and \
                sequence.tables["global"].tokens(self.kv.block_size) > keep:
            self.reconstruct(sequence)
        return evict(self.cache, sequence, self.policy, keep)

    def json_constraint(self, schema: dict, param: str = "response_format") -> JsonConstraint:
        """A fresh constraint for one generation against `schema` (`param`: whose schema)."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.chat_stop_ids)
        return JsonConstraint(self._grammar_tokenizer, schema, self.model.config.vocab_size, param)

    # --- requests ------------------------------------------------------------------------------

    def encode(self, request: CompletionRequest) -> list[int]:
        """The prompt's token ids (chat requests through the chat template). Prompt text and
        message content are plain text unless the request sets `parse_special_tokens`; the chat
        template's own markup holds control tokens."""
        if isinstance(request.prompt, tuple):
            return self._check_ids(request.prompt)
        if request.messages is not None:
            messages = as_text_messages(request.messages, request.tools)
            pieces = render_chat(self.tokenizer, self.model.config.model_type, messages)
        else:
            assert request.prompt is not None
            pieces = [Piece(request.prompt, False)]
        if request.parse_special_tokens:
            pieces = [Piece("".join(p.text for p in pieces), True)]
        param = "messages" if request.is_chat else "prompt"
        self._check_text(pieces, param)
        ids: list[int] = []
        for piece in pieces:  # a text prompt gets the tokenizer's BOS, a chat its template's
            ids += self.tokenize(piece.text, add_special_tokens=not (request.is_chat or ids),
                                 plain=not piece.markup)
        return ids

    def tokenize(self, text: str, add_special_tokens: bool = True, plain: bool = False
                 ) -> list[int]:
        """Token ids of `text`; `plain` reads special-token text as plain text. Safe to call
        from many threads."""
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens,
                                       split_special_tokens=plain)["input_ids"])

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: bounds a text's token count from below."""
        return max(map(len, self.tokenizer.get_vocab()))

    def _check_text(self, pieces: list[Piece], param: str) -> None:
        """Refuse text that cannot be tokenized, or that holds more tokens than the context
        for sure (counted without tokenizing it)."""
        for piece in pieces:
            try:
                piece.text.encode()
            except UnicodeEncodeError as exc:
                raise RequestError(f"{param} is not valid Unicode: {exc.reason} at character "
                                   f"{exc.start}", param=param, code="invalid_value") from None
        chars = sum(len(p.text) for p in pieces)
        if chars // self.max_token_chars >= self.context_length:
            raise RequestError(
                f"this request's prompt holds at least {chars // self.max_token_chars} tokens "
                f"({chars} characters), but {self.name}'s context is {self.context_length} "
                f"tokens", param=param, code="context_length_exceeded")

    def _check_ids(self, ids: tuple[int, ...]) -> list[int]:
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"(0..{vocab - 1})", param="prompt", code="invalid_value")
        return list(ids)

    def check_fits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        if prompt_tokens + max_tokens > self.context_length:
            raise RequestError(
                f"this request needs {prompt_tokens} prompt tokens + {max_tokens} max_tokens = "
                f"{prompt_tokens + max_tokens} tokens, but {self.name}'s context is "
                f"{self.context_length} tokens", param=param, code="context_length_exceeded")
        reserve = self.kv_reservation(prompt_tokens, max_tokens)
        budget = self.kv_token_budget()
        for group, tokens in reserve.items():
            if tokens > budget[group]:
                raise RequestError(
                    f"this request may need {tokens} tokens of KV in the {group} layers "
                    f"({prompt_tokens} prompt + {max_tokens} max_tokens, in blocks of "
                    f"{self.kv.block_size}), but the engine's KV budget there is "
                    f"{budget[group]} tokens", param="max_tokens", code="kv_budget_exceeded")

    def generate(self, request: CompletionRequest) -> Completion:
        """Run `request` to completion."""
        *_, last = self.stream(request)
        assert last.completion is not None
        return last.completion

    def generate_many(self, requests: list[CompletionRequest]
                      ) -> list[Completion | PyAgentError]:
        """Run `requests` at once, batched by the scheduler on this thread; each one's
        completion, or the error that ended it, in order. This thread alone runs the passes
        (OpenMP wakes its workers quickly only while one thread uses it)."""
        tickets = [self.submit(request) for request in requests]
        self.scheduler.run(stop=lambda: all(ticket.outcome() is not None for ticket in tickets))
        return [ticket.outcome() or ticket.result() for ticket in tickets]

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        """Yield text deltas as they become final; the last event carries the `Completion`.

        The request is validated and queued here, before the first event, so errors (including
        a full queue) surface at the call. Closing the iterator early cancels the request.
        """
        return iter(self.submit(request))

    def submit(self, request: CompletionRequest, loop: asyncio.AbstractEventLoop | None = None,
               prompt_ids: list[int] | None = None) -> Ticket:
        """Validate and queue `request`; its events arrive on the returned ticket (readable with
        `async for` on `loop` when one is given). `prompt_ids`: `encode(request)`, when the
        caller has it already."""
        if prompt_ids is None:
            prompt_ids = self.encode(request)
        max_tokens = request.sampling.max_tokens
        self.check_fits(len(prompt_ids), max_tokens, "messages" if request.is_chat else "prompt")
        stop_ids = self.chat_stop_ids if request.is_chat else self.eos_ids
        if request.sampling.ignore_eos:
            stop_ids = set()
        constraint = None
        if request.sampling.json_schema is not None:
            constraint = self.json_constraint(request.sampling.json_schema)
        elif (schema := reply_schema(request)) is not None:
            constraint = self.json_constraint(schema, param="tools")
        ticket = Ticket(self.scheduler, loop)
        decoder = Decoder(self.name, self.tokenizer, prompt_ids, request, stop_ids, constraint)
        self.scheduler.submit(Job(prompt_ids, decoder, ticket,
                                  self.kv_reservation(len(prompt_ids), max_tokens)))
        return ticket
