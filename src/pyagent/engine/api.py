"""The bodies of the OpenAI-compatible API: requests as strict pydantic models (a wrong type is
an error, never coerced: `max_tokens: true` and `stream: "yes"` are refused), and the responses
they get, which document the API in its OpenAPI schema.

Fields OpenAI defines but this engine cannot honour are refused when they ask for something
(`unsupported`); fields nobody defines are ignored, so clients may send vendor extensions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from pyagent.engine.grammar import schema_problem
from pyagent.engine.toolcalls import arguments_schema
from pyagent.types import MAX_LOGPROBS, SEED_RANGE, Message, SamplingParams, ToolCall, ToolSpec

MAX_CHOICES = 128  # n times the number of prompts
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions


def _unicode(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"text must be valid Unicode: {exc.reason} at character {exc.start}"
                         ) from None
    return text


def _unicode_tree(value: Any) -> Any:
    """`value` (JSON) if every string in it, keys included, is valid Unicode."""
    if isinstance(value, str):
        _unicode(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _unicode(key)
            _unicode_tree(item)
    elif isinstance(value, list):
        for item in value:
            _unicode_tree(item)
    return value


def _usable_schema(schema: dict[str, Any]) -> dict[str, Any]:
    problem = schema_problem(schema)
    if problem:
        raise ValueError(f"not a usable JSON schema: {problem}")
    return schema


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Function parameters: an object schema, usable as the reply format holds it."""
    if schema.get("type") != "object":
        raise ValueError(f"function parameters must be a JSON schema of type 'object', got "
                         f"type {schema.get('type')!r}")
    _usable_schema(arguments_schema(schema))
    return schema


def _integral(value: Any) -> Any:
    """JSON Schema's integers include numbers like 2.0; other types stay as they are (refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int(**bounds: int) -> Any:
    """An integer type within `bounds` (`ge`, `le`) that takes integral numbers like 2.0."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]  # this order: see schema


NonNegative = _int(ge=0)
Positive = _int(ge=1)
Seed = _int(ge=SEED_RANGE[0], le=SEED_RANGE[1])
Choices = _int(ge=1, le=MAX_CHOICES)
LogprobCount = _int(ge=0, le=MAX_COMPLETION_LOGPROBS)
TopLogprobs = _int(ge=0, le=MAX_LOGPROBS)
Text = Annotated[str, AfterValidator(_unicode)]
Json = Annotated[dict[str, Any], AfterValidator(_unicode_tree)]
Schema = Annotated[Json, AfterValidator(_usable_schema)]
TokenIds = Annotated[list[NonNegative], Field(min_length=1)]


class Strict(BaseModel):
    """A request body part: types are checked, not coerced."""

    model_config = ConfigDict(strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: Text = "response"
    description: Text | None = None
    schema_: Schema = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Body(Strict):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: Text
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: NonNegative = Field(0, description="PyAgent extension: sample among the k likeliest")
    ignore_eos: bool = Field(False, description="PyAgent extension: generate past end tokens")
    parse_special_tokens: bool = Field(
        False, description="PyAgent extension: read special-token text in the prompt or in "
        "messages (such as <start_of_turn>) as control tokens instead of plain text")
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Choices = 1
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: Text | None = None

    def problem(self) -> tuple[str, str] | None:
        """(param, message) for a request this server refuses though its fields are valid."""
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence and frequency penalties are not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        for field in ("functions", "function_call", "audio", "prediction", "suffix"):
            if (self.model_extra or {}).get(field) not in (None, False, {}, [], ""):
                return field, f"{field} is not supported by this server"
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            return "response_format.json_schema", "response_format of type json_schema needs " \
                "json_schema.schema"
        return None

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema `response_format` asks for (None: free text)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        assert fmt.json_schema is not None
        return fmt.json_schema.schema_

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The sampling parameters of this request."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=stop,
                              ignore_eos=self.ignore_eos, json_schema=self.json_schema(),
                              logprobs=logprobs)


