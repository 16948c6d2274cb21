"""Readers of what the cluster keeps in JetStream: the current plan, the serving mode, a
request's committed tokens and its cancel marker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shared.codec import DecodeError, decode
from shared.messages import (
    ChunkRecord,
    FinishReason,
    ModeReply,
    Plan,
    ServingMode,
    TokenChunk,
)
from shared.runtime import ServiceContext
from shared.subjects import (
    COMMITS_SUBJECT,
    MODE_KEY,
    PLANS_STREAM,
    PLANS_SUBJECT,
    TOKENS_STREAM,
    admin_bucket,
    cancel_key,
    tokens_subject,
)
from shared.waiting import until_stopped

# Idle heartbeat of a long-lived ordered consumer (plans, fleet events, cancel markers): one
# whose server died (a clustered JetStream losing a node) is recreated after two missed
# heartbeats, 2-3 s here instead of 10-15 s with nats-py's default of 5 s.
FOLLOW_HEARTBEAT_S = 1.0
# Bound on the wait for each committed chunk while a request's chunks are read back.
CHUNK_READ_TIMEOUT_S = 10.0


async def follow_plans(context: ServiceContext, on_plan: Callable[[Plan], Awaitable[None]]) -> None:
    """Hand each new plan to ``on_plan``, from the current one on, until the service stops. A
    plan whose epoch is not newer than the last one handed over is stale and never acted on."""
    subscription = await context.js.subscribe(
        PLANS_SUBJECT,
        stream=PLANS_STREAM,
        ordered_consumer=True,
        idle_heartbeat=FOLLOW_HEARTBEAT_S,
        deliver_policy=DeliverPolicy.LAST,
    )
    epoch = 0
    try:
        while True:
            message = await until_stopped(subscription.next_msg(timeout=None), context.stop)
            if message is None:
                return
            try:
                plan = Plan.model_validate(decode(message.data))
            except (DecodeError, ValidationError) as exc:
                context.log.error("plan.unreadable", error=str(exc))
                continue
            if plan.epoch <= epoch:
                context.log.warning("plan.stale", epoch=plan.epoch, current=epoch)
                continue
            epoch = plan.epoch
            await on_plan(plan)
    finally:
        await subscription.unsubscribe()


async def read_serving_mode(context: ServiceContext) -> ServingMode | None:
    """The serving mode admission keeps (``spotserve`` when never set); None when it cannot
    be read right now (the caller keeps what it has)."""
    try:
        bucket = await admin_bucket(context.js)
        entry = await bucket.get(MODE_KEY)
        return ModeReply.model_validate(decode(entry.value or b"")).mode
    except NotFoundError:
        return "spotserve"
    except (NatsError, JetStreamError, TimeoutError, DecodeError, ValidationError) as exc:
        context.log.warning("mode.unreadable", error=repr(exc))
        return None


@dataclass
class CommittedChunks:
    """A request's committed chunks, in index order; ``in_runs``: how many of the first of them
    the runs on its own subject hold (the others only the iteration records do)."""

    chunks: list[TokenChunk]
    in_runs: int


async def read_committed_chunks(
    js: JetStreamContext, request_id: str, timeout_s: float = CHUNK_READ_TIMEOUT_S
) -> list[TokenChunk]:
    """A request's committed chunks (the TOKENS stream), in index order; [] when none."""
    return (await read_committed(js, request_id, timeout_s)).chunks


