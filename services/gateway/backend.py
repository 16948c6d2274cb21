"""The gateway's NATS side: one spotserve request per choice, their chunks merged in order of
arrival, spotserve's error codes as OpenAI errors, and a cached capacity check."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError

from services.gateway import metrics
from shared.client import GenerateError, SpotserveClient
from shared.config import GatewaySettings
from shared.discovery import discover
from shared.messages import Empty, ErrorCode, TokenChunk
from shared.rpc import STATUS_ENDPOINT, RpcError, call
from shared.subjects import SERVICE_ADMISSION

# Choices' chunks waiting for the HTTP side (per HTTP request; producers wait when it is full).
EVENT_QUEUE_SIZE = 256
FLEET_STATUS_TIMEOUT_S = 2.0
NO_CAPACITY_RETRY_AFTER_S = 5.0
OVERLOADED_RETRY_AFTER_S = 1.0
HEALTH_PING_S = 0.5
# A cancel of an abandoned choice: how long to wait for admission's answer.
CANCEL_TIMEOUT_S = 5.0


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, error type, and what the user can do about it."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param, code=code)


def api_error_of(error: GenerateError) -> ApiError:
    """spotserve's nats.micro error codes as HTTP statuses and OpenAI error types."""
    match error.code:
        case ErrorCode.BAD_REQUEST:
            return invalid_request(error.message)
        case ErrorCode.TOO_LARGE:
            return invalid_request(error.message, param="messages", code="context_length_exceeded")
        case ErrorCode.NOT_FOUND:
            return ApiError(404, error.message, "not_found_error")
        case ErrorCode.CONFLICT:
            return ApiError(409, error.message, "invalid_request_error", code="conflict")
        case ErrorCode.OVERLOADED:
            return ApiError(
                429,
                error.message,
                "rate_limit_error",
                code="rate_limit_exceeded",
                retry_after_s=OVERLOADED_RETRY_AFTER_S,
            )
        case ErrorCode.UNAVAILABLE:
            return ApiError(
                503,
                error.message,
                "server_error",
                code="unavailable",
                retry_after_s=NO_CAPACITY_RETRY_AFTER_S,
            )
        case _:
            return ApiError(500, error.message, "server_error", code=f"spotserve_{error.code}")


@dataclass
class ChoiceSpec:
    """One choice of an HTTP request: its prompt and the spotserve request's options."""

    index: int
    prompt_index: int
    prompt: str | list[int]
    options: dict[str, Any]

    @property
    def request_id(self) -> str:
        return str(self.options["request_id"])


@dataclass
class ChoiceEvent:
    """A chunk of one choice, or the error that ended it."""

    index: int
    chunk: TokenChunk | None = None
    error: ApiError | None = None


