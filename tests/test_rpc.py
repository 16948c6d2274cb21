"""shared.rpc against a real nats-server and real nats.micro services: typed handlers, the
error headers and ErrorReply body on the wire, both encodings, the client's typed errors, and
the endpoint catalogue."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service, ServiceConfig
from pydantic import BaseModel

from shared.codec import JSON_CONTENT_TYPE, decode, encode, encoding_from_headers
from shared.messages import Empty, ErrorCode, ErrorReply
from shared.rpc import (
    ENDPOINTS,
    MAX_ERROR_MESSAGE_CHARS,
    BadRequest,
    Conflict,
    Endpoint,
    Internal,
    NoResponders,
    NotFound,
    Overloaded,
    RpcError,
    RpcTimeout,
    TooLarge,
    Unavailable,
    add_endpoint,
    add_raw_endpoint,
    call,
    error_for,
    error_of,
    error_reply,
    publish_error,
    raise_for_error,
    request_raw,
    respond,
    respond_error,
)

JSON_HEADERS = {"Content-Type": JSON_CONTENT_TYPE}
TABLE = {"a": 1, "b": 2}
ERRORS = (ErrorCode.BAD_REQUEST, ErrorCode.NOT_FOUND, ErrorCode.INTERNAL)


class Lookup(BaseModel):
    key: str


class Found(BaseModel):
    key: str
    value: int


async def lookup(request: Lookup) -> Found:
    if request.key == "crash":
        raise RuntimeError("handler bug")
    if request.key not in TABLE:
        raise NotFound(f"no value for {request.key!r}")
    return Found(key=request.key, value=TABLE[request.key])


async def count(_: Empty) -> Found:
    return Found(key="count", value=len(TABLE))


@dataclass(frozen=True)
class Api:
    """Endpoints on subjects of their own (the session's nats-server is shared)."""

    prefix: str
    lookup: Endpoint[Lookup, Found]
    count: Endpoint[Empty, Found]
    raw: Endpoint[Lookup, Found]
    silent: Endpoint[Lookup, Found]
    nobody: Endpoint[Lookup, Found]
    at: Endpoint[Lookup, Found]


def make_api() -> Api:
    prefix = f"tests.rpc.{uuid.uuid4().hex[:12]}"

    def endpoint(name: str, request: type[Any] = Lookup) -> Endpoint[Any, Found]:
        return Endpoint(name, f"{prefix}.{name}", request, Found, ERRORS, timeout_s=10.0)

    return Api(
        prefix=prefix,
        lookup=endpoint("lookup"),
        count=endpoint("count", Empty),
        raw=endpoint("raw"),
        silent=endpoint("silent"),
        nobody=endpoint("nobody"),
        at=Endpoint("at", lambda node: f"{prefix}.{node}.at", Lookup, Found, ERRORS, 10.0),
    )


async def start_service(nc: Client, name: str) -> Service:
    return await add_service(nc, ServiceConfig(name=name, version="0.0.1"))


@pytest.fixture
async def api(nc: Client) -> AsyncIterator[Api]:
    """One service serving the test endpoints: typed, raw (answers by itself) and silent
    (never answers)."""
    made = make_api()

    async def raw(request: Request) -> None:
        try:
            body = made.raw.parse_request(request.data, encoding_from_headers(request.headers))
        except BadRequest as exc:
            await respond_error(request, exc)
            return
        await respond(request, Found(key=body.key, value=len(body.key)))

    async def silent(_: Request) -> None:
        return  # takes the request and never answers

    service = await start_service(nc, "tests-rpc")
    await add_endpoint(service, made.lookup, lookup)
    await add_endpoint(service, made.count, count)
    await add_raw_endpoint(service, made.raw, raw)
    await add_raw_endpoint(service, made.silent, silent)
    await nc.flush()  # the subscriptions are in place before the first request
    yield made
    await service.stop()


# ---- server and client over the wire ---------------------------------------------------------


async def test_a_typed_handler_answers_its_reply_model(nc: Client, api: Api) -> None:
    assert await call(nc, api.lookup, Lookup(key="a")) == Found(key="a", value=1)
    assert await call(nc, api.lookup, Lookup(key="b")) == Found(key="b", value=2)


async def test_a_raised_not_found_reaches_the_client_typed_and_on_the_wire(
    nc: Client, api: Api
) -> None:
    with pytest.raises(NotFound) as raised:
        await call(nc, api.lookup, Lookup(key="missing"))
    assert raised.value.code == "404" and raised.value.message == "no value for 'missing'"
    # The raw reply: nats.micro's error headers and an ErrorReply body with the same facts.
    message = await request_raw(nc, api.lookup.subject_for(), encode(Lookup(key="missing")), 10)
    assert message.headers is not None
    assert message.headers[ERROR_CODE_HEADER] == "404"
    assert message.headers[ERROR_HEADER] == "no value for 'missing'"
    body = ErrorReply.model_validate(decode(message.data))
    assert (body.error.code, body.error.message) == ("404", "no value for 'missing'")
    assert isinstance(error_of(message.headers), NotFound)
    with pytest.raises(NotFound):
        raise_for_error(message)


@pytest.mark.parametrize(
    "data",
    [b"\xc1garbage", encode({"nope": 1}), encode({"key": 5}), encode([1, 2])],
    ids=["not-msgpack", "missing-field", "wrong-type", "not-a-map"],
)
async def test_a_bad_body_is_a_bad_request_naming_the_endpoint(
    nc: Client, api: Api, data: bytes
) -> None:
    message = await request_raw(nc, api.lookup.subject_for(), data, 10)
    with pytest.raises(BadRequest) as raised:
        raise_for_error(message)
    assert raised.value.code == "400"
    assert raised.value.message.startswith("bad lookup request")


async def test_an_unexpected_exception_is_a_500_and_the_service_serves_on(
    nc: Client, api: Api
) -> None:
    with pytest.raises(Internal) as raised:
        await call(nc, api.lookup, Lookup(key="crash"))
    assert raised.value.code == "500"
    assert "lookup failed" in raised.value.message and "handler bug" in raised.value.message
    assert await call(nc, api.lookup, Lookup(key="a")) == Found(key="a", value=1)


async def test_a_json_request_gets_a_json_reply_and_a_json_error(nc: Client, api: Api) -> None:
    subject = api.lookup.subject_for()
    ok = await request_raw(nc, subject, b'{"key": "b"}', 10, headers=JSON_HEADERS)
    assert error_of(ok.headers) is None
    assert encoding_from_headers(ok.headers) == "json"
    assert json.loads(ok.data) == {"key": "b", "value": 2}

    failed = await request_raw(nc, subject, b'{"key": "zz"}', 10, headers=JSON_HEADERS)
    assert failed.headers is not None and failed.headers[ERROR_CODE_HEADER] == "404"
    assert encoding_from_headers(failed.headers) == "json"
    assert json.loads(failed.data) == {
        "error": {"code": "404", "message": "no value for 'zz'", "request_id": None}
    }

    garbage = await request_raw(nc, subject, b"{not json", 10, headers=JSON_HEADERS)
    assert isinstance(error_of(garbage.headers), BadRequest)
    assert json.loads(garbage.data)["error"]["code"] == "400"


@pytest.mark.parametrize(
    ("data", "headers"),
    [(b"", None), (encode({}), None), (b"{}", JSON_HEADERS), (b"", JSON_HEADERS)],
    ids=["empty", "msgpack-map", "json-object", "empty-json"],
)
async def test_an_empty_request_accepts_no_body_and_an_empty_map(
    nc: Client, api: Api, data: bytes, headers: dict[str, str] | None
) -> None:
    message = await request_raw(nc, api.count.subject_for(), data, 10, headers=headers)
    raise_for_error(message)
    encoding = encoding_from_headers(message.headers)
    assert api.count.parse_reply(message.data, encoding) == Found(key="count", value=2)


async def test_a_raw_handler_answers_and_errs_through_respond(nc: Client, api: Api) -> None:
    assert await call(nc, api.raw, Lookup(key="abc")) == Found(key="abc", value=3)
    message = await request_raw(nc, api.raw.subject_for(), b"\xc1", 10)
    with pytest.raises(BadRequest, match="bad raw request"):
        raise_for_error(message)


async def test_nobody_serving_the_subject_is_no_responders(nc: Client, api: Api) -> None:
    with pytest.raises(NoResponders) as raised:
        await call(nc, api.nobody, Lookup(key="a"))
    assert isinstance(raised.value, Unavailable) and raised.value.code == "503"
    assert api.nobody.subject_for() in raised.value.message


async def test_a_handler_that_never_answers_is_an_rpc_timeout(nc: Client, api: Api) -> None:
    with pytest.raises(RpcTimeout) as raised:
        await call(nc, api.silent, Lookup(key="a"), timeout_s=0.2)
    # Code that waits with asyncio (wait_for, timeout) catches it as a TimeoutError too.
    assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, Unavailable)
    assert raised.value.code == "503"


