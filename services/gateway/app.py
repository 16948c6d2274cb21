"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions, /v1/models,
/health. Each choice of a request is one spotserve request over NATS (see backend)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from services.gateway import metrics
from services.gateway.backend import ApiError, Backend, ChoiceEvent, ChoiceSpec, invalid_request
from services.gateway.chat import ChatTemplate, ChatTemplateError
from services.gateway.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    usage_body,
)
from shared.config import GatewaySettings
from shared.messages import MAX_SEED
from shared.model.tokenizer import TextTokenizer

BodyT = TypeVar("BodyT", bound=BaseModel)
T = TypeVar("T")
# The status recorded for a request whose client hung up before its answer (nginx's 499).
CLIENT_CLOSED_REQUEST = 499
# Prompts longer than this are rendered and tokenized in a worker thread.
INLINE_TOKENIZE_CHARS = 2_000
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class GatewayState:
    settings: GatewaySettings
    backend: Backend
    tokenizer: TextTokenizer
    template: ChatTemplate
    model_id: str
    model_created: int
    max_body_bytes: int
    # Required as ``Authorization: Bearer <key>`` on /v1/* when set.
    api_key: str | None = None


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="spotserve", description="OpenAI-compatible API of spotserve")
    _add_error_handlers(app)

    @app.middleware("http")
    async def check_api_key(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if state.api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                message = "missing or incorrect API key: send 'Authorization: Bearer <key>'"
                return error_response(
                    ApiError(401, message, "invalid_request_error", code="invalid_api_key")
                )
        return await call_next(request)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        metrics.HTTP_REQUESTS.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        ready, reason = await state.backend.is_ready()
        body = {"status": "ok" if ready else "unavailable", "reason": reason}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest, state.max_body_bytes)
        _check_model(state, body.model)
        prompts = body.prompts()
        specs = _choice_specs(state, body, prompts, body.max_tokens)
        echoes = [_echo_text(state, prompt) if body.echo else "" for prompt in prompts]
        formatter = _CompletionFormat(f"cmpl-{uuid.uuid4().hex}", state.model_id, body.n, echoes)
        return await _respond(request, state, body.stream, body.include_usage, specs, formatter)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest, state.max_body_bytes)
        _check_model(state, body.model)
        prompt_ids = await _chat_prompt(state, body)
        budget = body.token_budget
        if budget is None:
            budget = state.tokenizer.context_length - len(prompt_ids)
            if budget < 1:
                raise invalid_request(
                    f"the messages are {len(prompt_ids)} tokens; the model's context is"
                    f" {state.tokenizer.context_length} tokens",
                    param="messages",
                    code="context_length_exceeded",
                )
        specs = _choice_specs(state, body, [prompt_ids], budget)
        formatter = _ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", state.model_id)
        return await _respond(request, state, body.stream, body.include_usage, specs, formatter)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientGoneError)
    async def client_gone(request: Request, exc: ClientGoneError) -> Response:
        # Nobody reads this answer; 499 (nginx's "client closed request") in the metrics.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(exc.status_code, message, error_type))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        structlog.get_logger().exception("gateway.internal_error", path=request.url.path)
        return error_response(ApiError(500, f"internal error: {exc!r}", "server_error"))


def error_response(error: ApiError) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _parse(request: Request, model: type[BodyT], max_bytes: int) -> BodyT:
    raw = await request.body()
    if len(raw) > max_bytes:
        raise invalid_request(f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise invalid_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise invalid_request(f"the body must be a JSON object, got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        first = ".".join(str(part) for part in problems[0]["loc"]) or None
        described = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}"
            for item in problems
        )
        raise invalid_request(f"invalid request: {described}", param=first) from None


def _check_model(state: GatewayState, model: str) -> None:
    if model != state.model_id:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_id!r}",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )


def _model_card(state: GatewayState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.model_created,
        "owned_by": "spotserve",
    }


async def _chat_prompt(state: GatewayState, body: ChatCompletionRequest) -> list[int]:
    """The messages through the chat template, as token ids (the template places BOS)."""
    messages = body.template_messages()

    def render() -> list[int]:
        text = state.template.render(messages)
        return state.tokenizer.encode(text, add_special_tokens=False)

    try:
        if sum(len(message["content"]) for message in messages) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(render)
        return render()
    except ChatTemplateError as exc:
        raise invalid_request(str(exc), param="messages") from None


