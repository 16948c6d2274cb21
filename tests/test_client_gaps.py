"""The client library never yields a hole in a stream: a chunk lost on the way (core NATS does
not redeliver) is read back from the committed result, retried while that read fails (a NATS
server lost, admission reconnecting), and past the chunk timeout the stream ends with an error
that names the missing chunks. Against a real nats-server, with a scripted service on the
generate and result subjects that loses chunk 1 on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.bus import connect
from shared.client import SpotserveClient
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.messages import ResultReply, TokenChunk, Usage
from shared.natsserver import EmbeddedNatsServer
from shared.rpc import GENERATE_ENDPOINT, RESULT_ENDPOINT, Unavailable, error_reply
from tests.helpers import running_nats

REQUEST_ID = "gap-1"
CHUNKS = [
    TokenChunk(request_id=REQUEST_ID, index=0, token_ids=[11], text="a"),
    TokenChunk(request_id=REQUEST_ID, index=1, token_ids=[12, 13], text="bc"),
    TokenChunk(request_id=REQUEST_ID, index=2, token_ids=[14], text="d"),
    TokenChunk(
        request_id=REQUEST_ID,
        index=3,
        token_ids=[15],
        text="e",
        finish_reason="length",
        usage=Usage(prompt_tokens=2, completion_tokens=5),
    ),
]
LOST_INDEX = 1


class ScriptedService:
    """Streams CHUNKS without chunk 1; answers ``result`` with an error ``failures`` times,
    then with everything committed (all of CHUNKS)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.failures = 0
        self.result_calls = 0

    def expect(self, failures: int) -> None:
        """The next stream's result lookups fail this many times."""
        self.failures, self.result_calls = failures, 0

    async def start(self) -> None:
        await self.nc.subscribe(GENERATE_ENDPOINT.subject_for(), cb=self.on_generate)
        await self.nc.subscribe(RESULT_ENDPOINT.subject_for(), cb=self.on_result)
        await self.nc.flush()

    async def on_generate(self, message: Msg) -> None:
        assert message.reply
        for chunk in CHUNKS:
            if chunk.index != LOST_INDEX:
                await self.nc.publish(message.reply, encode(chunk))

    async def on_result(self, message: Msg) -> None:
        assert decode(message.data)["request_id"] == REQUEST_ID
        self.result_calls += 1
        if self.result_calls <= self.failures:
            error = Unavailable("committed tokens unreadable now; retry")
            headers, body = error_reply(error)
            await self.nc.publish(message.reply, body, headers=headers)
            return
        reply = ResultReply(
            request_id=REQUEST_ID,
            token_ids=[token for chunk in CHUNKS for token in chunk.token_ids],
            text="".join(chunk.text for chunk in CHUNKS),
            finish_reason="length",
            usage=CHUNKS[-1].usage,
            chunks=len(CHUNKS),
        )
        await self.nc.publish(message.reply, encode(reply))


@pytest.fixture(scope="module")
def gap_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    # Its own server: the session's cluster serves the same subjects.
    with running_nats(tmp_path_factory, "client-gaps") as server:
        yield server


@pytest.fixture(scope="module")
async def service(gap_server: EmbeddedNatsServer) -> AsyncIterator[ScriptedService]:
    # One for the module: its subscriptions are in place before any test publishes.
    nc = await connect(gap_server.url, NatsSettings(), "scripted-service", 10)
    scripted = ScriptedService(nc)
    await scripted.start()
    yield scripted
    await nc.close()


@pytest.fixture
async def client_nc(gap_server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    nc = await connect(gap_server.url, NatsSettings(), "gap-client", 10)
    yield nc
    await nc.close()


async def collect(client: SpotserveClient, received: list[TokenChunk]) -> None:
    async for chunk in client.stream("hi", max_tokens=5, request_id=REQUEST_ID):
        received.append(chunk)


async def test_a_lost_chunk_is_read_back_while_the_result_is_unreadable_for_a_while(
    service: ScriptedService, client_nc: Client
) -> None:
    service.expect(failures=3)
    received: list[TokenChunk] = []
    await collect(
        SpotserveClient(client_nc, first_chunk_timeout_s=10, chunk_timeout_s=10), received
    )

    assert service.result_calls == 4  # three refusals, then the committed result
    assert [token for chunk in received for token in chunk.token_ids] == [11, 12, 13, 14, 15]
    assert "".join(chunk.text for chunk in received) == "abcde"
    assert received[-1].finish_reason == "length"


async def test_a_lost_chunk_that_cannot_be_read_back_ends_the_stream_with_an_error(
    service: ScriptedService, client_nc: Client
) -> None:
    service.expect(failures=1_000_000)
    received: list[TokenChunk] = []
    client = SpotserveClient(client_nc, first_chunk_timeout_s=10, chunk_timeout_s=0.5)
    with pytest.raises(Unavailable, match=r"chunks 1\.\.1 of request 'gap-1' were lost"):
        await collect(client, received)

    # What was yielded is a prefix of the stream, never a stream with a hole.
    assert [chunk.index for chunk in received] == [0]
    assert service.result_calls >= 2