async def test_a_per_instance_endpoint_reaches_the_instance_addressed(nc: Client, api: Api) -> None:
    services = []
    for node, offset in (("node-a", 100), ("node-b", 200)):

        async def at(request: Lookup, offset: int = offset) -> Found:
            return Found(key=request.key, value=offset + TABLE[request.key])

        service = await start_service(nc, f"tests-rpc-{node}")
        await add_endpoint(service, api.at, at, address=node)
        services.append(service)
    await nc.flush()
    try:
        assert (await call(nc, api.at, Lookup(key="a"), address="node-a")).value == 101
        assert (await call(nc, api.at, Lookup(key="a"), address="node-b")).value == 201
        with pytest.raises(NoResponders):
            await call(nc, api.at, Lookup(key="a"), address="node-c")
    finally:
        for service in services:
            await service.stop()


async def test_publish_error_answers_a_plain_nats_request(nc: Client, api: Api) -> None:
    subject = f"{api.prefix}.plain"

    async def refuse(message: Msg) -> None:
        await publish_error(nc, message, Conflict("already there"))

    seen = asyncio.Event()

    async def fire_and_forget(message: Msg) -> None:
        await publish_error(nc, message, Conflict("nobody asked"))
        seen.set()

    subscriptions = [
        await nc.subscribe(subject, cb=refuse),
        await nc.subscribe(f"{subject}.event", cb=fire_and_forget),
    ]
    await nc.flush()
    try:
        for headers, encoding in ((None, "msgpack"), (JSON_HEADERS, "json")):
            message = await request_raw(nc, subject, b"", 10, headers=headers)
            with pytest.raises(Conflict, match="already there") as raised:
                raise_for_error(message)
            assert raised.value.code == "409"
            assert encoding_from_headers(message.headers) == encoding
            body = ErrorReply.model_validate(decode(message.data, encoding))
            assert body.error.code == "409"
        # A message with no reply subject gets no answer, and publish_error does not fail.
        await nc.publish(f"{subject}.event", b"")
        await asyncio.wait_for(seen.wait(), timeout=10)
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()


