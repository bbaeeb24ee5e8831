"""Request and result types shared by the engine and every backend.

Plain frozen dataclasses: they sit on the hot path and are cheap to build. Validation happens on
construction, so an invalid value never reaches a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pyagent.errors import RequestError

FinishReason = Literal["stop", "length", "tool_calls"]
ToolChoice = Literal["auto", "required", "none"]
ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "required", "none")
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # most alternatives a token's log probabilities list
SEED_RANGE = (-2**63, 2**64 - 1)  # what the sampler's generator accepts


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy decoding (the default: reproducible).

    `top_k == 0` and `top_p == 1` disable those filters; `seed` makes sampled decoding repeatable.
    `ignore_eos` keeps generating past end-of-sequence tokens (for benchmarks of fixed length);
    `json_schema` constrains the output to JSON valid for that schema. `logprobs` asks for each
    generated token's log probability and that many most likely alternatives (None: none).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    json_schema: dict[str, Any] | None = None  # constrain the output to JSON matching it
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_real(self.temperature) and 0.0 <= self.temperature <= 2.0, "temperature",
               f"temperature must be a number in [0, 2], got {self.temperature!r}")
        _check(_is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
               f"top_p must be a number in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k",
               f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(self.seed is None or (_is_int(self.seed) and
                                     SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]), "seed",
               f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "stop strings must be non-empty strings")
        _check(self.json_schema is None or isinstance(self.json_schema, dict), "json_schema",
               "json_schema must be a JSON schema object")
        _check(self.logprobs is None or (_is_int(self.logprobs) and
                                         0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), "tools",
               f"a tool needs a non-empty name, got {self.name!r}")
        _check(isinstance(self.parameters, dict), "tools",
               f"tool {self.name!r}: parameters must be a JSON schema object")


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text it wrote (it may not parse)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One chat message. An assistant message may carry tool calls; a tool message answers the
    call named by `tool_call_id`."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        _check(self.role in ROLES, "messages",
               f"message role must be one of {', '.join(ROLES)}, got {self.role!r}")
        _check(isinstance(self.content, str), "messages",
               f"message content must be a string, got {type(self.content).__name__}")
        object.__setattr__(self, "tool_calls", tuple(
            c if isinstance(c, ToolCall) else ToolCall(**c) for c in self.tool_calls))
        _check(not self.tool_calls or self.role == "assistant", "messages",
               "only assistant messages may carry tool calls")
        _check((self.tool_call_id is not None) == (self.role == "tool"), "messages",
               "a tool message needs the tool_call_id it answers (and only a tool message has one)")


@dataclass(frozen=True)
class CompletionRequest:
    """A text completion (`prompt`: text or token ids) or a chat completion (`messages`): exactly
    one of the two.

    A chat request may offer `tools`; `tool_choice` says whether the model may (`auto`), must
    (`required`) or must not (`none`) call one, and `allowed_tools` narrows which of them it may
    call without changing what it is told about (so a prompt cache over the tools survives).
    Text in the prompt and in messages is plain text: special-token text such as
    `<start_of_turn>` is not a control token unless `parse_special_tokens` is set.
    `timeout_s` is how long the caller waits for the reply: a remote backend gives up after that
    long without a byte from its server (a caller of a stream may stop reading it at any time).
    """

    prompt: str | tuple[int, ...] | None = None
    messages: tuple[Message, ...] | None = None
    model: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    allowed_tools: tuple[str, ...] | None = None
    parse_special_tokens: bool = False
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompt, list | tuple):
            object.__setattr__(self, "prompt", tuple(self.prompt))
            _check(bool(self.prompt) and all(_is_int(t) and t >= 0 for t in self.prompt),
                   "prompt", "a prompt of token ids needs at least one id, each an integer >= 0")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(
                m if isinstance(m, Message) else Message(**m) for m in self.messages))
        object.__setattr__(self, "tools", tuple(
            t if isinstance(t, ToolSpec) else ToolSpec(**t) for t in self.tools))
        if self.allowed_tools is not None:
            object.__setattr__(self, "allowed_tools", tuple(self.allowed_tools))
        _check((self.prompt is None) != (self.messages is None), "prompt",
               "a request needs exactly one of prompt and messages")
        _check(self.messages is None or len(self.messages) > 0, "messages",
               "messages must not be empty")
        _check(not self.tools or self.messages is not None, "tools",
               "tools need a chat request (messages)")
        _check(self.tool_choice in TOOL_CHOICES, "tool_choice",
               f"tool_choice must be one of {', '.join(TOOL_CHOICES)}, got {self.tool_choice!r}")
        names = [t.name for t in self.tools]
        _check(len(set(names)) == len(names), "tools", "tool names must be unique")
        unknown = set(self.allowed_tools or ()) - set(names)
        _check(not unknown, "allowed_tools",
               f"allowed_tools names tools the request does not offer: {sorted(unknown)}")
        _check(self.tool_choice != "required" or bool(self.callable_tools), "tool_choice",
               "tool_choice 'required' needs at least one tool")
        _check(not self.tools or self.sampling.json_schema is None, "response_format",
               "a request cannot combine tools with a JSON schema for the reply")
        _check(not self.tools or self.sampling.logprobs is None, "logprobs",
               "log probabilities are not available for a request that offers tools")
        _check(self.timeout_s is None or self.timeout_s > 0, "timeout_s",
               f"timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def callable_tools(self) -> tuple[ToolSpec, ...]:
        """The tools the model may call in this request."""
        if self.tool_choice == "none":
            return ()
        if self.allowed_tools is None:
            return self.tools
        return tuple(t for t in self.tools if t.name in self.allowed_tools)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    """Token counts as the model's own tokenizer (or the provider's usage fields) report them.

    `cached_tokens` counts prompt tokens served from a cache instead of being prefilled;
    `cache_write_tokens` counts prompt tokens written to a provider's prompt cache (billed at a
    cache-write rate). Both are part of `prompt_tokens`.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one completion, in seconds, measured where the caller sits."""

    time_to_first_token_s: float
    total_s: float
    completion_tokens: int
    queue_s: float | None = None  # waiting for a batch slot or KV budget (None: not known)
    draft_tokens: int = 0  # speculative decoding: tokens drafted from the context
    accepted_tokens: int = 0  # ...and how many of them the model confirmed

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        decode_time = self.total_s - self.time_to_first_token_s
        if self.completion_tokens < 2 or decode_time <= 0:
            return 0.0
        return (self.completion_tokens - 1) / decode_time


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model (before temperature and filters),
    where its text starts in the completion's text, and the most likely alternatives."""

    token: str
    logprob: float
    offset: int = 0
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """The result of one request, whatever the backend."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str
    backend: str
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None  # when the request asked for them
    kv_peak_bytes: int | None = None  # most KV bytes the request held at once (embedded engine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        return cls(
            text=data["text"],
            finish_reason=data["finish_reason"],
            usage=Usage(**data["usage"]),
            timings=Timings(**data["timings"]),
            model=data["model"],
            backend=data["backend"],
            tool_calls=tuple(ToolCall(**c) for c in data.get("tool_calls", ())),
            logprobs=None if data.get("logprobs") is None else tuple(
                TokenLogprob(t["token"], t["logprob"], t["offset"],
                             tuple(map(tuple, t["top"]))) for t in data["logprobs"]),
            kv_peak_bytes=data.get("kv_peak_bytes"),
        )


@dataclass(frozen=True)
class StreamEvent:
    """One item of a stream: a piece of text, and on the last item the whole `Completion`; with
    the log probabilities of the tokens of that text when the request asked for them."""

    delta: str
    completion: Completion | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise RequestError(message, param=param, code="invalid_value")