class CompletionBody(Body):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)]
    max_tokens: Positive | None = 16
    echo: bool = False
    logprobs: LogprobCount | None = None
    best_of: Choices | None = None

    def problem(self) -> tuple[str, str] | None:
        if self.best_of not in (None, self.n):
            return "best_of", "best_of is not supported (only best_of equal to n)"
        if self.echo and self.logprobs is not None:
            return "echo", "echo with logprobs (the prompt's log probabilities) is not supported"
        if len(self.prompts()) * self.n > MAX_CHOICES:
            return "n", f"n times the number of prompts must be at most {MAX_CHOICES}"
        return super().problem()

    def prompts(self) -> list[str | tuple[int, ...]]:
        """The prompts: texts or token id sequences."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [tuple(prompt)]  # type: ignore[arg-type]
        return [p if isinstance(p, str) else tuple(p) for p in prompt]  # type: ignore[misc]


class ContentPart(Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(Strict):
    name: Text
    arguments: Text


class ToolCallBody(Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    """A message; what it needs depends on its role, as in OpenAI's API: content, unless it is an
    assistant's message with tool calls; a tool message also the id of the call it answers."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCallBody] | None = None
    content: Text | list[ContentPart] | None = Field(None, validate_default=True)
    name: Text | None = None
    tool_call_id: Text | None = Field(None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _calls_need_an_assistant(cls, calls: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if calls is not None and role not in (None, "assistant"):
            raise PydanticCustomError("extra_forbidden", "only assistant messages carry "
                                      "tool_calls, not {role} messages", {"role": role})
        return calls

    @field_validator("content")
    @classmethod
    def _content_unless_calls(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if content is None and role is not None and not (
                role == "assistant" and info.data.get("tool_calls")):
            needs = "content or tool_calls" if role == "assistant" else "content"
            raise PydanticCustomError("missing", "{role} messages need {needs}",
                                      {"role": role, "needs": needs})
        return content

    @field_validator("tool_call_id")
    @classmethod
    def _id_for_tool_messages(cls, call_id: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if role == "tool" and call_id is None:
            raise PydanticCustomError("missing", "a tool message needs the tool_call_id of "
                                      "the call it answers", {})
        if role not in (None, "tool") and call_id is not None:
            raise PydanticCustomError("extra_forbidden", "only tool messages carry a "
                                      "tool_call_id, not {role} messages", {"role": role})
        return call_id

    def to_message(self) -> Message:
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or [])
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments)
                      for c in self.tool_calls or [])
        return Message("system" if self.role == "developer" else self.role, content,
                       tool_calls=calls, tool_call_id=self.tool_call_id)


class FunctionBody(Strict):
    name: Text = Field(min_length=1, max_length=64, pattern="^[a-zA-Z0-9_-]+$")
    description: Text = ""
    parameters: Annotated[Json, AfterValidator(_object_schema)] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        json_schema_extra={"required": ["type"], "properties": {"type": {"const": "object"}}})
    strict: bool | None = None


class ToolBody(Strict):
    type: Literal["function"]
    function: FunctionBody


class FunctionName(Strict):
    name: Text


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    tools: list[ToolBody] | None = None
    tool_choice: Literal["auto", "required", "none"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # replies hold at most one call either way
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    def problem(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        return super().problem()

    def logprob_count(self) -> int | None:
        """How many alternatives each token's log probability lists (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_request(self) -> dict[str, Any]:
        """The request's tools, tool_choice and allowed_tools as `CompletionRequest` fields."""
        tools = tuple(ToolSpec(t.function.name, t.function.description, t.function.parameters)
                      for t in self.tools or [])
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            return {"tools": tools, "tool_choice": "required",
                    "allowed_tools": (choice.function.name,)}
        return {"tools": tools, "tool_choice": choice}


# --- responses (they document the API; handlers build plain dicts of the same shape) ----------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TimingsBody(BaseModel):
    time_to_first_token_s: float
    total_s: float
    tokens_per_s: float


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody | None = None
    timings: TimingsBody | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobBody(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobBody] | None
    refusal: list[TokenLogprobBody] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    index: int
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody
    timings: TimingsBody


class KVResponse(BaseModel):
    bytes: int
    peak_bytes: int
    cached_prefix_bytes: int
    capacity_bytes: int
    allocated_bytes: int
    per_layer: dict[str, int]
    block_size: int
    policy: str
    budget: dict[str, Any] | None
    prefix_sharing: bool
    scheduler: dict[str, int]


class Health(BaseModel):
    status: str
    model: str
    precision: str  # the engine's weights (`--dtype`; what auto chose)
    speculation: dict[str, int]  # prompt lookup: draft tokens per step, drafted, accepted
