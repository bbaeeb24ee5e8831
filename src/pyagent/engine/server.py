"""An OpenAI-compatible HTTP server for the embedded engine.

`/v1/models`, `/v1/completions` and `/v1/chat/completions`, streaming over SSE, errors in OpenAI's
error shape. Requests run on the engine's scheduler, batched together; when its queue is full the
answer is 429 (503 while it shuts down) with a `Retry-After` header, and a client that goes away
mid-request has its sequences cancelled and their KV freed. A body larger than `max_body_bytes`
is refused with 413 before it is read whole, and an unexpected error is a 500 in the same shape
that leaves a kept-alive connection open.
Several choices (`n`), several prompts, `echo` and log probabilities are supported; the choices
of one request run side by side on the scheduler.
Structured outputs (`response_format` json_schema / json_object) and tool calls (`tools`,
`tool_choice`) are grammar-constrained, so a call always parses and matches its tool's schema.
Extensions beyond OpenAI: `top_k`, `ignore_eos` and `parse_special_tokens` in requests, `timings`
(seconds) in every final response, and `GET /v1/kv` for the KV cache's memory and the scheduler's
load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pyagent import __version__
from pyagent.engine.api import (
    Body,
    ChatBody,
    ChatCompletionResponse,
    CompletionBody,
    CompletionResponse,
    ErrorResponse,
    Health,
    KVResponse,
    Model,
    ModelList,
)
from pyagent.engine.generate import Engine
from pyagent.engine.registry import ALIASES
from pyagent.engine.scheduler import Ticket
from pyagent.errors import OverloadedError, RequestError
from pyagent.types import Completion, CompletionRequest, StreamEvent, TokenLogprob

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there
MAX_BODY_BYTES = 4 * 2**20  # a full 32k-token context of text is ~130 KB; prompt lists need more
log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)
        self.headers = headers

    @classmethod
    def of(cls, exc: RequestError) -> APIError:
        """The answer to an engine's `RequestError`: 400, or 429/503 when it is overloaded."""
        if isinstance(exc, OverloadedError):
            status = 503 if exc.code == "engine_closed" else 429
            return cls(status, str(exc), code=exc.code,
                       kind="server_error" if status == 503 else "rate_limit_error",
                       headers={"Retry-After": str(exc.retry_after)})
        return cls(400, str(exc), exc.param, exc.code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Guard:
    """ASGI middleware: refuses bodies over `max_bytes` (413, counted as they arrive, so a huge
    body is never read whole), and answers an unexpected error with a 500 in OpenAI's shape
    without letting it reach the server, which would drop the connection."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            await too_large.response()(scope, receive, send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large.message)
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, sending)
        except Exception as exc:
            if started:  # the answer is under way: only closing the connection can end it
                raise
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            error = APIError(500, f"internal error: {type(exc).__name__}", kind="server_error")
            await error.response()(scope, receive, send)


_ERRORS = {
    400: "The request is invalid; `param` names the field.",
    404: "The model (or route) does not exist.",
    413: "The request body is too large.",
    429: "The engine's queue is full; retry after `Retry-After` seconds.",
    500: "An unexpected error (`server_error`); the connection stays open.",
    503: "The engine is shutting down; retry after `Retry-After` seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer"}}}
_METHOD_NOT_ALLOWED = {
    "description": "The path does not take this method (`method_not_allowed`); `Allow` lists "
                   "the methods it takes.",
    "headers": {"Allow": {"description": "The path's methods, comma-separated.",
                          "schema": {"type": "string"}}},
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI descriptions of the errors an operation may answer."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status],
                     **({"headers": _RETRY_AFTER} if status in (429, 503) else {})}
            for status in statuses}


def _generation(model: type) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a generation endpoint: JSON, or server-sent events when streaming."""
    return {200: {"model": model, "description": "The completion; with `stream`, server-sent "
                  "events (`data: {chunk}` lines, then `data: [DONE]`).",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_documented(400, 404, 413, 429, 503)}


def create_app(engine: Engine, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving `engine` under its model name (and that name's aliases)."""
    app = FastAPI(title="PyAgent engine", version=__version__, responses=_documented(500))
    app.add_middleware(Guard, max_bytes=max_body_bytes)
    served = {engine.name} | {alias for alias, name in ALIASES.items() if name == engine.name}
    created = int(time.time())
    model_card = {"id": engine.name, "object": "model", "created": created,
                  "owned_by": "pyagent", "context_length": engine.context_length}

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _param_path(first.get("loc", ()))
        cause = first.get("ctx", {}).get("error")
        message = str(cause) if first.get("type") == "value_error" and cause else first.get(
            "msg", "invalid request")  # without pydantic's "Value error, "
        where = f" at '{param}'" if param else ""
        return APIError(400, f"invalid request{where}: {message}", param).response()

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=exc.headers).response()

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}", response_model=Model, responses=_documented(404))
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(engine, served, model_id)
        return {**model_card, "id": model_id}

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        scheduler = engine.scheduler
        drafts = scheduler.speculation.draft_tokens if scheduler.speculates else 0
        return {"status": "ok", "model": engine.name, "precision": engine.loaded.precision,
                "speculation": {"draft_tokens": drafts, "drafted": scheduler.drafted,
                                "accepted": scheduler.accepted}}

    @app.get("/v1/kv", response_model=KVResponse)
    async def kv() -> dict[str, Any]:
        """PyAgent extension: KV bytes the engine holds now and at its peak, per layer."""
        memory = engine.cache.memory()
        settings = engine.kv
        return {"bytes": memory.bytes, "peak_bytes": memory.peak_bytes,
                "cached_prefix_bytes": memory.cached_prefix_bytes,
                "capacity_bytes": memory.capacity_bytes,
                "allocated_bytes": memory.allocated_bytes,
                "per_layer": {str(k): v for k, v in memory.per_layer.items()},
                "block_size": settings.block_size, "policy": settings.policy,
                "budget": None if settings.budget is None else vars(settings.budget),
                "prefix_sharing": settings.share_prefix, "scheduler": engine.scheduler.load()}

    @app.post("/v1/completions", response_model=None,
              responses=_generation(CompletionResponse))
    async def completions(body: CompletionBody, http: Request) -> Any:
        _check(engine, served, body)
        requests = [CompletionRequest(prompt=prompt, model=engine.name,
                                      parse_special_tokens=body.parse_special_tokens)
                    for prompt in body.prompts()]
        reply = Reply("text_completion", engine.name, body.n, body.echo)
        return await _serve(engine, body, requests, body.max_tokens, body.logprobs, reply, http)

    @app.post("/v1/chat/completions", response_model=None,
              responses=_generation(ChatCompletionResponse))
    async def chat(body: ChatBody, http: Request) -> Any:
        _check(engine, served, body)
        try:
            request = CompletionRequest(
                messages=tuple(m.to_message() for m in body.messages), model=engine.name,
                parse_special_tokens=body.parse_special_tokens, **body.tool_request())
        except RequestError as exc:
            raise APIError.of(exc) from exc
        reply = Reply("chat.completion", engine.name, body.n)
        return await _serve(engine, body, [request],
                            body.max_completion_tokens or body.max_tokens,
                            body.logprob_count(), reply, http)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, less the 422 it adds by default (invalid requests are 400s),
    and with the 405 a path answers to methods it does not take: operations cannot document
    it (it answers no operation), so each path describes it and the response is a component."""
    if app.openapi_schema is None:
        FastAPI.openapi(app)
        schema = app.openapi_schema
        assert schema is not None
        for path in schema["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
            allowed = ", ".join(method.upper() for method in path if method in _HTTP_METHODS)
            path["description"] = (
                f"Other methods are answered 405 with `Allow: {allowed}` (the response "
                "#/components/responses/MethodNotAllowed).")
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        schema["components"].setdefault("responses", {})["MethodNotAllowed"] = (
            _METHOD_NOT_ALLOWED)
    return app.openapi_schema


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """'messages.0.role' from pydantic's location, leaving out union branch tags like 'str'."""
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            break
        parts.append(str(part))
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _check_model(engine: Engine, served: set[str], model: str) -> None:
    if model not in served:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                            f"{engine.name!r}", "model", "model_not_found")


def _check(engine: Engine, served: set[str], body: Body) -> None:
    """Refuse an unknown model (404) or a request this server does not support (400)."""
    _check_model(engine, served, body.model)
    problem = body.problem()
    if problem:
        raise APIError(400, problem[1], problem[0], "unsupported_parameter")


def _prompt_text(engine: Engine, request: CompletionRequest) -> str:
    """A prompt as text (token ids decoded), for `echo`."""
    if isinstance(request.prompt, tuple):
        return engine.tokenizer.decode(list(request.prompt))
    assert request.prompt is not None
    return request.prompt


@dataclass(frozen=True)
class Reply:
    """How to answer: the object kind, the model name, choices per prompt, whether to echo the
    prompts (`prompts`: their text), the response's id and time."""

    kind: str
    model: str
    n: int
    echo: bool = False
    prompts: tuple[str, ...] = ()
    id: str = ""
    created: int = 0

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def echoed(self, index: int) -> str:
        """The text before choice `index`'s own: its prompt when echoing."""
        return self.prompts[index // self.n] if self.echo else ""


def _start(engine: Engine, loop: asyncio.AbstractEventLoop, body: Body,
           requests: Sequence[CompletionRequest], max_tokens: int | None,
           logprobs: int | None) -> list[Ticket]:
    """Queue `n` choices of each request; choice `i * n + j` is the j-th of prompt i. Each prompt
    is tokenized once; without `max_tokens`, its choices may fill the context."""
    tickets: list[Ticket] = []
    try:
        sampling = body.sampling(max_tokens or 1, logprobs)
        for request in requests:
            prompt_ids = engine.encode(request)
            room = max(1, engine.context_length - len(prompt_ids))
            for j in range(body.n):
                choice = replace(sampling, max_tokens=max_tokens or room,
                                 seed=_nth_seed(body.seed, j))
                tickets.append(engine.submit(replace(request, sampling=choice), loop, prompt_ids))
    except BaseException:
        for ticket in tickets:
            ticket.cancel()
        raise
    return tickets


def _nth_seed(seed: int | None, j: int) -> int | None:
    """The seed of a request's j-th choice: its own for the first, the next ones after."""
    return seed if seed is None or j == 0 else (seed + j) % 2**64


async def _serve(engine: Engine, body: Body, requests: Sequence[CompletionRequest],
                 max_tokens: int | None, logprobs: int | None, reply: Reply,
                 http: Request) -> Any:
    """Run the request's choices and answer with JSON, or with server-sent events."""
    try:
        tickets = await run_in_threadpool(_start, engine, asyncio.get_running_loop(), body,
                                          requests, max_tokens, logprobs)
    except RequestError as exc:
        raise APIError.of(exc) from exc
    prefix = "chatcmpl" if reply.chat else "cmpl"
    reply = replace(reply, id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()),
                    prompts=tuple(_prompt_text(engine, r) for r in requests) if reply.echo
                    else ())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(tickets, reply, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        completions = await _drain(tickets, http)
    except RequestError as exc:  # the engine shut down meanwhile
        raise APIError.of(exc) from exc
    if completions is None:  # the client went away; nobody reads this
        return APIError(499, "client closed the request").response()
    choices = [_choice(reply, i, c) for i, c in enumerate(completions)]
    return {"id": reply.id, "object": reply.kind, "created": reply.created,
            "model": reply.model, "choices": choices, "usage": _usage(completions, reply.n),
            "timings": _timings(completions)}


async def _drain(tickets: list[Ticket], http: Request) -> list[Completion] | None:
    """Every ticket's completion; None (and the requests cancelled) if the client disconnects."""
    completions: list[Completion | None] = [None] * len(tickets)
    failure: Exception | None = None

    async def collect(index: int, ticket: Ticket) -> None:
        nonlocal failure
        try:
            async for event in ticket:
                completions[index] = event.completion or completions[index]
        except Exception as exc:  # re-raised below, outside the task group
            failure = failure or exc
            group.cancel_scope.cancel()

    async def watch() -> None:
        while not await http.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        async with anyio.create_task_group() as collecting:
            for i, ticket in enumerate(tickets):
                collecting.start_soon(collect, i, ticket)
            group.start_soon(watch)
        group.cancel_scope.cancel()  # all collected: stop watching
    for ticket in tickets:
        ticket.cancel()
    if failure is not None:
        raise failure
    if any(c is None for c in completions):
        return None
    return completions  # type: ignore[return-value]


async def _events(tickets: list[Ticket]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """The events of all tickets as they come, with the index of each one's ticket."""
    queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]] = asyncio.Queue()

    async def forward(index: int, ticket: Ticket) -> None:
        try:
            async for event in ticket:
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(forward(i, t)) for i, t in enumerate(tickets)]
    running = len(tasks)
    try:
        while running:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for ticket in tickets:
            ticket.cancel()


