"""The fleet event stream (``SPOTSERVE_FLEET``): publishing one event exactly once, and reading
back every stored event when the monitor rebuilds its state at start."""

from __future__ import annotations

import asyncio

import structlog
from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from services.monitor import metrics
from shared.codec import DecodeError, decode, encode
from shared.messages import FleetEvent, FleetEventKind
from shared.rpc import Unavailable
from shared.runtime import ServiceContext
from shared.subjects import FLEET_STREAM, FLEET_SUBJECT_PREFIX, fleet_event_subject
from shared.waiting import backoff_delays

MSG_ID_HEADER = "Nats-Msg-Id"
# Bound on the wait for each stored event while the monitor rebuilds its state at start.
REBUILD_EVENT_TIMEOUT_S = 10.0


class FleetStream:
    def __init__(self, context: ServiceContext, log: structlog.stdlib.BoundLogger) -> None:
        self.js = context.js
        self.request_timeout_s = context.settings.nats.request_timeout_s
        self.log = log

    async def publish(
        self, kind: FleetEventKind, msg_id: str, event: FleetEvent, retry: bool
    ) -> FleetEvent:
        """Publish one event (deduplicated by ``msg_id``); returns the event the stream holds.

        ``retry``: keep trying until it is stored (the change must not be lost); else one try,
        and the caller answers 503."""
        delays = backoff_delays()
        while True:
            try:
                ack = await self.js.publish(
                    fleet_event_subject(kind),
                    encode(event),
                    headers={MSG_ID_HEADER: msg_id},
                    timeout=self.request_timeout_s,
                )
                break
            except (NatsError, TimeoutError) as exc:
                if not retry:
                    raise Unavailable(f"JetStream did not take the event: {exc!r}") from None
                self.log.warning("fleet.publish_retry", kind=kind, msg_id=msg_id, error=repr(exc))
                await asyncio.sleep(next(delays))
        metrics.FLEET_EVENTS.labels(kind).inc()
        if ack.duplicate:
            # An earlier try was stored after all: that stored event is the truth.
            stored = await self.js.get_msg(FLEET_STREAM, ack.seq)
            event = FleetEvent.model_validate(decode(stored.data or b""))
        self.log.info(
            "fleet.event",
            kind=kind,
            instance_id=event.instance.instance_id,
            deadline=event.deadline,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
        )
        return event

    async def read_all(self) -> list[FleetEvent]:
        """Every event the stream holds, oldest first (a malformed one is logged and skipped)."""
        info = await self.js.stream_info(FLEET_STREAM)
        last = info.state.last_seq
        if not info.state.messages:
            return []
        events: list[FleetEvent] = []
        subscription = await self.js.subscribe(
            f"{FLEET_SUBJECT_PREFIX}.*",
            stream=FLEET_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            while True:
                message = await subscription.next_msg(timeout=REBUILD_EVENT_TIMEOUT_S)
                try:
                    events.append(FleetEvent.model_validate(decode(message.data)))
                except (DecodeError, ValidationError) as exc:
                    self.log.warning("fleet.bad_event_in_stream", error=str(exc))
                if message.metadata.sequence.stream >= last:
                    break
        finally:
            await subscription.unsubscribe()
        return events