# ---- errors without the wire -----------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [BadRequest, NotFound, Conflict, TooLarge, Overloaded, Internal, Unavailable]
)
def test_every_code_reads_back_as_its_error_class(cls: type[RpcError]) -> None:
    headers, body = error_reply(cls("what went wrong", request_id="req-1"))
    error = error_of(headers)
    assert type(error) is cls and error.code == str(cls.default_code)
    assert error.message == "what went wrong"
    reply = ErrorReply.model_validate(decode(body))
    assert reply.error.request_id == "req-1" and reply.error.code == error.code


def test_a_code_this_version_does_not_know_is_a_plain_rpc_error() -> None:
    error = error_for("418", "a teapot")
    assert type(error) is RpcError and error.code == "418" and error.message == "a teapot"


def test_an_error_header_is_one_bounded_line_equal_to_the_body() -> None:
    headers, body = error_reply(Internal("first line\nsecond\tline " + "x" * 10_000))
    message = headers[ERROR_HEADER]
    assert "\n" not in message and "\t" not in message
    assert message.startswith("first line second line ")
    assert len(message) == MAX_ERROR_MESSAGE_CHARS
    assert ErrorReply.model_validate(decode(body)).error.message == message


def test_a_reply_without_error_headers_is_no_error() -> None:
    assert error_of(None) is None and error_of({}) is None
    assert error_of({"Content-Type": JSON_CONTENT_TYPE}) is None
    assert isinstance(error_of({"Status": "503"}), NoResponders)


