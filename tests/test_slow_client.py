"""A client that stops reading its token stream does not stall other requests: a raw TCP NATS
client subscribes to its inbox, sends long streaming requests and then never reads its socket
again; meanwhile other clients' requests complete, and the slow client's requests still finish
(their committed results are all there for when it comes back)."""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import urlparse

import msgpack

from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.messages import ResultReply
from tests.helpers import eventually

SLOW_REQUESTS = 3
SLOW_TOKENS = 300


async def open_silent_client(url: str, request_ids: list[str]) -> asyncio.StreamWriter:
    """A NATS client speaking the protocol by hand that sends its requests and then stops
    reading (its socket buffer fills, the server has to hold or drop its messages)."""
    address = urlparse(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    await reader.readline()  # INFO
    inbox = f"_INBOX.silent.{uuid.uuid4().hex}"
    lines = [
        b"CONNECT " + json.dumps({"verbose": False, "pedantic": False}).encode() + b"\r\n",
        f"SUB {inbox}.* 1\r\n".encode(),
    ]
    for index, request_id in enumerate(request_ids):
        body = msgpack.packb(
            {"prompt": f"Nobody reads me {index}", "max_tokens": SLOW_TOKENS, "stream": True,
             "ignore_eos": True, "temperature": 0.0, "request_id": request_id}
        )  # fmt: skip
        lines.append(f"PUB spotserve.v1.generate {inbox}.{index} {len(body)}\r\n".encode())
        lines.append(body + b"\r\n")
    writer.write(b"".join(lines))
    await writer.drain()
    return writer  # never read from again


async def test_a_client_that_stops_reading_does_not_stall_others(
    cluster: LocalCluster, client: SpotserveClient
) -> None:
    request_ids = [f"silent-{uuid.uuid4().hex[:10]}" for _ in range(SLOW_REQUESTS)]
    writer = await open_silent_client(cluster.nats_url, request_ids)
    try:
        # Other clients are served while the silent one's requests generate.
        completions = await asyncio.wait_for(
            asyncio.gather(
                *(client.generate(f"Reader {i}", max_tokens=12, ignore_eos=True) for i in range(3))
            ),
            timeout=180,
        )
        outcomes = [(c.finish_reason, len(c.token_ids), c.completion_tokens) for c in completions]
        assert outcomes == [("length", 12, 12)] * 3
        # The silent client's requests finish all the same; their results wait for it.
        for request_id in request_ids:

            async def finished(request_id: str = request_id) -> ResultReply | None:
                result = await client.result(request_id)
                return result if result.finish_reason is not None else None

            result = await eventually(finished, f"{request_id} to finish", timeout_s=300)
            assert result.finish_reason == "length" and len(result.token_ids) == SLOW_TOKENS
    finally:
        writer.close()