def _echo_text(state: GatewayState, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt)


def _choice_specs(
    state: GatewayState,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[str | list[int]],
    max_tokens: int | None,
) -> list[ChoiceSpec]:
    """One spotserve request per prompt and per n; choice index = prompt * n + j (OpenAI's)."""
    total = len(prompts) * body.n
    if total > state.settings.max_choices:
        raise invalid_request(
            f"{len(prompts)} prompt(s) x n={body.n} is {total} choices; this server allows"
            f" {state.settings.max_choices} per request",
            param="n",
        )
    base = uuid.uuid4().hex
    specs = []
    for prompt_index, prompt in enumerate(prompts):
        for j in range(body.n):
            index = prompt_index * body.n + j
            options: dict[str, Any] = {
                "request_id": f"{base}-{index}",
                "max_tokens": max_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                # n samples of one seeded request differ from each other, reproducibly.
                "seed": None if body.seed is None else (body.seed + j) % (MAX_SEED + 1),
                "stop": body.stop_sequences or None,
                "ignore_eos": body.ignore_eos or None,
            }
            specs.append(ChoiceSpec(index, prompt_index, prompt, options))
    return specs


class _Format:
    """How one API shapes its responses (completions and chat differ)."""

    def __init__(self, response_id: str, model_id: str, object_name: str) -> None:
        self.response_id = response_id
        self.model_id = model_id
        self.object_name = object_name
        self.created = int(time.time())

    def envelope(self, object_name: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": object_name,
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": None,
            **fields,
        }

    def opening(self, index: int) -> list[dict[str, Any]]:
        """Chunks a choice's stream starts with (before its first tokens)."""
        return []

    def stream_choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def final_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def chunk_object(self) -> str:
        return f"{self.object_name}.chunk"

    def chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        body = self.envelope(self.chunk_object, choices=choices)
        if include_usage:
            body["usage"] = None  # only the last chunk carries it, as OpenAI does
        return body


class _CompletionFormat(_Format):
    def __init__(self, response_id: str, model_id: str, n: int, echoes: list[str]) -> None:
        super().__init__(response_id, model_id, "text_completion")
        self.n = n
        self.echoes = echoes

    @property
    def chunk_object(self) -> str:
        return "text_completion"  # OpenAI's completion chunks keep the object's name

    def _echo(self, index: int) -> str:
        return self.echoes[index // self.n]

    def opening(self, index: int) -> list[dict[str, Any]]:
        echo = self._echo(index)
        return [self.stream_choice(index, echo, None)] if echo else []

    def stream_choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def final_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        return self.stream_choice(index, self._echo(index) + choice.text, choice.finish_reason)


class _ChatFormat(_Format):
    def __init__(self, response_id: str, model_id: str) -> None:
        super().__init__(response_id, model_id, "chat.completion")

    def opening(self, index: int) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]

    def stream_choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def final_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }


async def _respond(
    request: Request,
    state: GatewayState,
    stream: bool,
    include_usage: bool,
    specs: list[ChoiceSpec],
    formatter: _Format,
) -> Response:
    backend = state.backend
    await backend.check_capacity()
    release = backend.take_slot()
    events = backend.run_choices(specs)
    try:
        # Wait for every choice's first event: a refusal (400, 429, ...) is then an HTTP
        # status, not an error in the middle of a 200 stream.
        first = await _until_disconnect(request, _first_events(events, len(specs)))
        if not stream:
            choices = await _until_disconnect(request, _collect(first, events, len(specs)))
        else:
            sse = _sse(formatter, first, events, specs, include_usage, release)
            # Started here, so that its cleanup runs even if the client leaves before the body.
            opening = await anext(sse)
    except BaseException:
        await events.aclose()
        release()
        raise
    if not stream:
        await events.aclose()
        release()
        return JSONResponse(_final_body(formatter, specs, choices))
    return _EventStreamResponse(_prepend(opening, sse))


