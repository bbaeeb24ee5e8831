"""An OpenAI-compatible HTTP server for the embedded engine.

`/v1/models`, `/v1/completions` and `/v1/chat/completions`, streaming over SSE, errors in OpenAI's
error shape. Requests run on the engine's scheduler, batched together; when its queue is full the
answer is 429 (503 while it shuts down) with a `Retry-After` header, and a client that goes away
mid-request has its sequence cancelled and its KV freed.
Structured outputs (`response_format` json_schema / json_object) and tool calls (`tools`,
`tool_choice`) are grammar-constrained, so a call always parses and matches its tool's schema.
Extensions beyond OpenAI: `top_k` and `ignore_eos` in requests, `timings` (seconds) in every final
response, and `GET /v1/kv` for the KV cache's memory and the scheduler's load.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pyagent import __version__
from pyagent.engine.generate import Engine
from pyagent.engine.registry import ALIASES
from pyagent.engine.scheduler import Ticket
from pyagent.errors import OverloadedError, RequestError
from pyagent.types import (
    Completion,
    CompletionRequest,
    Message,
    SamplingParams,
    ToolCall,
    ToolSpec,
)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Body(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI's API does."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: ResponseFormat | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a requested feature this engine does not offer."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence and frequency penalties are not supported"
        for field in ("logprobs", "top_logprobs", "logit_bias", "functions", "echo", "suffix"):
            if (self.model_extra or {}).get(field) not in (None, False, {}, []):
                return field, f"{field} is not supported by this server"
        return None

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema `response_format` asks for (None: free text)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        if fmt.json_schema is None or not isinstance(fmt.json_schema.get("schema"), dict):
            raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                           "response_format")
        return fmt.json_schema["schema"]


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallBody(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    def to_message(self) -> Message:
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or [])
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments)
                      for c in self.tool_calls or [])
        return Message("system" if self.role == "developer" else self.role, content,
                       tool_calls=calls, tool_call_id=self.tool_call_id)


class FunctionBody(BaseModel):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolBody(BaseModel):
    type: Literal["function"]
    function: FunctionBody


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolBody] | None = None
    tool_choice: Literal["auto", "required", "none"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # replies hold at most one call either way

    def tool_request(self) -> dict[str, Any]:
        """The request's tools, tool_choice and allowed_tools as `CompletionRequest` fields."""
        tools = tuple(ToolSpec(t.function.name, t.function.description, t.function.parameters)
                      for t in self.tools or [])
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            return {"tools": tools, "tool_choice": "required",
                    "allowed_tools": (choice.function.name,)}
        return {"tools": tools, "tool_choice": choice}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving `engine` under its model name (and that name's aliases)."""
    app = FastAPI(title="PyAgent engine", version=__version__)
    served = {engine.name} | {alias for alias, name in ALIASES.items() if name == engine.name}
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _param_path(first.get("loc", ()))
        message = first.get("msg", "invalid request")
        where = f" at '{param}'" if param else ""
        return JSONResponse(APIError(400, f"invalid request{where}: {message}", param).body(),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {exc}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": created, "owned_by": "pyagent",
             "context_length": engine.context_length}]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/kv")
    async def kv() -> dict[str, Any]:
        """PyAgent extension: KV bytes the engine holds now and at its peak, per layer."""
        memory = engine.cache.memory()
        settings = engine.kv
        return {"bytes": memory.bytes, "peak_bytes": memory.peak_bytes,
                "cached_prefix_bytes": memory.cached_prefix_bytes,
                "capacity_bytes": memory.capacity_bytes,
                "per_layer": {str(k): v for k, v in memory.per_layer.items()},
                "block_size": settings.block_size, "policy": settings.policy,
                "budget": None if settings.budget is None else vars(settings.budget),
                "prefix_sharing": settings.share_prefix, "scheduler": engine.scheduler.load()}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, http: Request) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be a string or a list of exactly one string",
                               "prompt")
            prompt = prompt[0]
        request = _request(engine, served, body, prompt=prompt, max_tokens=body.max_tokens)
        return await _respond(engine, body, request, "text_completion", http)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody, http: Request) -> Any:
        try:
            messages = tuple(m.to_message() for m in body.messages)
        except RequestError as exc:
            raise APIError(400, str(exc), exc.param, exc.code) from exc
        max_tokens = body.max_completion_tokens or body.max_tokens
        request = _request(engine, served, body, messages=messages, max_tokens=max_tokens,
                           **body.tool_request())
        return await _respond(engine, body, request, "chat.completion", http)

    return app


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """'messages.0.role' from pydantic's location, leaving out union branch tags like 'str'."""
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            break
        parts.append(str(part))
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _request(engine: Engine, served: set[str], body: _Body, *, max_tokens: int | None,
             prompt: str | None = None, messages: tuple[Message, ...] | None = None,
             **tools: Any) -> CompletionRequest:
    if body.model not in served:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                            f"{engine.name!r}", "model", "model_not_found")
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem[1], problem[0], "unsupported_parameter")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        if max_tokens is None:  # OpenAI's default: whatever the context leaves
            probe = CompletionRequest(prompt=prompt, messages=messages, model=engine.name,
                                      **tools)
            max_tokens = max(1, engine.context_length - len(engine.encode(probe)))
        sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                  top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=stop,
                                  ignore_eos=body.ignore_eos, json_schema=body.json_schema())
        return CompletionRequest(prompt=prompt, messages=messages, model=engine.name,
                                 sampling=sampling, **tools)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param, exc.code) from exc