async def _sse(tickets: list[Ticket], reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed reply; a disconnect cancels every choice."""
    chunk_kind = "chat.completion.chunk" if reply.chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": reply.id, "object": chunk_kind, "created": reply.created,
                   "model": reply.model, "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    done: dict[int, Completion] = {}
    try:
        for index in range(len(tickets)):
            opening = {"role": "assistant", "content": ""} if reply.chat else reply.echoed(index)
            if opening:
                yield chunk([_delta(reply, index, opening)])
        async for index, event in _events(tickets):
            if event.delta:
                yield chunk([_delta(reply, index, event.delta, event.logprobs)])
            if event.completion is not None:
                done[index] = event.completion
                if event.completion.tool_calls:
                    calls = {"tool_calls": _tool_calls(event.completion)}
                    yield chunk([_delta(reply, index, calls)])
                yield chunk([_delta(reply, index, {} if reply.chat else "", (),
                                    event.completion.finish_reason)],
                            timings=_timings([event.completion]))
        if include_usage:
            yield chunk([], usage=_usage([done[i] for i in sorted(done)], reply.n))
    except Exception as exc:  # the status line is already sent: report in the stream
        error = APIError(500, f"generation failed: {exc}", kind="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"


def _delta(reply: Reply, index: int, content: str | dict[str, Any],
           logprobs: Sequence[TokenLogprob] = (), finish: str | None = None) -> dict[str, Any]:
    """One choice of a chunk: text (or, in a chat, a delta or the message part given)."""
    choice: dict[str, Any] = {"index": index, "finish_reason": finish,
                              "logprobs": _logprobs(reply, logprobs, index) if logprobs
                              else None}
    if not reply.chat:
        return {**choice, "text": content}
    return {**choice, "delta": {"content": content} if isinstance(content, str) else content}


def _choice(reply: Reply, index: int, completion: Completion) -> dict[str, Any]:
    logprobs = None if completion.logprobs is None else _logprobs(
        reply, completion.logprobs, index)
    if not reply.chat:
        return {"index": index, "text": reply.echoed(index) + completion.text,
                "finish_reason": completion.finish_reason, "logprobs": logprobs}
    message: dict[str, Any] = {"role": "assistant", "content": completion.text}
    if completion.tool_calls:
        message.update(content=completion.text or None, tool_calls=_tool_calls(completion))
    return {"index": index, "message": message, "finish_reason": completion.finish_reason,
            "logprobs": logprobs}


def _logprobs(reply: Reply, tokens: Sequence[TokenLogprob], index: int) -> dict[str, Any]:
    """Log probabilities in the shape of the endpoint: chat's `content` list, or the legacy
    completions' parallel lists (offsets count from the start of the choice's text)."""
    if reply.chat:
        return {"content": [{**_top(t.token, t.logprob),
                             "top_logprobs": [_top(token, lp) for token, lp in t.top]}
                            for t in tokens], "refusal": None}
    start = len(reply.echoed(index))
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens],
            "text_offset": [start + t.offset for t in tokens]}


def _top(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _tool_calls(completion: Completion) -> list[dict[str, Any]]:
    return [{"index": i, "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(completion.tool_calls)]


def _usage(completions: Sequence[Completion], n: int) -> dict[str, Any]:
    """Usage of all choices: each prompt counts once (from its first choice)."""
    firsts = [c.usage for c in completions[::n]]
    prompt = sum(u.prompt_tokens for u in firsts)
    generated = sum(c.usage.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in firsts)}}


def _timings(completions: Sequence[Completion]) -> dict[str, float]:
    """Timings of a choice; of several, the first token's earliest time, the longest total and
    the summed decode speed."""
    timings = [c.timings for c in completions]
    return {"time_to_first_token_s": round(min(t.time_to_first_token_s for t in timings), 6),
            "total_s": round(max(t.total_s for t in timings), 6),
            "tokens_per_s": round(sum(t.tokens_per_s for t in timings), 3)}