@dataclass
class _Capacity:
    checked_at: float = float("-inf")
    running: int | None = None  # None: unknown (the monitor did not answer)
    preempting: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Backend:
    def __init__(self, nc: Client, settings: GatewaySettings) -> None:
        self.nc = nc
        self.settings = settings
        self.client = SpotserveClient(
            nc,
            first_chunk_timeout_s=settings.first_token_timeout_s,
            chunk_timeout_s=settings.token_timeout_s,
        )
        self._capacity = _Capacity()
        self.active_requests = 0
        # Cancels of abandoned choices, running detached from the response that ended.
        self._cancels: set[asyncio.Task[None]] = set()

    def take_slot(self) -> Callable[[], None]:
        """Count one generation request in (429 beyond max_concurrent_requests); returns the
        function that gives its slot back (once, however often it is called) when its
        response or stream has ended."""
        limit = self.settings.max_concurrent_requests
        if self.active_requests >= limit:
            raise ApiError(
                429,
                f"the gateway is serving {self.active_requests} requests (its limit); retry later",
                "rate_limit_error",
                code="rate_limit_exceeded",
                retry_after_s=OVERLOADED_RETRY_AFTER_S,
            )
        self.active_requests += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active_requests -= 1

        return release

    async def check_capacity(self) -> None:
        """503 at once when no executor instance is running (instead of a request that would
        wait for capacity until it times out). Unknown capacity (no monitor) lets it through."""
        capacity = self._capacity
        async with capacity.lock:
            if time.monotonic() - capacity.checked_at > self.settings.capacity_check_s:
                capacity.running, capacity.preempting = await self._read_fleet()
                capacity.checked_at = time.monotonic()
        if capacity.running == 0:
            raise ApiError(
                503,
                "no serving capacity: no executor instance is running"
                f" ({capacity.preempting} being preempted); retry later",
                "server_error",
                code="no_capacity",
                retry_after_s=NO_CAPACITY_RETRY_AFTER_S,
            )

    async def _read_fleet(self) -> tuple[int | None, int]:
        try:
            status = await call(self.nc, STATUS_ENDPOINT, Empty(), timeout_s=FLEET_STATUS_TIMEOUT_S)
        except (RpcError, NatsError) as exc:
            structlog.get_logger().debug("gateway.fleet_status_unavailable", error=repr(exc))
            return None, 0
        states = [instance.state for instance in status.instances]
        return states.count("running"), states.count("preempting")

    async def is_ready(self) -> tuple[bool, str]:
        """For /health: NATS connected, admission answers, capacity not known to be zero."""
        if not self.nc.is_connected:
            return False, "not connected to NATS"
        found = await discover(
            self.nc, SERVICE_ADMISSION, verb="PING", window_s=HEALTH_PING_S, enough=bool
        )
        if not found:
            return False, "spotserve's admission service does not answer"
        try:
            await self.check_capacity()
        except ApiError as exc:
            return False, exc.message
        return True, "ok"

    async def run_choices(self, specs: list[ChoiceSpec]) -> AsyncGenerator[ChoiceEvent, None]:
        """Every choice's chunks as they arrive; an error ends its choice. Closing the iterator
        before every choice has finished (the HTTP client went away, a timeout) cancels the
        requests still running (``spotserve.v1.cancel``): they free their batch slots."""
        queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue(EVENT_QUEUE_SIZE)
        tasks = [asyncio.create_task(self._run_choice(spec, queue)) for spec in specs]
        unfinished = {spec.index: spec.request_id for spec in specs}
        metrics.CHOICES_IN_FLIGHT.inc(len(specs))
        try:
            while unfinished:
                event = await queue.get()
                if event.chunk is not None and event.chunk.finish_reason is not None:
                    unfinished.pop(event.index, None)
                elif event.error is not None:
                    unfinished.pop(event.index, None)
                    if event.error.status >= 500:  # a gateway-side wait gave up: it may run on
                        self.cancel_detached([specs[event.index].request_id])
                yield event
        finally:
            metrics.CHOICES_IN_FLIGHT.dec(len(specs))
            for task in tasks:
                task.cancel()
            if unfinished:
                self.cancel_detached(list(unfinished.values()))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    def cancel_detached(self, request_ids: list[str]) -> None:
        """Cancel these requests from a task of their own: the caller may itself be being
        cancelled (a response whose client hung up)."""
        task = asyncio.create_task(self._cancel(request_ids))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_ids: list[str]) -> None:
        log = structlog.get_logger()
        for request_id in request_ids:
            try:
                reply = await self.client.cancel(request_id, timeout_s=CANCEL_TIMEOUT_S)
            except (RpcError, NatsError) as exc:
                # Not accepted yet (refused, or never stored), or spotserve unreachable.
                log.info("gateway.cancel_failed", request_id=request_id, error=repr(exc))
                continue
            metrics.CANCELS.labels(reply.state).inc()
            log.info("gateway.cancelled", request_id=request_id, state=reply.state)

    async def _run_choice(self, spec: ChoiceSpec, queue: asyncio.Queue[ChoiceEvent]) -> None:
        log = structlog.get_logger().bind(request_id=spec.request_id)
        timing = metrics.ChoiceTiming()
        try:
            async for chunk in self.client.stream(spec.prompt, **spec.options):
                timing.chunk(chunk)
                await queue.put(ChoiceEvent(spec.index, chunk=chunk))
            timing.finish()
        except GenerateError as exc:
            await queue.put(ChoiceEvent(spec.index, error=api_error_of(exc)))
        except TimeoutError:
            waited = "the first token" if timing.first_token_at is None else "the next token"
            log.warning("gateway.timeout", waited_for=waited)
            message = (
                f"no answer from spotserve within the gateway's timeout while waiting for"
                f" {waited} (spotserve request {spec.request_id} may still be queued or running)"
            )
            await queue.put(ChoiceEvent(spec.index, error=ApiError(504, message, "timeout")))
        except NatsError as exc:
            log.warning("gateway.nats_error", error=repr(exc))
            message = f"spotserve is unreachable over NATS now ({exc!r}); retry later"
            await queue.put(ChoiceEvent(spec.index, error=ApiError(503, message, "server_error")))