async def _respond(engine: Engine, body: _Body, request: CompletionRequest, kind: str,
                   http: Request) -> Any:
    try:
        ticket = await run_in_threadpool(engine.submit, request, asyncio.get_running_loop())
    except OverloadedError as exc:
        status = 503 if exc.code == "engine_closed" else 429
        raise APIError(status, str(exc), code=exc.code, kind="server_error" if status == 503
                       else "rate_limit_error", headers={"Retry-After": str(exc.retry_after)}
                       ) from exc
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param, exc.code) from exc
    response_id = f"{'chatcmpl' if request.is_chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _sse(ticket, response_id, created, kind, engine.name, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    completion = await _drain(ticket, http)
    if completion is None:  # the client went away; nobody reads this
        return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
    if request.is_chat:
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        if completion.tool_calls:
            message.update(content=completion.text or None,
                           tool_calls=_tool_calls(completion.tool_calls))
        choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason,
                  "logprobs": None}
    return {"id": response_id, "object": kind, "created": created, "model": engine.name,
            "choices": [choice], "usage": _usage(completion), "timings": _timings(completion)}


async def _drain(ticket: Ticket, http: Request) -> Completion | None:
    """The ticket's completion; None (and the request cancelled) if the client disconnects."""
    completion: Completion | None = None
    failure: Exception | None = None

    async def collect() -> None:
        nonlocal completion, failure
        try:
            async for event in ticket:
                completion = event.completion or completion
        except Exception as exc:  # re-raised below, outside the task group
            failure = exc
        group.cancel_scope.cancel()

    async def watch() -> None:
        while not await http.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        ticket.cancel()
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(collect)
        group.start_soon(watch)
    if failure is not None:
        raise failure
    return completion


async def _sse(ticket: Ticket, response_id: str, created: int, kind: str, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": response_id, "object": chunk_kind, "created": created, "model": model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(text: str, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": 0, "delta": delta if text or first else {}, "finish_reason": finish,
                    "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    try:
        if chat:
            yield chunk([choice("", None, first=True)])
        async for event in ticket:  # a disconnect cancels this generator, and so the ticket
            if event.delta:
                yield chunk([choice(event.delta, None)])
            if event.completion is not None:
                done = event.completion
                if done.tool_calls:
                    yield chunk([{"index": 0, "delta": {"tool_calls": _tool_calls(
                        done.tool_calls)}, "finish_reason": None, "logprobs": None}])
                yield chunk([choice("", done.finish_reason)], timings=_timings(done))
                if include_usage:
                    yield chunk([], usage=_usage(done))
    except Exception as exc:  # the status line is already sent: report in the stream
        error = APIError(500, f"generation failed: {exc}", kind="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"


def _tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"index": i, "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


def _usage(completion: Completion) -> dict[str, Any]:
    u = completion.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _timings(completion: Completion) -> dict[str, float]:
    t = completion.timings
    return {"time_to_first_token_s": round(t.time_to_first_token_s, 6),
            "total_s": round(t.total_s, 6), "tokens_per_s": round(t.tokens_per_s, 3)}
