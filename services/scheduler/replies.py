"""What the scheduler sends to a client's reply subject: chunks, results and errors, in the
encoding the client asked for."""

from __future__ import annotations

from nats.aio.client import Client
from pydantic import BaseModel

from shared.codec import content_type_header, encode
from shared.messages import AcceptedRequest
from shared.rpc import RpcError, error_reply


async def send_to_client(
    nc: Client, request: AcceptedRequest, body: BaseModel, msgpack_body: bytes | None = None
) -> None:
    """Publish ``body`` to the request's reply subject (none: the client reads the stream);
    ``msgpack_body``: the body already encoded in msgpack, sent as is to a msgpack client.
    A JSON body says so in its Content-Type; a msgpack one goes without headers (msgpack is
    what a body without them is), which spares every chunk the header encoding and parsing."""
    if not request.reply_subject:
        return
    if request.encoding == "msgpack":
        encoded = msgpack_body if msgpack_body is not None else encode(body)
        await nc.publish(request.reply_subject, encoded)
        return
    encoded = encode(body, request.encoding)
    await nc.publish(request.reply_subject, encoded, headers=content_type_header(request.encoding))


async def send_error_to_client(nc: Client, request: AcceptedRequest, error: RpcError) -> None:
    """Publish an error answer (nats.micro error headers and an ErrorReply body)."""
    if not request.reply_subject:
        return
    headers, body = error_reply(error, request.encoding)
    await nc.publish(request.reply_subject, body, headers=headers)