class _EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client hangs up and always close their body.

    Starlette (ASGI 2.4 servers) notices a hang-up only at its next write and then leaves the
    body generator to the garbage collector, which kept the choices and their slot open."""

    def __init__(self, body: AsyncGenerator[bytes, None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.event_source = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.create_task(self.stream_response(send))
        hang_up = asyncio.create_task(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((streaming, hang_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, hang_up):
                task.cancel()
            await asyncio.gather(streaming, hang_up, return_exceptions=True)
            await self.event_source.aclose()
        if streaming.cancelled():
            return  # the client hung up first
        error = streaming.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: it hung up mid-write
            raise error


class ClientGoneError(Exception):
    """The HTTP client hung up before its response was ready."""


async def _until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client hangs up first: then ClientGoneError (closing the
    choices' events then cancels their requests)."""
    working = asyncio.create_task(work)
    hang_up = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait((working, hang_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, hang_up):
            task.cancel()
        await asyncio.gather(working, hang_up, return_exceptions=True)
    if not working.cancelled() and working.done():
        return working.result()
    raise ClientGoneError


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (its body was read already: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _prepend(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # `async for` leaves an abandoned generator open


async def _first_events(events: AsyncGenerator[ChoiceEvent, None], count: int) -> list[ChoiceEvent]:
    first: list[ChoiceEvent] = []
    waiting = set(range(count))
    while waiting:
        event = await anext(events)
        if event.error is not None:
            raise event.error
        first.append(event)
        waiting.discard(event.index)
    return first


async def _collect(
    first: list[ChoiceEvent], events: AsyncGenerator[ChoiceEvent, None], count: int
) -> list[_Choice]:
    choices = [_Choice() for _ in range(count)]
    for event in first:
        _absorb(choices[event.index], event)
    async for event in events:
        if event.error is not None:
            raise event.error
        _absorb(choices[event.index], event)
    return choices


def _absorb(choice: _Choice, event: ChoiceEvent) -> None:
    chunk = event.chunk
    assert chunk is not None
    choice.text += chunk.text
    if chunk.finish_reason is not None:
        choice.finish_reason = chunk.finish_reason
    if chunk.usage is not None:
        choice.prompt_tokens = chunk.usage.prompt_tokens
        choice.completion_tokens = chunk.usage.completion_tokens


def _usage(specs: list[ChoiceSpec], choices: list[_Choice]) -> dict[str, int]:
    # A prompt counts once however many choices (n) it has, as OpenAI counts it.
    prompts: dict[int, int] = {}
    for spec, choice in zip(specs, choices, strict=True):
        prompts.setdefault(spec.prompt_index, choice.prompt_tokens)
    completion = sum(choice.completion_tokens for choice in choices)
    return usage_body(sum(prompts.values()), completion)


def _final_body(
    formatter: _Format, specs: list[ChoiceSpec], choices: list[_Choice]
) -> dict[str, Any]:
    return formatter.envelope(
        formatter.object_name,
        choices=[formatter.final_choice(index, choice) for index, choice in enumerate(choices)],
        usage=_usage(specs, choices),
    )


def _sse_data(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def _sse(
    formatter: _Format,
    first: list[ChoiceEvent],
    events: AsyncGenerator[ChoiceEvent, None],
    specs: list[ChoiceSpec],
    include_usage: bool,
    release: Callable[[], None],
) -> AsyncGenerator[bytes, None]:
    """Server-sent events: a chunk per arriving piece, an optional usage chunk, [DONE]. An
    error after the stream began arrives as an error event, and the stream ends."""
    choices = [_Choice() for _ in specs]
    opened: set[int] = set()

    def pieces(event: ChoiceEvent) -> list[dict[str, Any]]:
        out = []
        if event.index not in opened:
            opened.add(event.index)
            out.extend(formatter.opening(event.index))
        chunk = event.chunk
        assert chunk is not None
        _absorb(choices[event.index], event)
        if chunk.text or chunk.finish_reason is not None:
            out.append(formatter.stream_choice(event.index, chunk.text, chunk.finish_reason))
        return out

    try:
        for event in first:
            for choice in pieces(event):
                yield _sse_data(formatter.chunk([choice], include_usage))
        async for event in events:
            if event.error is not None:
                yield _sse_data(event.error.body())
                return
            for choice in pieces(event):
                yield _sse_data(formatter.chunk([choice], include_usage))
        if include_usage:
            usage = _usage(specs, choices)
            yield _sse_data(formatter.envelope(formatter.chunk_object, choices=[], usage=usage))
        yield b"data: [DONE]\n\n"
    finally:
        await events.aclose()
        release()
