"""The `openai` backend: any OpenAI-compatible server (vLLM, llama.cpp, Ollama, OpenAI, PyAgent).

Requests always stream (with `stream_options.include_usage`), so time to first token is measured
here, at the caller, and usage comes from the server's own fields, cache reads and writes included
(`usage_from` reads OpenAI's and Anthropic's shapes with genai-prices' extractors).
Tools use the server's native tool calling. `allowed_tools` is not sent (few servers know it):
callers check that a call names an allowed tool. A request that requires a call to the one tool it
allows sends it as a named `tool_choice`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import genai_prices
import openai

from pyagent.errors import BackendError, BackendUnavailableError, PyAgentError, RequestError
from pyagent.llm.base import collect
from pyagent.types import (
    Completion,
    CompletionRequest,
    Message,
    StreamEvent,
    Timings,
    ToolCall,
    Usage,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
ANTHROPIC_CACHE_KEYS = ("cache_creation_input_tokens", "cache_read_input_tokens")


class OpenAIBackend:
    """Talks to `base_url` with the official `openai` client."""

    name = "openai"

    def __init__(self, base_url: str | None = None, model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 600.0, max_retries: int = 2):
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.model = model
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused",
            timeout=openai.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            max_retries=max_retries,
        )

    def complete(self, request: CompletionRequest) -> Completion:
        return collect(self.stream(request))

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        model = request.model or self.model or self._first_model()
        start = time.perf_counter()
        chunks = self._call(self._create, request, model)
        return self._events(chunks, model, start, request.timeout_s)

    def _first_model(self) -> str:
        models = self._call(self.client.models.list).data
        if not models:
            raise BackendError(f"the server at {self.base_url} lists no models; pass a model")
        self.model = models[0].id
        return self.model

    def _create(self, request: CompletionRequest, model: str) -> Any:
        p = request.sampling
        args: dict[str, Any] = {
            "model": model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if p.seed is not None:
            args["seed"] = p.seed
        if p.stop:
            args["stop"] = list(p.stop)
        if p.json_schema is not None:
            args["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": p.json_schema, "strict": True}}
        extra = {"top_k": p.top_k} if p.top_k else {}
        if p.ignore_eos:
            extra["ignore_eos"] = True
        if extra:  # extensions that vLLM, llama.cpp and PyAgent's server understand
            args["extra_body"] = extra
        if request.tools:
            args["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}}
                for t in request.tools]
            callable_names = [t.name for t in request.callable_tools]
            args["tool_choice"] = (
                {"type": "function", "function": {"name": callable_names[0]}}
                if request.tool_choice == "required" and len(callable_names) == 1
                else request.tool_choice)
        client = self.client
        if request.timeout_s is not None:  # the caller's own limit: no retries past it
            client = client.with_options(max_retries=0, timeout=openai.Timeout(
                request.timeout_s, connect=min(request.timeout_s, 10.0)))
        if request.messages is not None:
            messages = [_message(m) for m in request.messages]
            return client.chat.completions.create(messages=messages, **args)
        return client.completions.create(prompt=request.prompt, **args)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except openai.APIConnectionError as exc:
            raise BackendUnavailableError(
                f"cannot reach the OpenAI-compatible server at {self.base_url}: {exc}") from exc
        except openai.APIStatusError as exc:
            raise _status_error(exc, self.base_url) from exc

    def _events(self, chunks: Any, model: str, start: float,
                timeout_s: float | None) -> Iterator[StreamEvent]:
        """The stream's events; past `timeout_s` the response is closed from a timer, so a
        server that keeps the stream alive with comments or pings cannot hold it open."""
        parts: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        first_at = None
        finish = "stop"
        usage = None
        expired = threading.Event()
        timer = None if timeout_s is None else threading.Timer(
            max(timeout_s - (time.perf_counter() - start), 0.0),
            lambda: (expired.set(), chunks.close()))
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            for chunk in chunks:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = _choice_text(choice)
                    if delta:
                        first_at = first_at or time.perf_counter()
                        parts.append(delta)
                        yield StreamEvent(delta)
                    for piece in getattr(getattr(choice, "delta", None), "tool_calls", None) or []:
                        first_at = first_at or time.perf_counter()
                        _merge_call(calls.setdefault(piece.index, {}), piece)
                    if choice.finish_reason:
                        finish = choice.finish_reason
                        if finish not in ("length", "tool_calls"):
                            finish = "stop"
        except Exception as exc:
            if expired.is_set():
                raise BackendError(f"no complete reply from {self.base_url} within "
                                   f"{timeout_s:g} s") from None
            if isinstance(exc, openai.APIConnectionError):
                raise BackendUnavailableError(
                    f"lost the connection to {self.base_url} mid-stream: {exc}") from exc
            if isinstance(exc, openai.APIStatusError):
                raise _status_error(exc, self.base_url) from exc
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            raise BackendError(f"no complete reply from {self.base_url} within {timeout_s:g} s")
        end = time.perf_counter()
        if usage is None:
            raise BackendError(f"the server at {self.base_url} sent no usage for model {model!r} "
                               "(it must support stream_options.include_usage)")
        counts = usage_from(usage.model_dump())
        completion = Completion(
            text="".join(parts),
            finish_reason=finish,  # type: ignore[arg-type]
            usage=counts,
            timings=Timings(time_to_first_token_s=(first_at or end) - start, total_s=end - start,
                            completion_tokens=counts.completion_tokens),
            model=model,
            backend=self.name,
            tool_calls=tuple(ToolCall(c.get("id", f"call_{i}"), c.get("name", ""),
                                      c.get("arguments", "")) for i, c in sorted(calls.items())),
        )
        yield StreamEvent("", completion)


def usage_from(data: Mapping[str, Any]) -> Usage:
    """A provider's usage object as Usage, read by genai-prices' extractors: Anthropic's shape
    (`input_tokens` without the cache, `cache_creation_input_tokens`, `cache_read_input_tokens`),
    OpenAI's Responses shape (`input_tokens`, `input_tokens_details`) or, otherwise, OpenAI's Chat
    Completions shape (`prompt_tokens`, `prompt_tokens_details.cached_tokens` and
    `cache_write_tokens`)."""
    if any(data.get(key) is not None for key in ANTHROPIC_CACHE_KEYS):
        provider, flavor = "anthropic", "default"
    else:
        provider, flavor = "openai", "responses" if "input_tokens" in data else "chat"
    try:
        found = genai_prices.extract_usage({"usage": dict(data)}, provider_id=provider,
                                           api_flavor=flavor).usage
    except (ValueError, TypeError) as exc:
        raise BackendError(f"unreadable usage from the server: {exc} (got {dict(data)!r})"
                           ) from None
    return Usage(*(int(getattr(found, key) or 0) for key in (
        "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")))


def _message(message: Message) -> dict[str, Any]:
    """A message in the Chat Completions format."""
    if message.tool_calls:
        return {"role": "assistant", "content": message.content or None, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls]}
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    return {"role": message.role, "content": message.content}


def _merge_call(call: dict[str, str], piece: Any) -> None:
    """Add one streamed fragment of a tool call (id and name once, arguments in pieces)."""
    if piece.id:
        call["id"] = piece.id
    function = piece.function
    if function is not None:
        if function.name:
            call["name"] = call.get("name", "") + function.name
        if function.arguments:
            call["arguments"] = call.get("arguments", "") + function.arguments


def _choice_text(choice: Any) -> str:
    delta = getattr(choice, "delta", None)
    if delta is not None:
        return delta.content or ""
    return getattr(choice, "text", "") or ""


def _status_error(exc: openai.APIStatusError, base_url: str) -> PyAgentError:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    message = error.get("message") if isinstance(error, dict) else None
    text = f"{base_url} answered HTTP {exc.status_code}: {message or exc.message}"
    if 400 <= exc.status_code < 500 and exc.status_code not in (401, 403, 404, 429):
        return RequestError(text, param=error.get("param") if isinstance(error, dict) else None)
    return BackendError(text)
