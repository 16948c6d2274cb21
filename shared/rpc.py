"""Every request-reply endpoint of spotserve, declared once, and the one place that turns
errors into nats.micro error headers and back.

An :class:`Endpoint` names its subject, its request and reply models, the error codes it
answers with and the client's default timeout. Servers register a handler with
:func:`add_endpoint`; the handler takes the request model and returns the reply model, or
raises an :class:`RpcError` (``BadRequest``, ``NotFound``, ...), which becomes the error headers
``Nats-Service-Error-Code`` / ``Nats-Service-Error`` and an :class:`ErrorReply` body. Clients use
:func:`call` and get the reply model or one :class:`RpcError` (``NoResponders`` when nobody
serves the subject, ``RpcTimeout`` when no answer came in time).

A handler that streams several replies or answers later (``generate``, a pipeline stage) takes
the raw request with :func:`add_raw_endpoint` and answers through :func:`respond` /
:func:`respond_error`, so even then no code outside this module builds an error header.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import EndpointManager
from pydantic import BaseModel, ValidationError

from shared.codec import DecodeError, content_type_header, decode, encode
from shared.codec import encoding_from_headers as encoding_of
from shared.messages import (
    AddInstancesReply,
    AddInstancesRequest,
    CancelReply,
    CancelRequest,
    Empty,
    Encoding,
    ErrorCode,
    ErrorDetail,
    ErrorReply,
    FetchModelReply,
    FetchModelRequest,
    FleetEvent,
    FleetStatus,
    GenerateRequest,
    GenerateResult,
    InflightReport,
    KvAdoptCommand,
    KvMigrateCommand,
    KvMoveReply,
    LeaseReleased,
    ModeReply,
    ModeRequest,
    PreemptNotice,
    ReleaseCommand,
    Released,
    ReleaseLeaseRequest,
    ResultReply,
    ResultRequest,
    StageCommand,
    StepCommand,
    StepResult,
    TransferAccept,
    TransferOffer,
    TransferStatusReply,
    TransferStatusRequest,
    WeightsSendCommand,
    WeightsSent,
)
from shared.subjects import (
    ADMIN_MODE,
    CANCEL,
    FLEET_ADD,
    FLEET_NOTICE,
    FLEET_STATUS,
    GENERATE,
    RESULT,
    SCHEDULER_INFLIGHT,
    executor_adopt_subject,
    executor_migrate_subject,
    executor_release_subject,
    executor_stage_subject,
    executor_step_subject,
    executor_weights_subject,
    loader_fetch_subject,
    loader_release_subject,
    transfer_offer_subject,
    transfer_status_subject,
)

RequestT = TypeVar("RequestT", bound=BaseModel)
ReplyT = TypeVar("ReplyT", bound=BaseModel)

# A NATS status message (no body) answers a request that no service listens to.
STATUS_HEADER = "Status"
NO_RESPONDERS_STATUS = "503"
# Header values are single lines; a message longer than this is cut.
MAX_ERROR_MESSAGE_CHARS = 2000

log = structlog.get_logger("spotserve.rpc")


# ---- errors ----------------------------------------------------------------------------------


class RpcError(Exception):
    """An endpoint's error answer. ``code`` is the nats.micro error code (HTTP-like, as
    :class:`ErrorCode`; a peer may send one this version does not know)."""

    default_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: str | None = None, request_id: str | None = None):
        super().__init__(f"[{code or self.default_code}] {message}")
        self.code = str(code or self.default_code)
        self.message = message
        self.request_id = request_id


class BadRequest(RpcError):
    default_code = ErrorCode.BAD_REQUEST


class NotFound(RpcError):
    default_code = ErrorCode.NOT_FOUND


class Conflict(RpcError):
    default_code = ErrorCode.CONFLICT


class TooLarge(RpcError):
    default_code = ErrorCode.TOO_LARGE


class Overloaded(RpcError):
    default_code = ErrorCode.OVERLOADED


class Internal(RpcError):
    default_code = ErrorCode.INTERNAL


class Unavailable(RpcError):
    default_code = ErrorCode.UNAVAILABLE


class NoResponders(Unavailable):
    """Nobody serves the subject (the service is down or not started yet)."""


class RpcTimeout(Unavailable, TimeoutError):
    """The request went out but no answer came within the timeout."""


_ERROR_CLASSES: dict[str, type[RpcError]] = {
    str(cls.default_code): cls
    for cls in (BadRequest, NotFound, Conflict, TooLarge, Overloaded, Internal, Unavailable)
}


def error_for(code: str, message: str, request_id: str | None = None) -> RpcError:
    """The typed error for a code read off the wire."""
    cls = _ERROR_CLASSES.get(code, RpcError)
    return cls(message, code=code, request_id=request_id)


def error_of(headers: dict[str, str] | None) -> RpcError | None:
    """The error a reply carries in its headers (or the server's no-responders status)."""
    if not headers:
        return None
    if ERROR_CODE_HEADER in headers:
        return error_for(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""))
    if headers.get(STATUS_HEADER) == NO_RESPONDERS_STATUS:
        return NoResponders("no responders: nobody serves this subject")
    return None


