"""A small async client of the spotserve NATS API (used by the CLI, loadgen, tests, benches).

Any NATS client works the same way: publish a msgpack (or JSON) body to
``spotserve.v1.generate`` with a reply subject and read the chunks that arrive there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from shared.codec import decode, encode
from shared.messages import CancelReply, GenerateResult, ResultReply, TokenChunk
from shared.rpc import (
    CANCEL_ENDPOINT,
    GENERATE_ENDPOINT,
    RESULT_ENDPOINT,
    Endpoint,
    NoResponders,
    ReplyT,
    RpcError,
    Unavailable,
    error_of,
    request_raw,
)

# The service refused or failed the request (``code`` is the nats.micro error code): the
# typed errors of shared.rpc, under the name this client's users catch.
GenerateError = RpcError
# The first chunk waits for the queue and the prefill; later ones for one iteration.
FIRST_CHUNK_TIMEOUT_S = 300.0
CHUNK_TIMEOUT_S = 120.0
# Between reads of the committed result while it cannot be read (NATS recovering from a
# server loss); the whole wait is bounded by the chunk timeout.
GAP_RETRY_S = 0.2


@dataclass
class Completion:
    """A finished generation with its client-side timings."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    sent_at: float
    first_token_at: float | None = None
    finished_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.sent_at

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at


def _raise_if_error(headers: dict[str, str] | None) -> None:
    error = error_of(headers)
    if isinstance(error, NoResponders):
        # The server's own answer to a publish nobody listens to (admission is down).
        raise NoResponders("no responders: is spotserve's admission service running?")
    if error is not None:
        raise error


@dataclass
class _Seen:
    """How much of a stream a client has: chunks, tokens and characters of text."""

    chunks: int = 0
    tokens: int = 0
    text_chars: int = 0

    def add(self, chunk: TokenChunk) -> None:
        self.chunks = chunk.index + 1
        self.tokens += len(chunk.token_ids)
        self.text_chars += len(chunk.text)