async def read_committed(
    js: JetStreamContext, request_id: str, timeout_s: float = CHUNK_READ_TIMEOUT_S
) -> CommittedChunks:
    """A request's committed chunks: the runs on its own subject, then, unless they hold all
    of them (the last run is closed and they leave no gap), its chunks in the iteration records
    committed after the run that ends their first gap (a scheduler that died left it)."""
    last_run = await _last_run(js, request_id)
    if last_run is None:
        return CommittedChunks([], 0)
    by_index: dict[int, TokenChunk] = {}
    runs: list[tuple[int, int]] = []  # (stream sequence, last chunk index) of each run
    closed = False
    subject = tokens_subject(request_id)
    async for sequence, record in _records(js, subject, 1, last_run.seq or 0, timeout_s):
        chunks = chunks_of(record)
        for chunk in chunks:
            by_index.setdefault(chunk.index, chunk)
        if chunks:
            runs.append((sequence, max(chunk.index for chunk in chunks)))
        closed = record.closed
    in_runs = _prefix_length(by_index)
    if in_runs == 0 or (closed and in_runs == len(by_index)):
        return CommittedChunks(_prefix(by_index), in_runs)
    # The chunks after the prefix were committed in iterations after the run that ends it.
    after = max(sequence for sequence, last in runs if last < in_runs)
    try:
        last_commit = await js.get_last_msg(TOKENS_STREAM, COMMITS_SUBJECT)
    except NotFoundError:
        return CommittedChunks(_prefix(by_index), in_runs)
    if (last_commit.seq or 0) > after:
        known = max(by_index) + 1  # a closed request has no chunk beyond its runs'
        records = _records(js, COMMITS_SUBJECT, after + 1, last_commit.seq or 0, timeout_s)
        async with contextlib.aclosing(records):
            async for _, record in records:
                _take_chunks(record, request_id, by_index)
                if closed and _prefix_length(by_index) >= known:
                    break  # the gap is filled
    return CommittedChunks(_prefix(by_index), in_runs)


def _take_chunks(record: ChunkRecord, request_id: str, by_index: dict[int, TokenChunk]) -> None:
    """Add the request's chunks in an iteration record to ``by_index``."""
    for body in record.chunks:
        plain = decode(body)
        if plain.get("request_id") == request_id:
            chunk = TokenChunk.model_validate(plain)
            by_index.setdefault(chunk.index, chunk)


async def read_finish_reason(
    js: JetStreamContext, request_id: str
) -> tuple[bool, FinishReason | None]:
    """Whether anything of a request is committed, and how it finished (None: it has not), from
    its last run alone: the run that ends a finished request holds its last chunk."""
    last_run = await _last_run(js, request_id)
    if last_run is None:
        return False, None
    chunks = chunks_of(ChunkRecord.model_validate(decode(last_run.data or b"")))
    if not chunks:
        return True, None  # closed empty: it failed
    return True, chunks[-1].finish_reason


async def _last_run(js: JetStreamContext, request_id: str) -> RawStreamMsg | None:
    """The last run on a request's own subject; None: nothing of it is committed."""
    try:
        return await js.get_last_msg(TOKENS_STREAM, tokens_subject(request_id))
    except NotFoundError:
        return None


def chunks_of(record: ChunkRecord) -> list[TokenChunk]:
    """The chunks a TOKENS record holds, in its order."""
    return [TokenChunk.model_validate(decode(body)) for body in record.chunks]


async def _records(
    js: JetStreamContext, subject: str, first: int, last: int, timeout_s: float
) -> AsyncGenerator[tuple[int, ChunkRecord], None]:
    """The TOKENS records on ``subject`` from stream sequence ``first`` through ``last``,
    with their sequences."""
    subscription = await js.subscribe(
        subject,
        stream=TOKENS_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, first)
        ),
    )
    try:
        while True:
            message = await subscription.next_msg(timeout=timeout_s)
            sequence = message.metadata.sequence.stream
            yield sequence, ChunkRecord.model_validate(decode(message.data))
            if sequence >= last:
                return
    finally:
        await subscription.unsubscribe()


def _prefix_length(by_index: dict[int, TokenChunk]) -> int:
    """How many chunks from index 0 on there are without a gap."""
    length = 0
    while length in by_index:
        length += 1
    return length


def _prefix(by_index: dict[int, TokenChunk]) -> list[TokenChunk]:
    return [by_index[index] for index in range(_prefix_length(by_index))]


async def cancel_requested(bucket: KeyValue, request_id: str) -> bool:
    """Whether a cancel marker (``spotserve.v1.cancel``) stands for the request, in the
    requests bucket (:func:`shared.subjects.requests_bucket`, bound once by a caller that asks
    about many)."""
    try:
        await bucket.get(cancel_key(request_id))
    except NotFoundError:
        return False
    return True
