"""Request intake: the pull consumer on the REQUESTS stream and the lifecycle of every request
the scheduler holds (its JetStream message is acked when it finishes, termed when it fails,
kept alive with in-progress acks while it runs, and nak'ed back on shutdown).

A request is acked only when it has finished, so a crashed scheduler loses nothing: JetStream
redelivers it and the next scheduler resumes from its committed tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from pydantic import ValidationError

from services.scheduler import metrics
from services.scheduler.replies import send_error_to_client, send_to_client
from services.scheduler.sequence import Sequence
from shared.codec import DecodeError, decode
from shared.messages import AcceptedRequest, TokenChunk
from shared.model.tokenizer import TextTokenizer
from shared.readers import CommittedChunks, read_committed
from shared.rpc import Internal, RpcError
from shared.runtime import ServiceContext
from shared.subjects import (
    REQUESTS_STREAM,
    REQUESTS_SUBJECT,
    SCHEDULER_CONSUMER,
    scheduler_consumer_config,
)
from shared.waiting import wait_event

# Waiting for requests, a fetch asks for one: a pull for more may stay open on the server after
# the fetch returned with fewer (nats-py 2.16 sends its no-wait probe with an expiry, which the
# server treats as a lingering pull), and a request arriving meanwhile is held there until the
# pull expires, up to fetch_timeout_s later. Once one came, one short pull takes what else is
# there already (a burst joins the same iteration); it holds an arrival this long at most.
DRAIN_TIMEOUT_S = 0.005
# Most messages that pull asks for.
DRAIN_BATCH_MAX = 32
# While every place is taken, how often the loop looks for room again even when no finished
# request signalled it (a signal set while it was not waiting is not lost for longer).
CAPACITY_RECHECK_S = 1.0
# Pause after a failed fetch (NATS reconnecting, stream unavailable) before the next one.
FETCH_RETRY_S = 0.5
# In-progress acks per ack wait: more than one, so one lost ack does not get a running
# request redelivered.
KEEPALIVES_PER_ACK_WAIT = 3


async def pull_requests(
    subscription: JetStreamContext.PullSubscription, room: int, timeout_s: float
) -> AsyncIterator[Msg]:
    """The next requests, at most ``room``, as the scheduler takes them: the first as soon as
    it is there (TimeoutError when none comes within ``timeout_s``), then what else is there
    already."""
    for message in await subscription.fetch(batch=1, timeout=timeout_s):
        yield message
    if room <= 1:
        return
    try:
        drained = await subscription.fetch(
            batch=min(room - 1, DRAIN_BATCH_MAX), timeout=DRAIN_TIMEOUT_S
        )
    except TimeoutError:
        return
    for message in drained:
        yield message


class RequestIntake:
    """Takes accepted requests off the REQUESTS stream and holds them until they end."""

    def __init__(
        self,
        context: ServiceContext,
        tokenizer: TextTokenizer,
        on_request: Callable[[Sequence], None],
    ) -> None:
        self.context = context
        self.settings = context.settings.scheduler
        self.tokenizer = tokenizer
        self.log = context.log
        # Called with each request taken in, to hand it to the policy.
        self._on_request = on_request
        self.held: dict[str, Sequence] = {}
        # Set when a held request ends: the consumer may fetch again.
        self.capacity = asyncio.Event()

    # ---- consuming ----

    async def consume(self) -> None:
        subscription = await self.context.js.pull_subscribe(
            REQUESTS_SUBJECT,
            durable=SCHEDULER_CONSUMER,
            stream=REQUESTS_STREAM,
            config=scheduler_consumer_config(
                self.settings.ack_wait_s, self.settings.max_inflight_requests
            ),
        )
        try:
            await self._consume_from(subscription)
        finally:
            # A pull subscription nobody reads would hold up the connection's drain.
            await subscription.unsubscribe()

    async def _consume_from(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self.context.stop.is_set():
            room = self.settings.max_inflight_requests - len(self.held)
            if room <= 0:
                self.capacity.clear()
                await wait_event(self.capacity, CAPACITY_RECHECK_S)
                continue
            messages = pull_requests(subscription, room, self.settings.fetch_timeout_s)
            while (message := await self._next(messages)) is not None:
                await self._take(message)

    async def _next(self, messages: AsyncIterator[Msg]) -> Msg | None:
        """The next message; None when no more came in time or on failure."""
        try:
            return await anext(messages)
        except (StopAsyncIteration, TimeoutError):
            return None
        except (NatsError, JetStreamError) as exc:
            self.log.warning("consume.fetch_failed", error=repr(exc))
            await asyncio.sleep(FETCH_RETRY_S)
            return None

    async def _take(self, message: Msg) -> None:
        try:
            request = AcceptedRequest.model_validate(decode(message.data))
        except (DecodeError, ValidationError) as exc:
            # Admission validated it; an unreadable record will never become readable.
            self.log.error("consume.bad_record", error=str(exc))
            await message.term()
            return
        if request.request_id in self.held:
            return  # a redelivery of a request we are already running
        redelivered = message.metadata.num_delivered > 1
        metrics.RECEIVED.labels("redelivered" if redelivered else "first").inc()
        committed = CommittedChunks([], 0)
        if redelivered:
            committed = await self._read_committed(request.request_id)
        sequence = Sequence.create(
            request, message, self.tokenizer, committed.chunks, committed.in_runs
        )
        log = self.log.bind(request_id=request.request_id)
        if committed.chunks:
            await self._resend_committed(sequence, committed.chunks)
        if sequence.finished:
            log.info("request.already_finished")
            await message.ack()
            return
        log.info("request.scheduled", resumed_tokens=len(sequence.generated))
        self.held[request.request_id] = sequence
        self._on_request(sequence)

    async def _resend_committed(self, sequence: Sequence, committed: list[TokenChunk]) -> None:
        """The scheduler before us may have died between committing and forwarding: send the
        committed chunks (or the finished result) again; clients drop indices they have seen,
        and a request/reply client only ever reads the first reply."""
        request = sequence.request
        try:
            if request.stream:
                for chunk in committed:
                    await send_to_client(self.context.nc, request, chunk)
            elif sequence.finished:
                await send_to_client(self.context.nc, request, sequence.result())
        except NatsError as exc:
            self.log.warning("resend.failed", request_id=request.request_id, error=repr(exc))

    async def _read_committed(self, request_id: str) -> CommittedChunks:
        """The chunks an earlier scheduler committed for this request, in order."""
        return await read_committed(
            self.context.js, request_id, timeout_s=self.settings.step_timeout_s
        )

    # ---- ending held requests ----

    async def finish(self, sequence: Sequence) -> None:
        """Its last chunk is committed and forwarded: JetStream may forget it."""
        await sequence.message.ack()
        self._let_go(sequence)
        metrics.REQUESTS.labels(sequence.finish_reason or "stop").inc()
        # Admission's wall clock (accepted_at) to the scheduler's: synchronized clocks.
        latency = time.time() - sequence.request.accepted_at
        metrics.END_TO_END.observe(max(0.0, latency))
        self.log.info(
            "request.finished",
            request_id=sequence.request_id,
            finish_reason=sequence.finish_reason,
            completion_tokens=len(sequence.generated),
        )

    async def fail(
        self, sequence: Sequence, message: str, error_type: type[RpcError] = Internal
    ) -> None:
        """Give up on it: an error answer to the client, and no redelivery either."""
        request = sequence.request
        self.log.error("request.failed", request_id=request.request_id, reason=message)
        error = error_type(message, request_id=request.request_id)
        await send_error_to_client(self.context.nc, request, error)
        # Terminal: the request will not be retried by JetStream either.
        await sequence.message.term()
        self._let_go(sequence)
        metrics.REQUESTS.labels("error").inc()

    def _let_go(self, sequence: Sequence) -> None:
        self.held.pop(sequence.request_id, None)
        self.capacity.set()

    # ---- keeping held requests alive ----

    async def keepalive(self) -> None:
        interval = self.settings.ack_wait_s / KEEPALIVES_PER_ACK_WAIT
        while not self.context.stop.is_set():
            await wait_event(self.context.stop, interval)
            for sequence in list(self.held.values()):
                try:
                    await sequence.message.in_progress()
                except NatsError as exc:
                    self.log.warning("keepalive.failed", error=repr(exc))

    async def release_held(self) -> None:
        """On shutdown: hand unfinished requests back to JetStream for the next scheduler."""
        for sequence in list(self.held.values()):
            try:
                await sequence.message.nak()
            except NatsError:
                pass