def raise_for_error(message: Msg) -> None:
    """Raise the :class:`RpcError` a reply carries, if any."""
    error = error_of(message.headers)
    if error is not None:
        raise error


def error_reply(error: RpcError, encoding: Encoding = "msgpack") -> tuple[dict[str, str], bytes]:
    """The headers and body of an error answer: the only place that writes error headers."""
    message = " ".join(error.message.split())[:MAX_ERROR_MESSAGE_CHARS]
    body = ErrorReply(
        error=ErrorDetail(code=error.code, message=message, request_id=error.request_id)
    )
    headers = {ERROR_CODE_HEADER: error.code, ERROR_HEADER: message}
    headers.update(content_type_header(encoding))
    return headers, encode(body, encoding)


# ---- endpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint(Generic[RequestT, ReplyT]):
    """One request-reply endpoint. ``subject`` is fixed, or a function of the address (an
    executor's instance id, a loader's node) for per-instance endpoints."""

    name: str
    subject: str | Callable[[str], str]
    request: type[RequestT]
    reply: type[ReplyT]
    errors: tuple[ErrorCode, ...]
    timeout_s: float

    def subject_for(self, address: str | None = None) -> str:
        if isinstance(self.subject, str):
            if address is not None:
                raise ValueError(f"endpoint {self.name} has one subject: no address")
            return self.subject
        if address is None:
            raise ValueError(f"endpoint {self.name} needs an address (instance id or node)")
        return self.subject(address)

    def parse_request(self, data: bytes, encoding: Encoding = "msgpack") -> RequestT:
        """The request body as the request model; :class:`BadRequest` when it is not one."""
        if not self.request.model_fields:
            # A request that carries nothing (status, in flight): any body will do, as any
            # NATS client may send "{}" in JSON without saying so.
            return self.request()
        try:
            return self.request.model_validate(decode(data, encoding) if data else {})
        except (DecodeError, ValidationError) as exc:
            raise BadRequest(f"bad {self.name} request: {exc}") from None

    def parse_reply(self, data: bytes, encoding: Encoding = "msgpack") -> ReplyT:
        try:
            return self.reply.model_validate(decode(data, encoding) if data else {})
        except (DecodeError, ValidationError) as exc:
            raise Internal(f"bad {self.name} reply: {exc}") from None


_CLIENT = (ErrorCode.BAD_REQUEST, ErrorCode.INTERNAL)

_GENERATE_ERRORS = (
    *_CLIENT,
    ErrorCode.CONFLICT,
    ErrorCode.TOO_LARGE,
    ErrorCode.OVERLOADED,
    ErrorCode.UNAVAILABLE,
)

# Public API (admission). ``generate`` streams TokenChunks to the reply subject (stream: true)
# or answers one GenerateResult.
GENERATE_ENDPOINT = Endpoint(
    "generate",
    GENERATE,
    GenerateRequest,
    GenerateResult,
    _GENERATE_ERRORS,
    timeout_s=300.0,
)
RESULT_ENDPOINT = Endpoint(
    "result", RESULT, ResultRequest, ResultReply, (*_CLIENT, ErrorCode.NOT_FOUND), timeout_s=10.0
)
CANCEL_ENDPOINT = Endpoint(
    "cancel",
    CANCEL,
    CancelRequest,
    CancelReply,
    (*_CLIENT, ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE),
    timeout_s=10.0,
)
MODE_ENDPOINT = Endpoint(
    "mode", ADMIN_MODE, ModeRequest, ModeReply, (*_CLIENT, ErrorCode.UNAVAILABLE), timeout_s=5.0
)

