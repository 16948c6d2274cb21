"""Cancellation: requests a client asked to stop (``spotserve.v1.cancel``, or the gateway when
its HTTP client went away).

Admission leaves a marker in the requests bucket (``cancel_key``): durable, so it also reaches a
scheduler that takes the request later, or again after a restart. Here the markers arrive
through an ordered consumer on the bucket's marker subject, and a periodic sweep over the held
requests finds those the consumer missed (a marker put before this scheduler started, or while
NATS was away).

A cancelled request ends at an iteration boundary of the executor holding it (never in the
middle of a step): the policy drops it, its KV cache is released there with the next command,
and its last chunk (``finish_reason: "cancelled"``) is committed and forwarded like any other,
after the tokens of the iterations before it. A request not bound to an executor ends at once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from nats.js.errors import Error as JetStreamError

from services.scheduler.executors import ExecutorHandle, ExecutorPool
from services.scheduler.policy_base import SchedulerPolicy
from services.scheduler.sequence import Sequence
from services.scheduler.tokens import IterationOutput, TokenPublisher
from shared.readers import FOLLOW_HEARTBEAT_S, cancel_requested
from shared.runtime import ServiceContext
from shared.subjects import CANCEL_MARKERS_SUBJECT, REQUESTS_BUCKET, requests_bucket
from shared.waiting import sleep_unless_stopped, until_stopped

# Cancels waiting to be looked at; beyond it one is dropped (and found by the next sweep).
PENDING_MAX = 10_000
# Markers of requests this scheduler does not hold (yet): kept, newest last, so a request taken
# just after its marker arrived is still cancelled.
UNMATCHED_MAX = 10_000
# How often the held requests are checked for a marker the consumer missed.
SWEEP_INTERVAL_S = 10.0
# How often the worker looks for cancelled requests left unbound (their executor went away),
# while there are cancelled requests not ended yet.
WORKER_TICK_S = 1.0


class Cancellations:
    """Finds cancelled requests and ends them at the next iteration boundary."""

    def __init__(
        self,
        context: ServiceContext,
        policy: SchedulerPolicy,
        pool: ExecutorPool,
        held: dict[str, Sequence],
        tokens: TokenPublisher,
    ) -> None:
        self.context = context
        self.log = context.log
        self.policy = policy
        self.pool = pool
        self.held = held
        self.tokens = tokens
        self.pending: asyncio.Queue[str] = asyncio.Queue(maxsize=PENDING_MAX)
        self.unmatched: OrderedDict[str, None] = OrderedDict()
        # Held, cancel requested, not ended yet: what the iteration loops look at.
        self.flagged: set[Sequence] = set()

    # ---- finding cancels ----

    def request(self, request_id: str) -> None:
        """A cancel for ``request_id`` was seen (any source); acted on by :meth:`work`."""
        try:
            self.pending.put_nowait(request_id)
        except asyncio.QueueFull:
            self.log.warning("cancel.queue_full", request_id=request_id)

    def taken(self, sequence: Sequence) -> None:
        """A request was taken in: cancel it if its marker came first."""
        if self.unmatched.pop(sequence.request_id, "absent") is None:
            self.request(sequence.request_id)

    async def watch(self) -> None:
        """Markers as they are put, until the service stops."""
        subscription = await self._subscribe()
        try:
            await self.context.stop.wait()
        finally:
            await subscription.unsubscribe()

    async def _subscribe(self) -> Subscription:
        async def on_marker(message: Msg) -> None:
            # $KV.<bucket>.<request_id>.cancel
            self.request(message.subject.split(".")[-2])

        return await self.context.js.subscribe(
            CANCEL_MARKERS_SUBJECT,
            stream=f"KV_{REQUESTS_BUCKET}",
            cb=on_marker,
            ordered_consumer=True,
            idle_heartbeat=FOLLOW_HEARTBEAT_S,
            deliver_policy=DeliverPolicy.NEW,
            headers_only=True,
        )

    async def sweep(self) -> None:
        """Every SWEEP_INTERVAL_S: the held requests whose marker the consumer missed."""
        while not self.context.stop.is_set():
            await sleep_unless_stopped(self.context.stop, SWEEP_INTERVAL_S)
            unflagged = [s for s in self.held.values() if not (s.cancel_requested or s.finished)]
            if not unflagged:
                continue
            try:
                bucket = await requests_bucket(self.context.js)
                for sequence in unflagged:
                    if await cancel_requested(bucket, sequence.request_id):
                        self.request(sequence.request_id)
            except (TimeoutError, NatsError, JetStreamError) as exc:
                self.log.debug("cancel.sweep_failed", error=repr(exc))

    # ---- acting on them ----

    async def work(self) -> None:
        """Flag each cancelled request; end those no executor holds."""
        while True:
            tick = WORKER_TICK_S if self.flagged else None
            try:
                request_id = await asyncio.wait_for(
                    until_stopped(self.pending.get(), self.context.stop), tick
                )
            except TimeoutError:
                await self._end_unbound()
                continue
            if request_id is None:
                return
            await self._flag(request_id)

    async def _flag(self, request_id: str) -> None:
        sequence = self.held.get(request_id)
        if sequence is None:
            self.unmatched[request_id] = None
            while len(self.unmatched) > UNMATCHED_MAX:
                self.unmatched.popitem(last=False)
            return
        if sequence.finished or sequence.cancel_requested:
            return
        sequence.cancel_requested = True
        self.flagged.add(sequence)
        self.log.info("request.cancel_flagged", request_id=request_id, executor=sequence.executor)
        handle = self.pool.executors.get(sequence.executor) if sequence.executor else None
        if handle is None:
            await self._end_unbound()
        else:
            handle.wake.set()

    async def _end_unbound(self) -> None:
        for sequence in [s for s in self.flagged if s.executor is None]:
            await self._end(sequence, None)

    async def apply(self, handle: ExecutorHandle) -> None:
        """At an iteration boundary of ``handle`` (a step may be in flight: what it computes
        for them is thrown away): end the cancelled requests it holds (and any no executor
        holds)."""
        if not self.flagged:
            return  # the per-iteration path
        here = handle.view.instance_id
        for sequence in [s for s in self.flagged if s.executor in (None, here)]:
            await self._end(sequence, handle if sequence.executor == here else None)

    async def _end(self, sequence: Sequence, handle: ExecutorHandle | None) -> None:
        self.flagged.discard(sequence)
        if sequence.finished or self.held.get(sequence.request_id) is not sequence:
            return  # it finished on its own in the iteration before
        self.policy.remove(sequence)
        if handle is not None and sequence.kv_location != "none":
            handle.pending_release.append(sequence.request_id)
        chunk = sequence.cancel()
        self.log.info(
            "request.cancelled",
            request_id=sequence.request_id,
            completion_tokens=len(sequence.generated),
        )
        # Committed, forwarded and acked in order after the tokens computed before it.
        await self.tokens.put(IterationOutput(chunks=[(sequence, chunk)]))
