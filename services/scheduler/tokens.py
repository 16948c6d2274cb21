"""Token commit and forwarding: each iteration's chunks are committed to the TOKENS stream
(JetStream) before any client sees them, then forwarded to the clients' reply subjects, in
iteration order. Committing runs overlapped with the executors' next iterations; the bounded
outbox makes the executor loops wait when it falls behind.

An iteration is committed as one record of all its chunks (one message, one ack, whatever the
batch size), plus a run on a request's own subject for the requests whose chunks call for one
(their first, their last, every RUN_CHUNKS): what a reader of one request needs to find its
chunks without reading more than the last RUN_CHUNKS iterations (shared.readers)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from services.scheduler import metrics
from services.scheduler.intake import RequestIntake
from services.scheduler.replies import send_to_client
from services.scheduler.sequence import Sequence
from shared.codec import encode
from shared.messages import ChunkRecord, TokenChunk
from shared.runtime import ServiceContext
from shared.subjects import COMMITS_SUBJECT, tokens_subject
from shared.waiting import backoff_delays

# Iterations computed but not yet committed, at most: enough to overlap committing with the
# next iterations, few enough that a stalled JetStream stops the executors soon.
OUTBOX_ITERATIONS = 4
# Backoff while JetStream refuses a commit: from the first delay, doubling up to the last
# (short: a clustered JetStream answers again as soon as it has elected the stream's leader,
# and every token of the batch waits for that commit).
COMMIT_RETRY_FIRST_S = 0.1
COMMIT_RETRY_MAX_S = 1.0
# A request's chunks go to its own subject at least every this many chunks: a reader of it
# reads at most about this many iterations' records besides its runs.
RUN_CHUNKS = 64


@dataclass
class IterationOutput:
    chunks: list[tuple[Sequence, TokenChunk]]
    # Requests that ended by an error: their runs are closed (a reader of one looks no further).
    failed: list[Sequence] = field(default_factory=list)


@dataclass(frozen=True)
class Record:
    """One message of a commit: its subject, body and JetStream message id (a retry of the
    same commit is dropped as a duplicate)."""

    subject: str
    body: bytes
    message_id: str


class TokenPublisher:
    """Commits, then forwards, the chunks the executor loops put in its outbox."""

    def __init__(self, context: ServiceContext, intake: RequestIntake) -> None:
        self.context = context
        self.log = context.log
        self.intake = intake
        self.outbox: asyncio.Queue[IterationOutput] = asyncio.Queue(maxsize=OUTBOX_ITERATIONS)
        # Message ids of the iteration records: this publisher's, counted.
        self.run_id = uuid.uuid4().hex
        self.commits = 0

    async def put(self, output: IterationOutput) -> None:
        """Queue one iteration's chunks (waits while the outbox is full)."""
        await self.outbox.put(output)

    async def publish(self) -> None:
        """Commit each iteration's chunks, then forward them; in iteration order."""
        while True:
            output = await self.outbox.get()
            bodies = await self._commit(output)
            for (sequence, chunk), body in zip(output.chunks, bodies, strict=True):
                await self._forward(sequence, chunk, body)
            self.outbox.task_done()

    async def _commit(self, output: IterationOutput) -> list[bytes]:
        """Store the iteration's chunks in JetStream; their msgpack bodies."""
        bodies = [encode(chunk) for _, chunk in output.chunks]
        records = self._records(output, bodies)
        for delay in backoff_delays(COMMIT_RETRY_FIRST_S, COMMIT_RETRY_MAX_S):
            try:
                await self._commit_all(records)
                return bodies
            except (TimeoutError, NatsError, JetStreamError) as exc:
                # Never forward a token that is not durable: wait for JetStream to come back.
                self.log.warning("commit.retry", error=repr(exc), delay_s=delay)
                await asyncio.sleep(delay)
        raise AssertionError("backoff_delays never ends")

    def _records(self, output: IterationOutput, bodies: list[bytes]) -> list[Record]:
        """The iteration's record of all its chunks, then the runs that are due, then the closing
        runs of the failed requests that have committed chunks."""
        records = []
        if bodies:
            self.commits += 1
            body = encode(ChunkRecord(chunks=bodies))
            records.append(Record(COMMITS_SUBJECT, body, f"{self.run_id}.{self.commits}"))
        for (sequence, chunk), body in zip(output.chunks, bodies, strict=True):
            sequence.unrun.append(body)
            if run_due(chunk, len(sequence.unrun)):
                first = chunk.index + 1 - len(sequence.unrun)
                closed = chunk.finish_reason is not None
                run = encode(ChunkRecord(chunks=sequence.unrun, closed=closed))
                message_id = f"{chunk.request_id}.{first}-{chunk.index}"
                records.append(Record(tokens_subject(chunk.request_id), run, message_id))
                sequence.unrun = []
        for sequence in output.failed:
            if sequence.next_chunk_index == 0:
                continue  # nothing committed: there is nothing to read back
            run = encode(ChunkRecord(chunks=sequence.unrun, closed=True))
            message_id = f"{sequence.request_id}.closed"
            records.append(Record(tokens_subject(sequence.request_id), run, message_id))
            sequence.unrun = []
        return records

    async def _commit_all(self, records: list[Record]) -> None:
        """Publish every record, then wait for all their acks at once (one timeout)."""
        acks = []
        try:
            for record in records:
                acks.append(
                    await self.context.js.publish_async(
                        record.subject, record.body, headers={"Nats-Msg-Id": record.message_id}
                    )
                )
            timeout_s = self.context.settings.nats.request_timeout_s
            await asyncio.wait_for(asyncio.gather(*acks), timeout_s)
        finally:
            for ack in acks:
                ack.cancel()  # those still open on a failure (done ones are unaffected)

    async def _forward(self, sequence: Sequence, chunk: TokenChunk, body: bytes) -> None:
        """``body``: the chunk in msgpack, as committed."""
        request = sequence.request
        observe_forward(sequence, chunk)
        nc = self.context.nc
        try:
            if request.stream:
                await send_to_client(nc, request, chunk, body)
            if chunk.finish_reason is not None:
                if not request.stream:
                    await send_to_client(nc, request, sequence.result())
                await self.intake.finish(sequence)
        except NatsError as exc:
            # The token is committed; a client that missed it can read the TOKENS stream.
            self.log.warning("forward.failed", request_id=request.request_id, error=repr(exc))


def run_due(chunk: TokenChunk, unrun: int) -> bool:
    """Whether a committed chunk closes a run on its request's subject (``unrun``: its
    request's chunks not in a run, this one included): its first chunk (where a reader starts
    looking in the iteration records), its last, and every RUN_CHUNKS."""
    return chunk.index == 0 or chunk.finish_reason is not None or unrun >= RUN_CHUNKS


def observe_forward(sequence: Sequence, chunk: TokenChunk) -> None:
    """Metrics of a committed chunk about to be forwarded."""
    now = time.monotonic()
    if chunk.index == 0:
        # Admission's wall clock (accepted_at) to the scheduler's: synchronized clocks.
        latency = time.time() - sequence.request.accepted_at
        metrics.TIME_TO_FIRST_TOKEN.observe(max(0.0, latency))
    elif sequence.forwarded_at is not None:
        metrics.INTER_TOKEN.observe(now - sequence.forwarded_at)
    sequence.forwarded_at = now
    metrics.GENERATED_TOKENS.inc(len(chunk.token_ids))
