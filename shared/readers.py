"""Readers of what the cluster keeps in JetStream: the current plan, the serving mode, a
request's committed tokens and its cancel marker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from shared.codec import DecodeError, decode
from shared.messages import (
    ModeReply,
    Plan,
    ServingMode,
    TokenChunk,
)
from shared.runtime import ServiceContext
from shared.subjects import (
    MODE_KEY,
    PLANS_STREAM,
    PLANS_SUBJECT,
    TOKENS_STREAM,
    admin_bucket,
    cancel_key,
    requests_bucket,
    tokens_subject,
)

# How often a plan follower looks at the stop signal while no plan arrives.
PLAN_POLL_S = 1.0
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
        while not context.stop.is_set():
            try:
                message = await subscription.next_msg(timeout=PLAN_POLL_S)
            except TimeoutError:
                continue
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


async def read_committed_chunks(
    js: JetStreamContext, request_id: str, timeout_s: float = CHUNK_READ_TIMEOUT_S
) -> list[TokenChunk]:
    """A request's committed chunks (the TOKENS stream), in index order; [] when none."""
    subject = tokens_subject(request_id)
    try:
        last = await js.get_last_msg(TOKENS_STREAM, subject)
    except NotFoundError:
        return []
    count = TokenChunk.model_validate(decode(last.data or b"")).index + 1
    subscription = await js.subscribe(
        subject, ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    chunks: list[TokenChunk] = []
    try:
        while len(chunks) < count:
            message = await subscription.next_msg(timeout=timeout_s)
            chunk = TokenChunk.model_validate(decode(message.data))
            if chunk.index == len(chunks):
                chunks.append(chunk)
    finally:
        await subscription.unsubscribe()
    return chunks


async def cancel_requested(js: JetStreamContext, request_id: str) -> bool:
    """Whether a cancel marker (``spotserve.v1.cancel``) stands for the request."""
    bucket = await requests_bucket(js)
    try:
        await bucket.get(cancel_key(request_id))
    except NotFoundError:
        return False
    return True