# Fleet (monitor).
NOTICE_ENDPOINT = Endpoint(
    "notice",
    FLEET_NOTICE,
    PreemptNotice,
    FleetEvent,
    (*_CLIENT, ErrorCode.NOT_FOUND, ErrorCode.CONFLICT, ErrorCode.UNAVAILABLE),
    timeout_s=10.0,
)
ADD_ENDPOINT = Endpoint(
    "add",
    FLEET_ADD,
    AddInstancesRequest,
    AddInstancesReply,
    (*_CLIENT, ErrorCode.CONFLICT, ErrorCode.UNAVAILABLE),
    timeout_s=10.0,
)
STATUS_ENDPOINT = Endpoint("status", FLEET_STATUS, Empty, FleetStatus, _CLIENT, timeout_s=5.0)

# Scheduler: its requests in flight, for the planner's JIT arrangement.
INFLIGHT_ENDPOINT = Endpoint(
    "inflight", SCHEDULER_INFLIGHT, Empty, InflightReport, _CLIENT, timeout_s=2.0
)

# Loader (one per node).
FETCH_ENDPOINT = Endpoint(
    "fetch",
    loader_fetch_subject,
    FetchModelRequest,
    FetchModelReply,
    (*_CLIENT, ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE),
    timeout_s=600.0,
)
LEASE_RELEASE_ENDPOINT = Endpoint(
    "release", loader_release_subject, ReleaseLeaseRequest, LeaseReleased, _CLIENT, timeout_s=5.0
)

# Executor (one set per instance).
_EXECUTOR = (*_CLIENT, ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE)
STEP_ENDPOINT = Endpoint(
    "step", executor_step_subject, StepCommand, StepResult, _EXECUTOR, timeout_s=60.0
)
STAGE_ENDPOINT = Endpoint(
    "stage", executor_stage_subject, StageCommand, StepResult, _EXECUTOR, timeout_s=60.0
)
EXECUTOR_RELEASE_ENDPOINT = Endpoint(
    "release", executor_release_subject, ReleaseCommand, Released, _EXECUTOR, timeout_s=10.0
)
MIGRATE_ENDPOINT = Endpoint(
    "migrate", executor_migrate_subject, KvMigrateCommand, KvMoveReply, _EXECUTOR, timeout_s=60.0
)
ADOPT_ENDPOINT = Endpoint(
    "adopt", executor_adopt_subject, KvAdoptCommand, KvMoveReply, _EXECUTOR, timeout_s=60.0
)
WEIGHTS_ENDPOINT = Endpoint(
    "weights", executor_weights_subject, WeightsSendCommand, WeightsSent, _EXECUTOR, timeout_s=60.0
)

# Tensor transfers (each process's inbox; shared.transfer).
OFFER_ENDPOINT = Endpoint(
    "offer",
    transfer_offer_subject,
    TransferOffer,
    TransferAccept,
    (*_CLIENT, ErrorCode.NOT_FOUND),
    timeout_s=5.0,
)
TRANSFER_STATUS_ENDPOINT = Endpoint(
    "transfer-status",
    transfer_status_subject,
    TransferStatusRequest,
    TransferStatusReply,
    _CLIENT,
    timeout_s=5.0,
)

ENDPOINTS: tuple[Endpoint[Any, Any], ...] = (
    GENERATE_ENDPOINT,
    RESULT_ENDPOINT,
    CANCEL_ENDPOINT,
    MODE_ENDPOINT,
    NOTICE_ENDPOINT,
    ADD_ENDPOINT,
    STATUS_ENDPOINT,
    INFLIGHT_ENDPOINT,
    FETCH_ENDPOINT,
    LEASE_RELEASE_ENDPOINT,
    STEP_ENDPOINT,
    STAGE_ENDPOINT,
    EXECUTOR_RELEASE_ENDPOINT,
    MIGRATE_ENDPOINT,
    ADOPT_ENDPOINT,
    WEIGHTS_ENDPOINT,
    OFFER_ENDPOINT,
    TRANSFER_STATUS_ENDPOINT,
)


# ---- server side -----------------------------------------------------------------------------

Handler = Callable[[RequestT], Awaitable[ReplyT]]
RawHandler = Callable[[Request], Awaitable[None]]


