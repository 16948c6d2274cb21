"""How a request's committed chunks are read back from the TOKENS stream's records (its runs on
its own subject, then the iteration records after the last run), against a real nats-server:
finished, failed, still running, and resumed by a second scheduler that left a gap in its
runs."""

from __future__ import annotations

import uuid

from nats.aio.client import Client
from nats.js import JetStreamContext

from shared.codec import encode
from shared.messages import ChunkRecord, TokenChunk
from shared.readers import read_committed, read_finish_reason
from shared.subjects import COMMITS_SUBJECT, ensure_streams, tokens_subject


def chunk(request_id: str, index: int, finished: bool = False) -> TokenChunk:
    return TokenChunk(
        request_id=request_id,
        index=index,
        token_ids=[100 + index],
        text=f"<{index}>",
        finish_reason="length" if finished else None,
    )


async def commit(js: JetStreamContext, *chunks: TokenChunk) -> None:
    """One iteration record holding ``chunks``."""
    record = ChunkRecord(chunks=[encode(c) for c in chunks])
    await js.publish(COMMITS_SUBJECT, encode(record))


async def run(js: JetStreamContext, *chunks: TokenChunk, closed: bool | None = None) -> None:
    """A run of one request's chunks on its own subject (closed: by default when its last
    chunk ends the request, as the scheduler writes it)."""
    if closed is None:
        closed = chunks[-1].finish_reason is not None
    record = ChunkRecord(chunks=[encode(c) for c in chunks], closed=closed)
    await js.publish(tokens_subject(chunks[0].request_id), encode(record))


async def streams(nc: Client) -> JetStreamContext:
    js = nc.jetstream(timeout=10)
    await ensure_streams(js)
    return js


async def started(nc: Client) -> tuple[JetStreamContext, str]:
    """A new request whose first chunk is committed (its iteration record and its run)."""
    js = await streams(nc)
    rid = uuid.uuid4().hex
    await commit(js, chunk(rid, 0))
    await run(js, chunk(rid, 0))
    return js, rid


async def test_nothing_committed_reads_as_nothing(nc: Client) -> None:
    js = await streams(nc)
    rid = uuid.uuid4().hex
    committed = await read_committed(js, rid)
    assert committed.chunks == []
    assert committed.in_runs == 0
    assert await read_finish_reason(js, rid) == (False, None)


async def test_a_finished_request_reads_from_its_runs(nc: Client) -> None:
    js = await streams(nc)
    rid, other = uuid.uuid4().hex, uuid.uuid4().hex
    await commit(js, chunk(rid, 0), chunk(other, 0))
    await run(js, chunk(rid, 0))
    await run(js, chunk(other, 0))
    await commit(js, chunk(other, 1), chunk(rid, 1))
    await commit(js, chunk(rid, 2, finished=True))
    await run(js, chunk(rid, 1), chunk(rid, 2, finished=True))
    committed = await read_committed(js, rid)
    assert [c.index for c in committed.chunks] == [0, 1, 2]
    assert committed.chunks[-1].finish_reason == "length"
    assert committed.in_runs == 3
    assert await read_finish_reason(js, rid) == (True, "length")


async def test_a_running_request_reads_the_iterations_after_its_last_run(nc: Client) -> None:
    js = await streams(nc)
    rid, other = uuid.uuid4().hex, uuid.uuid4().hex
    await commit(js, chunk(rid, 0))
    await run(js, chunk(rid, 0))
    for index in range(1, 5):
        await commit(js, chunk(other, index - 1), chunk(rid, index))
    committed = await read_committed(js, rid)
    assert [c.index for c in committed.chunks] == [0, 1, 2, 3, 4]
    assert [c.text for c in committed.chunks] == [f"<{i}>" for i in range(5)]
    assert committed.in_runs == 1
    assert await read_finish_reason(js, rid) == (True, None)


async def test_a_gap_in_the_runs_is_filled_from_the_iterations(nc: Client) -> None:
    """A scheduler died after committing chunks 1-2 in iteration records only; the next one
    ran the request on (its first run holding 3-4): the reader takes 1-2 from the iterations."""
    js, rid = await started(nc)
    await commit(js, chunk(rid, 1))
    await commit(js, chunk(rid, 2))
    await commit(js, chunk(rid, 3))
    await commit(js, chunk(rid, 4, finished=True))
    await run(js, chunk(rid, 3), chunk(rid, 4, finished=True))
    committed = await read_committed(js, rid)
    assert [c.index for c in committed.chunks] == [0, 1, 2, 3, 4]
    assert committed.chunks[-1].finish_reason == "length"
    assert committed.in_runs == 1


async def test_a_failed_request_reads_up_to_its_closed_run(nc: Client) -> None:
    """A closed run without a finishing chunk (the request failed): no chunk of it follows, so
    nothing after it is read (a stray record after it is not taken)."""
    js, rid = await started(nc)
    await commit(js, chunk(rid, 1))
    await run(js, chunk(rid, 1), closed=True)
    await commit(js, chunk(rid, 2))  # not a real commit: a reader must not go this far
    committed = await read_committed(js, rid)
    assert [c.index for c in committed.chunks] == [0, 1]
    assert committed.in_runs == 2
    assert await read_finish_reason(js, rid) == (True, None)  # failed: not finished


async def test_a_gap_before_a_closed_run_is_read_no_further_than_it_needs(nc: Client) -> None:
    js, rid = await started(nc)
    await commit(js, chunk(rid, 1))
    await commit(js, chunk(rid, 2))
    await run(js, chunk(rid, 2), closed=True)
    await commit(js, chunk(rid, 3))  # beyond the closed run: not read
    committed = await read_committed(js, rid)
    assert [c.index for c in committed.chunks] == [0, 1, 2]