def test_an_endpoint_is_addressed_as_declared() -> None:
    api = make_api()
    with pytest.raises(ValueError, match="has one subject"):
        api.lookup.subject_for("node-a")
    with pytest.raises(ValueError, match="needs an address"):
        api.at.subject_for()
    assert api.at.subject_for("node-a") == f"{api.prefix}.node-a.at"


def test_a_bad_reply_body_is_an_internal_error() -> None:
    with pytest.raises(Internal, match="bad lookup reply"):
        make_api().lookup.parse_reply(encode({"key": "a"}))


# ---- the catalogue ---------------------------------------------------------------------------

ADDRESSES = ("instance-0", "instance-1", "node-a")


def subjects_of(endpoint: Endpoint[Any, Any]) -> list[str]:
    if isinstance(endpoint.subject, str):
        return [endpoint.subject_for()]
    return [endpoint.subject_for(address) for address in ADDRESSES]


def test_no_two_endpoints_share_a_subject() -> None:
    owner: dict[str, str] = {}
    for endpoint in ENDPOINTS:
        for subject in subjects_of(endpoint):
            assert subject not in owner, f"{endpoint.name} and {owner[subject]} share {subject}"
            owner[subject] = endpoint.name


def test_endpoint_names_are_unique_among_the_endpoints_of_one_subject_family() -> None:
    # Endpoints whose subjects differ only in the last token are served side by side (one
    # service, or one instance's set); nats.micro tells them apart by name.
    families: dict[str, list[str]] = {}
    for endpoint in ENDPOINTS:
        family = subjects_of(endpoint)[0].rsplit(".", 1)[0]
        families.setdefault(family, []).append(endpoint.name)
    for family, names in families.items():
        assert len(names) == len(set(names)), f"{family}: {sorted(names)}"


@pytest.mark.parametrize(
    "endpoint", [e for e in ENDPOINTS if not isinstance(e.subject, str)], ids=lambda e: e.name
)
def test_a_per_instance_subject_differs_for_each_address(endpoint: Endpoint[Any, Any]) -> None:
    subjects = subjects_of(endpoint)
    assert len(set(subjects)) == len(ADDRESSES), subjects
    for address, subject in zip(ADDRESSES, subjects, strict=True):
        assert address in subject.split("."), f"{subject} does not name {address}"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: f"{e.name}-{e.request.__name__}")
def test_every_endpoint_is_declared_with_models_and_a_versioned_subject(
    endpoint: Endpoint[Any, Any],
) -> None:
    assert issubclass(endpoint.request, BaseModel) and issubclass(endpoint.reply, BaseModel)
    for subject in subjects_of(endpoint):
        assert subject.startswith("spotserve.v1."), subject
    assert endpoint.timeout_s > 0
    # Every endpoint answers bad input and its own failures.
    assert {ErrorCode.BAD_REQUEST, ErrorCode.INTERNAL} <= set(endpoint.errors)
