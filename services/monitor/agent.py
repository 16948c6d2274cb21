"""The per-node preemption agent: ``python -m services.monitor agent --provider aws|gcp|azure``.

It polls the cloud's metadata endpoint (``services.monitor.cloud``) and sends each notice it
finds, once, to the monitor as a :class:`PreemptNotice` (``spotserve.v1.fleet.notice``) whose
grace period is the time left until the cloud's deadline. A notice the monitor did not take
(no monitor yet, a timeout, the instance not registered yet) is sent again at the next poll;
the monitor folds repeats into one event anyway. A malformed or unreachable endpoint is logged
and polled again: the agent never dies of what the metadata server says.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from services.monitor import metrics
from services.monitor.cloud import (
    CloudAdapter,
    CloudNotice,
    MetadataError,
    MetadataUnreachableError,
    make_adapter,
)
from shared.codec import encode
from shared.config import ConfigurationError
from shared.messages import NOTICE_OUTCOME_HEADER, FleetEvent, PreemptNotice
from shared.rpc import (
    NOTICE_ENDPOINT,
    BadRequest,
    NoResponders,
    NotFound,
    RpcError,
    RpcTimeout,
    raise_for_error,
    request_raw,
)
from shared.runtime import ServiceContext
from shared.waiting import sleep_unless_stopped

MAX_GRACE_S = 3600.0


class NoticeAgent:
    def __init__(
        self,
        nc: Client,
        adapter: CloudAdapter,
        instance_id: str,
        request_timeout_s: float,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.nc = nc
        self.adapter = adapter
        self.instance_id = instance_id
        self.request_timeout_s = request_timeout_s
        self.log = log.bind(provider=adapter.provider, instance_id=instance_id)
        # Keys of the notices the monitor has taken: each is sent once.
        self.sent: set[str] = set()
        self._last_problem: str | None = None

    async def poll_once(self) -> CloudNotice | None:
        """One poll; forwards a new notice. Returns the notice seen (None: none or an error)."""
        try:
            notice = await asyncio.to_thread(self.adapter.poll)
        except MetadataUnreachableError as exc:
            metrics.AGENT_POLL_ERRORS.labels("unreachable").inc()
            self._problem("agent.metadata_unreachable", str(exc))
            return None
        except MetadataError as exc:
            metrics.AGENT_POLL_ERRORS.labels("malformed").inc()
            self._problem("agent.malformed_response", str(exc))
            return None
        self._last_problem = None
        if notice is not None and notice.key not in self.sent:
            await self._send(notice)
        return notice

    def _problem(self, event: str, error: str) -> None:
        # Every poll fails the same way while it lasts: say it once, then at debug.
        level = self.log.debug if error == self._last_problem else self.log.warning
        level(event, error=error)
        self._last_problem = error

    async def _send(self, notice: CloudNotice) -> None:
        grace_s = min(max(notice.deadline - time.time(), 0.0), MAX_GRACE_S)
        body = PreemptNotice(
            instance_id=self.instance_id, grace_s=grace_s, source=self.adapter.provider
        )
        log = self.log.bind(notice=notice.key, action=notice.action, grace_s=round(grace_s, 3))
        try:
            reply = await self._request(body)
        except (NoResponders, RpcTimeout, NatsError) as exc:
            metrics.AGENT_NOTICES.labels("undelivered").inc()
            log.warning("agent.notice_not_delivered", error=repr(exc))
            return
        except NotFound as exc:
            # The instance may not have registered yet: try again at the next poll.
            metrics.AGENT_NOTICES.labels("unknown_instance").inc()
            log.warning("agent.instance_unknown", error=exc.message)
            return
        except RpcError as exc:
            metrics.AGENT_NOTICES.labels("refused").inc()
            log.error("agent.notice_refused", code=exc.code, error=exc.message)
            if isinstance(exc, BadRequest):
                self.sent.add(notice.key)  # it will not get better
            return
        self.sent.add(notice.key)
        metrics.AGENT_NOTICES.labels("accepted").inc()
        event = _event_of(reply)
        log.info(
            "agent.notice_sent",
            outcome=(reply.headers or {}).get(NOTICE_OUTCOME_HEADER),
            deadline=event.deadline if event else None,
        )

    async def _request(self, body: PreemptNotice) -> Msg:
        """The monitor's answer (its outcome header is read too, so not through ``call``)."""
        subject = NOTICE_ENDPOINT.subject_for()
        reply = await request_raw(self.nc, subject, encode(body), self.request_timeout_s)
        raise_for_error(reply)
        return reply

    async def run(self, stop: asyncio.Event, poll_s: float) -> None:
        self.log.info("agent.started", poll_s=poll_s)
        while not stop.is_set():
            await self.poll_once()
            await sleep_unless_stopped(stop, poll_s)


def _event_of(reply: Msg) -> FleetEvent | None:
    """The event the monitor answered with; None when unreadable (it is only logged)."""
    try:
        return NOTICE_ENDPOINT.parse_reply(reply.data)
    except RpcError:
        return None


async def serve_agent(context: ServiceContext) -> None:
    settings = context.settings.monitor
    if settings.agent_provider is None:
        raise ConfigurationError(
            "the agent needs a cloud: --provider aws|gcp|azure"
            " (or SPOTSERVE_MONITOR__AGENT_PROVIDER)"
        )
    instance_id = settings.agent_instance_id or context.settings.executor.instance_id
    if not instance_id:
        raise ConfigurationError(
            "the agent needs the instance it watches: --instance ID"
            " (or SPOTSERVE_MONITOR__AGENT_INSTANCE_ID)"
        )
    adapter = make_adapter(
        settings.agent_provider,
        settings.agent_url,
        settings.agent_timeout_s,
        vm_name=settings.agent_vm_name,
    )
    agent = NoticeAgent(
        context.nc, adapter, instance_id, context.settings.nats.request_timeout_s, context.log
    )
    await agent.run(context.stop, settings.agent_poll_s)