class SpotserveClient:
    def __init__(
        self,
        nc: Client,
        first_chunk_timeout_s: float = FIRST_CHUNK_TIMEOUT_S,
        chunk_timeout_s: float = CHUNK_TIMEOUT_S,
    ):
        self.nc = nc
        self.first_chunk_timeout_s = first_chunk_timeout_s
        self.chunk_timeout_s = chunk_timeout_s

    async def stream(self, prompt: str | list[int], **options: Any) -> AsyncIterator[TokenChunk]:
        """Yield the chunks of one request as they arrive (``stream: true``).

        Core NATS does not redeliver: a chunk lost on the way (a reconnect, a NATS restart) is
        read back from the committed tokens (``spotserve.v1.result``), so the stream has no
        hole. Give ``request_id`` to recover even when no chunk at all arrived in time."""
        body = _body(prompt, options, stream=True)
        request_id: str | None = body.get("request_id")
        inbox = self.nc.new_inbox()
        # A callback into a queue, read with asyncio.timeout: next_msg makes two tasks per
        # message. Bounded by the request's own chunks.
        arrived: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_chunk(message: Msg) -> None:
            arrived.put_nowait(message)

        subscription = await self.nc.subscribe(inbox, cb=on_chunk)
        try:
            await self.nc.publish(GENERATE_ENDPOINT.subject_for(), encode(body), reply=inbox)
            timeout = self.first_chunk_timeout_s
            seen = _Seen()
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        message = await arrived.get()
                except TimeoutError:
                    chunk = await self._catch_up(request_id, seen)
                    if chunk is None:
                        raise
                else:
                    _raise_if_error(message.headers)
                    chunk = TokenChunk.model_validate(decode(message.data))
                    request_id = chunk.request_id
                    if chunk.index < seen.chunks:
                        continue  # re-sent after a scheduler restart: already seen
                    if chunk.index > seen.chunks:  # earlier chunks were lost on the way
                        chunk = await self._fill_gap(request_id, seen, chunk)
                seen.add(chunk)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                timeout = self.chunk_timeout_s
        finally:
            await subscription.unsubscribe()

    async def _fill_gap(self, request_id: str, seen: _Seen, arrived: TokenChunk) -> TokenChunk:
        """The chunks lost before ``arrived`` and ``arrived`` itself, read back as one chunk.

        A chunk is committed before it is forwarded, so the result holds ``arrived``; reading
        it can fail for a while (a NATS server lost, its streams electing a leader), so it is
        retried for up to the chunk timeout. A hole is never yielded: past that, the stream
        ends with an error that says which chunks are missing."""
        deadline = time.monotonic() + self.chunk_timeout_s
        while True:
            caught_up = await self._catch_up(request_id, seen)
            if caught_up is not None and caught_up.index >= arrived.index:
                return caught_up
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"chunks {seen.chunks}..{arrived.index - 1} of request {request_id!r} were"
                    f" lost on the way and the committed result could not be read within"
                    f" {self.chunk_timeout_s:g} s; read the whole output with"
                    f" spotserve.v1.result once NATS is back",
                    request_id=request_id,
                )
            await asyncio.sleep(GAP_RETRY_S)

    async def _catch_up(self, request_id: str | None, seen: _Seen) -> TokenChunk | None:
        """Everything committed after what was seen, as one chunk (None: nothing new)."""
        if request_id is None:
            return None
        try:
            result = await self.result(request_id)
        except (GenerateError, TimeoutError, NatsError):
            return None
        if result.chunks <= seen.chunks:
            return None
        return TokenChunk(
            request_id=request_id,
            index=result.chunks - 1,
            token_ids=result.token_ids[seen.tokens :],
            text=result.text[seen.text_chars :],
            finish_reason=result.finish_reason,
            usage=result.usage,
        )

    async def generate(self, prompt: str | list[int], **options: Any) -> Completion:
        """Stream one request to its end and collect it, with timings."""
        sent_at = time.perf_counter()
        token_ids: list[int] = []
        texts: list[str] = []
        chunk_times: list[float] = []
        first_token_at = None
        last: TokenChunk | None = None
        async for chunk in self.stream(prompt, **options):
            now = time.perf_counter()
            chunk_times.append(now)
            if first_token_at is None and chunk.token_ids:
                first_token_at = now
            token_ids.extend(chunk.token_ids)
            texts.append(chunk.text)
            last = chunk
        assert last is not None and last.finish_reason is not None and last.usage is not None
        return Completion(
            request_id=last.request_id,
            token_ids=token_ids,
            text="".join(texts),
            finish_reason=last.finish_reason,
            prompt_tokens=last.usage.prompt_tokens,
            completion_tokens=last.usage.completion_tokens,
            sent_at=sent_at,
            first_token_at=first_token_at,
            finished_at=time.perf_counter(),
            chunk_times=chunk_times,
        )

    async def result(
        self, request_id: str, timeout_s: float = RESULT_ENDPOINT.timeout_s
    ) -> ResultReply:
        """What is committed of a request (``spotserve.v1.result``): for a client that missed
        chunks (an index gap) or its whole stream; ``finish_reason`` is None while it runs."""
        return await self._request(RESULT_ENDPOINT, {"request_id": request_id}, timeout_s)

    async def cancel(
        self, request_id: str, timeout_s: float = CANCEL_ENDPOINT.timeout_s
    ) -> CancelReply:
        """Stop a request (``spotserve.v1.cancel``): its stream ends with a chunk whose
        ``finish_reason`` is ``"cancelled"`` at the scheduler's next iteration."""
        return await self._request(CANCEL_ENDPOINT, {"request_id": request_id}, timeout_s)

    async def complete(self, prompt: str | list[int], **options: Any) -> GenerateResult:
        """One request, one reply (``stream: false``)."""
        body = _body(prompt, options, stream=False)
        return await self._request(GENERATE_ENDPOINT, body, self.first_chunk_timeout_s)

    async def _request(
        self, endpoint: Endpoint[Any, ReplyT], body: dict[str, Any], timeout_s: float
    ) -> ReplyT:
        """The body goes out as given (admission validates it and says what is wrong)."""
        subject = endpoint.subject_for()
        message = await request_raw(self.nc, subject, encode(body), timeout_s)
        _raise_if_error(message.headers)
        return endpoint.parse_reply(message.data)


def _body(prompt: str | list[int], options: dict[str, Any], stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {key: value for key, value in options.items() if value is not None}
    body["stream"] = stream
    if isinstance(prompt, str):
        body["prompt"] = prompt
    else:
        body["prompt_token_ids"] = list(prompt)
    return body