async def respond(request: Request, reply: BaseModel, encoding: Encoding | None = None) -> None:
    """Answer with a reply model, in the request's encoding unless told otherwise."""
    encoding = encoding or encoding_of(request.headers)
    # msgpack is what a reply without headers means: the per-iteration step replies stay plain
    # messages (no header block to write and parse).
    headers = content_type_header(encoding) if encoding == "json" else None
    await request.respond(encode(reply, encoding), headers=headers)


async def respond_error(request: Request, error: RpcError) -> None:
    """Answer with an error (headers and :class:`ErrorReply` body), in the request's encoding."""
    headers, body = error_reply(error, encoding_of(request.headers))
    code, message = headers.pop(ERROR_CODE_HEADER), headers.pop(ERROR_HEADER)
    await request.respond_error(code, message, data=body, headers=headers or None)


async def publish_error(nc: Client, message: Msg, error: RpcError) -> None:
    """Answer a plain NATS request (not a nats.micro one) with an error."""
    if not message.reply:
        return
    headers, body = error_reply(error, encoding_of(message.headers))
    await nc.publish(message.reply, body, headers=headers)


ErrorObserver = Callable[[RpcError], None]


def serving(
    endpoint: Endpoint[RequestT, ReplyT],
    handler: Handler[RequestT, ReplyT],
    logger: structlog.stdlib.BoundLogger | None = None,
    on_error: ErrorObserver | None = None,
) -> RawHandler:
    """A nats.micro handler that parses the request, calls ``handler`` and answers with its
    reply, or with the error it raised (any other exception: 500, logged). ``on_error`` sees
    every error answered, a bad body included (a service's refusal metrics)."""
    bound = logger or log

    async def handle(request: Request) -> None:
        encoding = encoding_of(request.headers)
        try:
            body = endpoint.parse_request(request.data, encoding)
            reply = await handler(body)
        except RpcError as exc:
            error = exc
        except Exception as exc:
            bound.exception("rpc.handler_failed", endpoint=endpoint.name)
            error = Internal(f"{endpoint.name} failed: {exc!r}")
        else:
            await respond(request, reply, encoding)
            return
        if on_error is not None:
            on_error(error)
        await respond_error(request, error)

    return handle


async def add_endpoint(
    service: EndpointManager,
    endpoint: Endpoint[RequestT, ReplyT],
    handler: Handler[RequestT, ReplyT],
    *,
    address: str | None = None,
    logger: structlog.stdlib.BoundLogger | None = None,
    on_error: ErrorObserver | None = None,
) -> None:
    """Serve ``endpoint`` on a nats.micro service (or group) with a typed handler."""
    await service.add_endpoint(
        name=endpoint.name,
        subject=endpoint.subject_for(address),
        handler=serving(endpoint, handler, logger, on_error),
    )


async def add_raw_endpoint(
    service: EndpointManager,
    endpoint: Endpoint[Any, Any],
    handler: RawHandler,
    *,
    address: str | None = None,
) -> None:
    """Serve ``endpoint`` with a handler that answers by itself (streams, late answers);
    it parses with ``endpoint.parse_request`` and answers with :func:`respond` /
    :func:`respond_error`."""
    await service.add_endpoint(
        name=endpoint.name, subject=endpoint.subject_for(address), handler=handler
    )


# ---- client side -----------------------------------------------------------------------------


async def call(
    nc: Client,
    endpoint: Endpoint[RequestT, ReplyT],
    body: RequestT,
    *,
    address: str | None = None,
    timeout_s: float | None = None,
) -> ReplyT:
    """Send ``body`` to ``endpoint`` and return its reply model; raise the :class:`RpcError`
    it answered with, :class:`NoResponders` or :class:`RpcTimeout`."""
    subject = endpoint.subject_for(address)
    timeout = endpoint.timeout_s if timeout_s is None else timeout_s
    message = await request_raw(nc, subject, encode(body), timeout)
    raise_for_error(message)
    return endpoint.parse_reply(message.data)


async def request_raw(
    nc: Client, subject: str, data: bytes, timeout_s: float, headers: dict[str, str] | None = None
) -> Msg:
    """One NATS request, with its two transport failures as :class:`RpcError` s; the reply's
    own error headers are left to the caller (:func:`raise_for_error`)."""
    try:
        return await nc.request(subject, data, timeout=timeout_s, headers=headers)
    except NoRespondersError:
        raise NoResponders(f"nobody serves {subject}") from None
    except TimeoutError:
        raise RpcTimeout(f"no answer on {subject} within {timeout_s:g} s") from None
